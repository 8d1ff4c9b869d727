"""Qwen-Image (its first release, 2512, and the Edit releases): a diffusion transformer of 60 double-stream blocks
(image and text apart, one joint attention over [text, image]) with QK-norm and a rotary embedding, on the hidden
states of the Qwen2.5-VL language model.

Ids are the DiT grammar of dit_layout.py; every block is double-stream, so each has the image and the text ids:
- `in` / `out`: the block's image (`txt-`: text) stream entering / leaving it.
- `norm-out`: the attention's input, (1 + scale) * LayerNorm(x) + shift with the block's own modulation (the
  modulation is functional on both backends: this is the input of the q projection).
- `q` / `k`: after the RMS QK-norm, before the rotary embedding; `v`: the projection's output.
- `attn-out`: the attention's output projection (before gate and residual); `ffn-inner`: the MLP's GELU (tanh).
- `cross-map` / `self-map`: the generated image's queries' rows of the joint softmax at the text / image keys,
  with the rotary embedding applied as the model applies it; where diffusers is given a text padding mask (a
  batch of prompts of different lengths), padded text keys get no probability, as in its attention. Text ids
  keep every token the stream carries, padding included (the batch's longest prompt's length).
- `dit-in` / `dit-out`: the 2x2-patch tokens entering the patch embedding / leaving the output projection,
  unpacked to the latent's (16, H, W) (both backends pack the same way; ComfyUI's own 5-D latent never shows).
Edit releases: the reference images' tokens follow the generated image's in the image stream, [text | generated
image h*w | reference 1 | reference 2 ...] in the joint sequence. Every image id (and dit-in / dit-out) is the
generated image's tokens on its grid (span "grid"); maps keep the generated image's query rows, and self-maps its
keys only (the reference keys' share is left out, so their rows sum to less than 1 where references are present).
Reference I's tokens are `vit-block{B}-ref{I}-{in|norm-out|q|k|v|attn-out|ffn-inner|out}` on its own grid: diffusers'
from img_shapes (the entries after the generated image's), ComfyUI's from the ref_latents the network gets (padded
to the 2x2 patch); a reference latent of another channel count than the network's is refused in one line.
Each block's "modulation" read is [shift | scale] of its image stream's first modulation (img_mod's linear, the
first two of its six chunks, the same on both backends); Qwen-Image-Edit-2511's zero_cond_t (a second modulation
for the reference tokens, at t = 0, in the same batch) has none.
"""
from __future__ import annotations

import torch

from ..attention_maps import ROPES
from .dit_layout import DitLayout
from .family import Family, Sampling, TextEncoder

PATCH = 2  # 2x2 latent patches, packed outside the blocks on both backends
SWEEP_EVERY = 6  # the sweep preset: every sixth block, ending at the last of the 60


def _diffusers_qwen_rope(q: torch.Tensor, k: torch.Tensor, emb):
    """diffusers' Qwen-Image rotary embedding on the joint [text, image] q, k (B, heads, N, d): its own function
    (complex frequencies) with its (image frequencies, text frequencies) pair, in the joint sequence's order."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    image, text = emb
    freqs = torch.cat([text, image])

    def rotate(x):
        return apply_rotary_emb_qwen(x.transpose(1, 2), freqs, use_real=False).transpose(1, 2)
    return rotate(q), rotate(k)


ROPES["diffusers-qwen"] = _diffusers_qwen_rope


def _layout(model: torch.nn.Module, rope: str, grid_path: str | None, text_mask: tuple | None,
            references: tuple) -> DitLayout:
    """Both backends: ComfyUI's qwen_image model names its modules as diffusers does (its weights load unconverted)
    and calls blocks and attentions with the same keywords; they differ in the rotary embedding's form and in the
    text padding mask (diffusers' attention masks padded text keys; ComfyUI v0.3.64's is passed one and ignores it)."""
    blocks = []
    for i, block in enumerate(model.transformer_blocks):
        b, a = f"transformer_blocks.{i}", f"transformer_blocks.{i}.attn"
        image = {"in": dict(module_path=b, at="input", item=("hidden_states", 0)),
                 "norm-out": dict(module_path=f"{a}.to_q", at="input"),
                 "q": dict(module_path=f"{a}.norm_q", layout="bnhd"),
                 "k": dict(module_path=f"{a}.norm_k", layout="bnhd"),
                 "v": dict(module_path=f"{a}.to_v"),
                 "attn-out": dict(module_path=f"{a}.to_out.0"),
                 "ffn-inner": dict(module_path=f"{b}.img_mlp.net.0"),  # GELU module: its linear, then the tanh GELU
                 "out": dict(module_path=b, item=1)}
        text = {"in": dict(module_path=b, at="input", item=("encoder_hidden_states", 1)),
                "norm-out": dict(module_path=f"{a}.add_q_proj", at="input"),
                "q": dict(module_path=f"{a}.norm_added_q", layout="bnhd"),
                "k": dict(module_path=f"{a}.norm_added_k", layout="bnhd"),
                "v": dict(module_path=f"{a}.add_v_proj"),
                "attn-out": dict(module_path=f"{a}.to_add_out"),
                "ffn-inner": dict(module_path=f"{b}.txt_mlp.net.0"),
                "out": dict(module_path=b, item=0)}
        reads = {suffix: {**read, "span": "grid"} for suffix, read in image.items()}
        reads.update({f"txt-{suffix}": read for suffix, read in text.items()})
        reads["map"] = dict(module_path=f"{a}.norm_q", key_path=f"{a}.norm_k", layout="bnhd",
                            text_query_path=f"{a}.norm_added_q", text_key_path=f"{a}.norm_added_k", rope=rope,
                            rope_path=a, rope_arg=("image_rotary_emb", 4), attention_path=a,
                            text_mask_arg=text_mask)
        if not getattr(block, "zero_cond_t", False):
            reads["modulation"] = dict(module_path=f"{b}.img_mod.1", columns=(0, 2 * block.dim))
        blocks.append(reads)
    return DitLayout(
        ends={"in": dict(module_path="img_in", kind="packed", at="input", span="grid"),
              "embed": dict(module_path="img_in", kind="tokens", span="grid"),
              "out": dict(module_path="proj_out", kind="packed", span="grid")},
        blocks=blocks, common=dict(grid_path=grid_path, grid_divisor=PATCH, text_path="txt_in", ref_read=references),
        reference_channels=model.img_in.in_features // (PATCH * PATCH))


def diffusers_layout(model: torch.nn.Module) -> DitLayout:
    """diffusers' QwenImageTransformer2DModel: packed tokens in and out, so its grid comes from the caller
    (FeatureCapture's token_grid, the latent's size); its rotary embedding is a pair of complex frequency tables."""
    return _layout(model, "diffusers-qwen", None, ("encoder_hidden_states_mask", 2), ("shapes", "img_shapes", 4))


def native_layout(net: torch.nn.Module) -> DitLayout:
    """ComfyUI's comfy/ldm/qwen_image QwenImageTransformer2DModel: the latent (B, 16, 1, H, W) is its input, so the
    grid is read there; its rotary embedding (Flux's form, (B, N, 1, d/2, 2, 2), on (B, N, heads, d)) is the one
    native/comfy_model.py registers as "comfy-qwen"."""
    return _layout(net, "comfy-qwen", "", None, ("latents", "ref_latents", 5))


def layout(model: torch.nn.Module) -> DitLayout:
    """Both backends' classes are named QwenImageTransformer2DModel: ComfyUI's builds its rotary embedding with
    Flux's EmbedND (`pe_embedder`), diffusers' with its own (`pos_embed`)."""
    return native_layout(model) if hasattr(model, "pe_embedder") else diffusers_layout(model)


def network_inputs(denoiser, x_t: torch.Tensor, sigma: float, cond: dict, guidance) -> dict:
    """diffusers' QwenImageTransformer2DModel's keyword arguments as QwenImagePipeline makes them: 2x2-packed
    latent tokens, sigma as the timestep, img_shapes (one frame of the packed grid per image), the text and its
    padding mask (encoder_hidden_states_mask; none for a single prompt, as the pipeline drops an all-ones mask).
    diffusers 0.42's pipeline passes no txt_seq_lens: the network reads the text length from the mask."""
    from ..hooks import pack_tokens

    param = next(denoiser.parameters())
    batch, (h, w) = x_t.shape[0], x_t.shape[-2:]
    kwargs = dict(cond)
    mask = kwargs.pop("encoder_attention_mask", None)
    return dict(kwargs, hidden_states=pack_tokens(x_t, PATCH), encoder_hidden_states_mask=mask,
                timestep=torch.full((batch,), sigma, device=param.device, dtype=param.dtype),
                img_shapes=[[(1, h // PATCH, w // PATCH)]] * batch)


def network_output(prediction: torch.Tensor, latent_hw) -> torch.Tensor:
    """The packed velocity tokens back on the latent's (B, 16, H, W)."""
    from ..hooks import unpack_tokens

    return unpack_tokens("the prediction", prediction, (latent_hw[0] // PATCH, latent_hw[1] // PATCH), PATCH)


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, latent_hw) -> torch.Tensor:
    """QwenImagePipeline's true CFG: uncond + cfg (cond - uncond), rescaled per packed token to the norm of the
    conditional prediction's token."""
    from ..hooks import pack_tokens

    guided = uncond + cfg * (cond - uncond)
    scale = pack_tokens(cond, PATCH).norm(dim=-1, keepdim=True) / pack_tokens(guided, PATCH).norm(dim=-1, keepdim=True)
    return network_output(pack_tokens(guided, PATCH) * scale, latent_hw)


def folder_refusal(index: dict) -> str | None:
    """Qwen-Image-Edit folders (QwenImageEdit(Plus)Pipeline): their reference image enters beside the generated
    one, which DF_MODEL does not build; ComfyUI's MODEL (DFExtractNative) takes Edit references."""
    name = str(index.get("_class_name", ""))
    if "Edit" not in name:
        return None
    return (f"a {name} folder (Qwen-Image-Edit) needs its reference image beside the generated one, which DF_MODEL "
            "does not take: load the Edit model in ComfyUI (Load Diffusion Model) and use DFExtractNative, which "
            "takes Edit references; DF_MODEL loads Qwen-Image (QwenImagePipeline) folders")


# QwenImagePipeline's prompt template and the tokens of its fixed prefix it leaves out
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_DROP = 34


def _sweep(blocks: int = 60) -> tuple[str, ...]:
    return tuple(f"vit-block{b}-{s}" for b in range(SWEEP_EVERY - 1, blocks, SWEEP_EVERY) for s in ("norm-out", "out"))


FAMILY = Family(
    name="qwen-image", description="Qwen-Image, Qwen-Image-2512, Qwen-Image-Edit (2509, 2511) (MMDiT, Qwen2.5-VL)",
    denoiser="transformer", native_size=1024,
    # diffusers' QwenImagePipeline: the last hidden state (3584 wide) of Qwen2.5-VL-7B-Instruct over a chat template,
    # its 34 system-prompt tokens dropped (64 in the Edit pipelines, which also see the reference image); a prompt
    # hands its own length (padding only to the longest prompt of a batch, with a mask), at most
    # max_sequence_length = 512 tokens: the catalog's cross-maps are shown at that most.
    text_encoders=(TextEncoder("qwen2.5-vl", 3584, template=TEMPLATE, drop=TEMPLATE_DROP),), text_tokens=512,
    presets={
        # Ours, not validated: no paper we know picks Qwen-Image layers for dense features. Image outputs of three
        # blocks at 40-60 % of the depth, where DiT features are known to peak.
        "practical": ("vit-block23-out", "vit-block29-out", "vit-block35-out"),
        # The last block's image output, as for PixArt and SD3.
        "legacy": ("vit-block59-out",),
        # Unvalidated until a study picks layers: every sixth block's norm-out and out (blocks 5, 11, ..., 59).
        "sweep": _sweep(),
    },
    vae_float32=True, latent_format="Wan21", comfy_configs=("QwenImage",),
    # ComfyUI keeps diffusers' key names for this model: txt_norm and the image stream's modulation are its own
    checkpoint_marks=(r"(model\.diffusion_model\.)?txt_norm\.weight$",
                      r"(model\.diffusion_model\.)?transformer_blocks\.0\.img_mod\.1\.weight$"),
    single_file=False,
    transformer_file=True,  # qwen_image*.safetensors: the transformer alone, in diffusers' names (ComfyUI's)
    networks={"QwenImageTransformer2DModel": layout},
    # DF_MODEL as QwenImagePipeline: sigma as the timestep, 2x2-packed latents, sigmas linspace(1, 1 / steps) with
    # the scheduler's image-size shift, true CFG rescaled per token, no guidance embedding (guidance_embeds false)
    flow=True, timestep_scale=1 / 1000, latent_patch=PATCH, linspace_sigmas=True,
    network_inputs=network_inputs, network_output=network_output, guided=true_cfg, folder_refusal=folder_refusal,
    # QwenImagePipeline's __call__: 50 steps, true_cfg_scale 4 (which it applies only given a negative prompt; its
    # model card gives one, " "; here the negative defaults to the empty prompt)
    sampling=Sampling(50, 4.0, "QwenImagePipeline's __call__ defaults (true_cfg_scale 4)"),
    reference_images=True,  # the Edit releases
)

"""Z-Image (Turbo and base): a single-stream diffusion transformer. Before its joint layers, refiners see one stream
each: noise refiners the image tokens (timestep-modulated), context refiners the caption (no modulation); then every
layer runs on one sequence of text and image tokens. Qwen3's caption embeddings, a rotary embedding on three axes
(caption position, row, column) and QK-norm (RMS, per head) throughout.

Ids (the DiT grammar of dit_layout.py):
- `vit-refiner{R}-*`: noise refiner R (image tokens, as (C, h, w), and its self-map over the image keys);
  `vit-refiner{R}-txt-*`: context refiner R (caption tokens, as (C, T); no map). The two streams never meet there.
- `vit-block{B}-*`: main layer B; its one sequence split into image ids and `txt-` ids by the caption length.
- Padding: each part of every sequence is padded to a multiple of 32 tokens with a learned pad token (image and
  caption apart), and the pad tokens take part in every attention, unmasked. No id includes them: image ids hold
  the h * w image tokens, text ids the caption's T tokens, maps the image queries' probabilities at those keys
  only (so a map's cross and self parts sum to less than 1 where there is padding).
- `norm-out`: the attention's input, RMSNorm(x) * (1 + scale) (the refiners of the caption: RMSNorm(x); Z-Image
  modulates without a shift). `q` / `k`: after QK-norm, before the rotary embedding; `v`: the projection's.
  `attn-out`: the attention's output projection, before its post-norm, gate and residual. `ffn-inner`: the SwiGLU
  hidden activation, silu(w1 x) * w3 x, the input of w2. `in` / `out`: the residual stream around the block.
- Order of the joint sequence: diffusers' model puts [image, text], ComfyUI's [text, image]; with RoPE and no mask
  the order changes nothing, and the reads below take each part where its backend put it.
There is no "modulation" read: the ditf transform re-applies a shift and scale that Z-Image does not have.
"""
from __future__ import annotations

import torch

from .dit_layout import DitLayout, joint
from .family import Family, Sampling, TextEncoder

_STREAM = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")
_PAD = 32  # diffusers' SEQ_MULTI_OF; ComfyUI's pad_tokens_multiple for Z-Image


def _stream(reads: dict, span: str, **fields) -> dict:
    """The reads of a one-stream block, each taking its stream's tokens (span) of the block's sequence."""
    return {s: {**r, "span": span, **fields} for s, r in reads.items()}


def _diffusers_block(b: str, block: torch.nn.Module) -> dict:
    """diffusers' ZImageTransformerBlock at path b: separate q/k/v linears, norm_q / norm_k on (B, N, heads, d)."""
    normed = block.attention.norm_q is not None
    q, k = ("norm_q", "norm_k") if normed else ("to_q", "to_k")
    layout = "bnhd" if normed else "bnc"
    return {"in": dict(module_path=b, at="input", item=("x", 0)),
            "norm-out": dict(module_path=f"{b}.attention", at="input", item=("hidden_states", 0)),
            "q": dict(module_path=f"{b}.attention.{q}", layout=layout),
            "k": dict(module_path=f"{b}.attention.{k}", layout=layout),
            "v": dict(module_path=f"{b}.attention.to_v"),
            "attn-out": dict(module_path=f"{b}.attention.to_out.0"),
            "ffn-inner": dict(module_path=f"{b}.feed_forward.w2", at="input"),
            "out": dict(module_path=b)}


def _map(reads: dict, b: str, rope: str, **fields) -> dict:
    q, k = reads["q"], reads["k"]
    fused = dict(columns=q.get("columns"), norm_path=q.get("norm_path"), key_columns=k.get("columns"),
                 key_norm_path=k.get("norm_path"))  # set where q and k are the fused qkv's columns (_fused_qk_norm)
    return dict(module_path=q["module_path"], key_path=k["module_path"], layout=q.get("layout", "bnc"), rope=rope,
                rope_path=b, rope_arg=("freqs_cis", 2), **{n: v for n, v in fused.items() if v is not None}, **fields)


def _layout(model, block_reads, attention: str, rope: str, image_first: bool, pad: int, ends: dict,
            common: dict) -> DitLayout:
    """The layout of either backend's network, given how one of its blocks is read (block_reads(path, block))."""
    refiners = []
    for r, (image, text) in enumerate(zip(model.noise_refiner, model.context_refiner)):
        nr, cr = f"noise_refiner.{r}", f"context_refiner.{r}"
        image_reads = block_reads(nr, image)
        reads = _stream(image_reads, "grid")
        reads.update({f"txt-{s}": read for s, read in _stream(block_reads(cr, text), "text").items()})
        # the image refiners' sequence is [image, padding]: image first, whatever the joint layers' order
        reads["map"] = _map(image_reads, nr, rope, attention_path=f"{nr}.{attention}", image_first=True)
        refiners.append(reads)
    blocks = []
    for i, layer in enumerate(model.layers):
        b = f"layers.{i}"
        placed = {s: {**r, "image_first": image_first, "pad_multiple": pad} for s, r in block_reads(b, layer).items()}
        reads = joint(placed, _STREAM)
        reads["map"] = _map(placed, b, rope, attention_path=f"{b}.{attention}", image_first=image_first,
                            pad_multiple=pad)
        blocks.append(reads)
    return DitLayout(ends=ends, blocks=blocks, common=common, refiners=refiners)


def diffusers_layout(model: torch.nn.Module) -> DitLayout:
    """diffusers' ZImageTransformer2DModel: takes and returns lists of per-sample latents (C, 1, H, W) and captions
    (T, C); embeds its patches flat over the batch, so dit-embed is the first refiner's input (the same tokens, the
    padding filled with the pad token). Joint sequence [image, text]."""
    patch = int(model.config.all_patch_size[0])
    embed = (dict(module_path="noise_refiner.0", kind="tokens", at="input", item=("x", 0), span="grid")
             if len(model.noise_refiner) else None)
    ends = {"in": dict(module_path="", kind="input", at="input", item=("x", 0)),
            **({"embed": embed} if embed else {}), "out": dict(module_path="", kind="spatial")}
    return _layout(model, _diffusers_block, "attention", "complex", True, _PAD, ends,
                   dict(grid_path="", grid_divisor=patch, text_path="", text_item=("cap_feats", 2)))


def _fused_qk_norm(attention: torch.nn.Module) -> bool:
    """Whether ComfyUI's JointAttention normalises q and k without calling its q_norm / k_norm modules: newer
    ComfyUIs keep QK-norm as a `qk_norm` flag on it and, with the flag set (outside training), normalise and rotate
    q and k in one fused kernel. v0.3.64's has no such flag: its modules run."""
    return getattr(attention, "qk_norm", None) is True


def _native_block(b: str, block: torch.nn.Module) -> dict:
    """ComfyUI's JointTransformerBlock (comfy/ldm/lumina/model.py): a fused qkv linear (q, then k and v of the
    key-value heads), q_norm / k_norm on (B, N, heads, d) (Identity without QK-norm), modulation done functionally
    (so norm-out is the qkv linear's input). Where the norm modules never run (_fused_qk_norm), q and k are the qkv
    linear's columns with those modules' RMSNorm weights applied by the capture, the same tensors."""
    attn = block.attention
    width, kv = attn.n_local_heads * attn.head_dim, attn.n_local_kv_heads * attn.head_dim
    qkv = f"{b}.attention.qkv"
    if _fused_qk_norm(attn):
        q = dict(module_path=qkv, columns=(0, width), norm_path=f"{b}.attention.q_norm")
        k = dict(module_path=qkv, columns=(width, width + kv), norm_path=f"{b}.attention.k_norm")
    else:
        q = dict(module_path=f"{b}.attention.q_norm", layout="bnhd")
        k = dict(module_path=f"{b}.attention.k_norm", layout="bnhd")
    return {"in": dict(module_path=b, at="input", item=("x", 0)),
            "norm-out": dict(module_path=qkv, at="input"),
            "q": q, "k": k,
            "v": dict(module_path=qkv, columns=(width + kv, width + 2 * kv)),
            "attn-out": dict(module_path=f"{b}.attention.out"),
            "ffn-inner": dict(module_path=f"{b}.feed_forward.w2", at="input"),
            "out": dict(module_path=b)}


def native_layout(net: torch.nn.Module) -> DitLayout:
    """ComfyUI's NextDiT (Lumina2's backbone, which ComfyUI's ZImage config builds with Z-Image's options): joint
    sequence [text, image], each part padded to pad_tokens_multiple where the network has pad tokens (Z-Image;
    Lumina2 has none). ComfyUI v0.3.64's NextDiT has none of Z-Image's options: there it is Lumina2 (Gemma-2 2B
    captions), read with these same ids. Text ids hold the caption tokens the joint sequence holds: v0.3.64 keeps the
    first attention_mask.sum() of each caption (all of them for one prompt of ComfyUI's Gemma encoder, which passes
    no mask) and places the image right after them, so its text length is read from that mask; a newer NextDiT
    (embed_cap) keeps every caption token it embeds."""
    pad = getattr(net, "pad_tokens_multiple", None) or 1
    ends = {"in": dict(module_path="", kind="input"),
            "embed": dict(module_path="x_embedder", kind="tokens", span="grid"),
            "out": dict(module_path="", kind="spatial")}
    text = (dict(text_path="cap_embedder") if hasattr(net, "embed_cap") else
            dict(text_path="", text_item=("context", 2), text_kept_arg=("attention_mask", 4)))
    return _layout(net, _native_block, "attention", "matrix", False, pad, ends,
                   dict(grid_path="", grid_divisor=int(net.patch_size), **text))


def comfy_missing(net: torch.nn.Module) -> str | None:
    """What the NextDiT of a MODEL that ComfyUI's config calls Z-Image lacks to hold it (None: it holds it): Z-Image's
    pad tokens and options, which v0.3.64's NextDiT does not take. (v0.3.64 itself cannot load a Z-Image file: its
    model detection reads one as Lumina2, with Lumina2's widths, and the weights do not fit; a Lumina2 MODEL, which
    no ZImage config claims, is read as it is.)"""
    if getattr(net, "pad_tokens_multiple", None):
        return None
    return "a NextDiT built with Z-Image's options (ComfyUI's ZImage model, in ComfyUIs newer than v0.3.64)"


def network_inputs(denoiser: torch.nn.Module, x_t: torch.Tensor, sigma: float, cond_kwargs: dict,
                   guidance) -> dict:
    """diffusers' ZImageTransformer2DModel's inputs as ZImagePipeline makes them: lists of per-sample latents
    (C, 1, H, W) and captions (their real tokens only: the Conditioning's mask), and t = (1000 - sigma * 1000) / 1000,
    the model's time running from 0 (noise) to 1 (image)."""
    states, mask = cond_kwargs["encoder_hidden_states"], cond_kwargs.get("encoder_attention_mask")
    captions = [row if mask is None else row[mask[i].bool()] for i, row in enumerate(states)]
    t = (1000 - torch.full((x_t.shape[0],), sigma * 1000, dtype=torch.float32)) / 1000
    return dict(x=list(x_t.unsqueeze(2).unbind(0)), t=t.to(x_t.device), cap_feats=captions)


def network_output(prediction, latent_hw) -> torch.Tensor:
    """The model's per-sample outputs (C, 1, H, W) as the flow velocity (B, C, H, W): its pipeline negates them."""
    return -torch.stack(list(prediction)).squeeze(2)


TURBO_SHIFT = 3.0  # Z-Image Turbo's scheduler shift (its scheduler_config.json, the one shipped here)
TURBO = Sampling(8, 1.0, "Z-Image Turbo (scheduler shift 3): diffusers' ZImagePipeline example, 8 steps, "
                         "guidance_scale 0")


def sampling_variant(denoiser_config, scheduler_config: dict, pipeline: dict) -> Sampling | None:
    """Z-Image Turbo, told from the base model (the same transformer) by its scheduler's shift."""
    return TURBO if scheduler_config.get("shift") == TURBO_SHIFT else None


FAMILY = Family(
    name="z-image", description="Z-Image Turbo / base (single-stream DiT with image and caption refiners, Qwen3-4B)",
    denoiser="transformer", native_size=1024,
    # diffusers' ZImagePipeline: Qwen3-4B's second-to-last hidden state (2560 wide) of the chat-templated prompt,
    # only its real tokens (at most max_sequence_length = 512; no padding reaches the model).
    text_encoders=(TextEncoder("qwen3", 2560, layers=(-2,)),), text_tokens=512,
    presets={
        # Ours, not validated (no study has picked Z-Image layers yet): every fifth main layer's residual output and
        # its attention input, ending at the last layer.
        "sweep": tuple(f"vit-block{b}-{s}" for b in range(4, 30, 5) for s in ("norm-out", "out")),
    },
    vae_float32=True, latent_format="Flux", comfy_configs=("ZImage",),
    # Z-Image's pad tokens and its caption refiners: in its original, diffusers and ComfyUI files alike; Lumina2 has
    # the refiners but no pad tokens.
    checkpoint_marks=(r"(model\.diffusion_model\.)?x_pad_token$",
                      r"(model\.diffusion_model\.)?context_refiner\.0\.attention\.",),
    single_file=False,  # until DF_MODEL loads DiT checkpoints
    networks={"ZImageTransformer2DModel": diffusers_layout, "NextDiT": native_layout}, comfy_missing=comfy_missing,
    # ZImagePipeline: flow-match Euler on sigmas linspace(1, 1 / steps) with the scheduler's static shift 3; the
    # network patches the latent itself, is given 1 - sigma and predicts the negative velocity (network_inputs /
    # network_output convert); no guidance embedding. Its guidance_scale g is cfg = g + 1 here (Turbo: g 0, cfg 1).
    flow=True, linspace_sigmas=True, network_inputs=network_inputs, network_output=network_output,
    # ZImagePipeline's __call__: 50 steps, guidance_scale 5 (cfg 6 here) for the base model; Turbo: sampling_variant
    sampling=Sampling(50, 6.0, "ZImagePipeline's __call__ defaults (guidance_scale 5)"),
    sampling_variant=sampling_variant,
)

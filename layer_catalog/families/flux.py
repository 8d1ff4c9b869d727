"""Flux.1 (dev, schnell, Krea, Kontext): a diffusion transformer of double-stream blocks (image and text apart,
joint attention) then single-stream blocks ([text, image] as one sequence), with QK-norm and a rotary embedding.

Block ids count the double blocks first (0-18 for Flux.1), then the single ones (19-56), as the reference code
numbers them. Where the two block kinds differ, the ids mean:
- `attn-out`: double blocks, the output projection's output (before gate and residual); single blocks fuse that
  projection with the MLP's output linear, so there it is the attention's output before that fused linear.
- `in` / `out` / `norm-out` / `ffn-inner` of a single block: its [text, image] sequence split by the text length.
- Kontext appends its reference image's tokens after the generated image's (both backends): image ids read the
  generated image's tokens only (span "grid"; in single blocks "image"), and self-maps its keys only. The
  reference's tokens are its own ids, `vit-block{B}-ref{I}-{in|norm-out|q|k|v|attn-out|ffn-inner|out}` (the same
  tensors, on reference I's grid): diffusers' grid from img_ids (a reference's axis 0 is 1), ComfyUI's from the
  ref_latents the network gets, padded to the patch size. No map has reference ids.
Each block's "modulation" read is [shift | scale] of its image stream's first AdaLN (the first two of the chunks its
modulation linear makes, in the same order on both backends): norm-out = (1 + scale) * LayerNorm(in) + shift.
"""
from __future__ import annotations

import torch

from .dit_layout import DitLayout, joint
from .family import Family, Sampling, TextEncoder

STREAM_SUFFIXES = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")
# Where a call shows its reference images (Tap.ref_read): diffusers' Kontext passes their tokens' positions (img_ids,
# the reference's axis 0 is 1) after the generated image's; ComfyUI's Flux (and its Flux.2) takes the latents.
KONTEXT_IDS = ("ids", "img_ids", 4)
COMFY_REFERENCES = ("latents", "ref_latents", 5)


def _double(image: dict, text: dict) -> dict:
    reads = {suffix: {**read, "span": "grid"} for suffix, read in image.items()}
    reads.update({f"txt-{s}": r for s, r in text.items()})
    return reads


def diffusers_double(b: str, norm_out: tuple[dict, dict], ffn_inner: tuple[str, str]) -> dict:
    """The reads of diffusers' Flux-type double block at path `b` (FluxAttention and Flux.2's Flux2Attention name
    their projections and QK-norms alike; blocks return (text, image)): the two streams' norm-out reads and their
    MLP activations' module names (image, text) are what differ between the two."""
    image = {"in": dict(module_path=b, at="input", item=("hidden_states", 0)),
             "norm-out": norm_out[0],
             "q": dict(module_path=f"{b}.attn.norm_q", layout="bnhd"),
             "k": dict(module_path=f"{b}.attn.norm_k", layout="bnhd"),
             "v": dict(module_path=f"{b}.attn.to_v"),
             "attn-out": dict(module_path=f"{b}.attn.to_out.0"),
             "ffn-inner": dict(module_path=f"{b}.{ffn_inner[0]}"),
             "out": dict(module_path=b, item=1)}
    text = {"in": dict(module_path=b, at="input", item=("encoder_hidden_states", 1)),
            "norm-out": norm_out[1],
            "q": dict(module_path=f"{b}.attn.norm_added_q", layout="bnhd"),
            "k": dict(module_path=f"{b}.attn.norm_added_k", layout="bnhd"),
            "v": dict(module_path=f"{b}.attn.add_v_proj"),
            "attn-out": dict(module_path=f"{b}.attn.to_add_out"),
            "ffn-inner": dict(module_path=f"{b}.{ffn_inner[1]}"),
            "out": dict(module_path=b, item=0)}
    reads = _double(image, text)
    reads["map"] = dict(module_path=f"{b}.attn.norm_q", key_path=f"{b}.attn.norm_k", layout="bnhd",
                        text_query_path=f"{b}.attn.norm_added_q", text_key_path=f"{b}.attn.norm_added_k",
                        rope="diffusers", rope_path=f"{b}.attn", rope_arg=("image_rotary_emb", 3),
                        attention_path=f"{b}.attn")
    return reads


def diffusers_layout(model: torch.nn.Module) -> DitLayout:
    """diffusers' FluxTransformer2DModel (packed 2x2 latent patches in and out; its grid comes from the caller)."""
    blocks = []
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        reads = diffusers_double(b, (dict(module_path=f"{b}.norm1"), dict(module_path=f"{b}.norm1_context")),
                                 ("ff.net.0", "ff_context.net.0"))
        width = model.transformer_blocks[i].attn.inner_dim
        reads["modulation"] = dict(module_path=f"{b}.norm1.linear", columns=(0, 2 * width))
        blocks.append(reads)
    for i in range(len(model.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        width = model.single_transformer_blocks[i].attn.inner_dim
        reads = joint({"norm-out": dict(module_path=f"{b}.norm"),
                       "q": dict(module_path=f"{b}.attn.norm_q", layout="bnhd"),
                       "k": dict(module_path=f"{b}.attn.norm_k", layout="bnhd"),
                       "v": dict(module_path=f"{b}.attn.to_v"),
                       "attn-out": dict(module_path=f"{b}.proj_out", at="input", columns=(0, width)),
                       "ffn-inner": dict(module_path=f"{b}.act_mlp")},
                      ("norm-out", "q", "k", "v", "attn-out", "ffn-inner"))
        reads.update({"in": dict(module_path=b, at="input", item=("hidden_states", 0), span="grid"),
                      "txt-in": dict(module_path=b, at="input", item=("encoder_hidden_states", 1)),
                      "out": dict(module_path=b, item=1, span="grid"), "txt-out": dict(module_path=b, item=0)})
        reads["map"] = dict(module_path=f"{b}.attn.norm_q", key_path=f"{b}.attn.norm_k", layout="bnhd",
                            rope="diffusers", rope_path=f"{b}.attn", rope_arg=("image_rotary_emb", 3),
                            attention_path=f"{b}.attn")
        reads["modulation"] = dict(module_path=f"{b}.norm.linear", columns=(0, 2 * width))
        blocks.append(reads)
    patch = 2  # diffusers' Flux packs 2x2 latent patches outside the model (its pipeline's _pack_latents)
    return DitLayout(
        ends={"in": dict(module_path="", kind="packed", at="input", item=("hidden_states", 0), span="grid"),
              "embed": dict(module_path="x_embedder", kind="tokens", span="grid"),
              "out": dict(module_path="", kind="packed", span="grid")},
        blocks=blocks, common=dict(grid_path=None, grid_divisor=patch, text_path="context_embedder",
                                   ref_read=KONTEXT_IDS))


def native_layout(net: torch.nn.Module) -> DitLayout | None:
    """ComfyUI's Flux (comfy/ldm/flux/model.py) as Flux.1; None for the Flux.2 networks newer ComfyUIs build with the
    same class (their modulation is shared by all blocks: flux2.py reads them)."""
    if getattr(net, "double_stream_modulation_img", None) is not None:
        return None
    return comfy_flux_layout(net)


def _latent_channels(net: torch.nn.Module, patch: int) -> int | None:
    """The latent channels ComfyUI's Flux takes (its patch embedding's input is a patch of them)."""
    img_in = getattr(net, "img_in", None)
    return None if img_in is None else img_in.in_features // (patch * patch)


def comfy_flux_layout(net: torch.nn.Module) -> DitLayout:
    """ComfyUI's Flux blocks: fused qkv linears, QKNorm modules, functional modulation (so norm-out is the input of
    the qkv linear), single blocks on the joint sequence; each block's own modulation linear."""
    blocks = []
    for i in range(len(net.double_blocks)):
        b = f"double_blocks.{i}"

        def stream(s: str, item: int, name: str) -> dict:
            return {"in": dict(module_path=b, at="input", item=(name, item)),
                    "norm-out": dict(module_path=f"{b}.{s}_attn.qkv", at="input"),
                    "q": dict(module_path=f"{b}.{s}_attn.norm.query_norm", layout="bhnd"),
                    "k": dict(module_path=f"{b}.{s}_attn.norm.key_norm", layout="bhnd"),
                    "v": dict(module_path=f"{b}.{s}_attn.qkv", part=(2, 3)),
                    "attn-out": dict(module_path=f"{b}.{s}_attn.proj"),
                    "ffn-inner": dict(module_path=f"{b}.{s}_mlp.1"),
                    "out": dict(module_path=b, item=item)}
        reads = _double(stream("img", 0, "img"), stream("txt", 1, "txt"))
        reads["map"] = dict(module_path=f"{b}.img_attn.norm.query_norm", key_path=f"{b}.img_attn.norm.key_norm",
                            text_query_path=f"{b}.txt_attn.norm.query_norm",
                            text_key_path=f"{b}.txt_attn.norm.key_norm", layout="bhnd", rope="comfy",
                            rope_path=b, rope_arg=("pe", 3), attention_path=f"{b}.img_attn")
        width = net.double_blocks[i].hidden_size
        reads["modulation"] = dict(module_path=f"{b}.img_mod.lin", columns=(0, 2 * width))
        blocks.append(reads)
    for i in range(len(net.single_blocks)):
        b = f"single_blocks.{i}"
        width = net.single_blocks[i].hidden_size
        blocks.append(joint({"in": dict(module_path=b, at="input", item=("x", 0)),
                             "norm-out": dict(module_path=f"{b}.linear1", at="input"),
                             "q": dict(module_path=f"{b}.norm.query_norm", layout="bhnd"),
                             "k": dict(module_path=f"{b}.norm.key_norm", layout="bhnd"),
                             "v": dict(module_path=f"{b}.linear1", columns=(2 * width, 3 * width)),
                             "attn-out": dict(module_path=f"{b}.linear2", at="input", columns=(0, width)),
                             "ffn-inner": dict(module_path=f"{b}.mlp_act"),
                             "out": dict(module_path=b)}, STREAM_SUFFIXES))
        blocks[-1]["map"] = dict(module_path=f"{b}.norm.query_norm", key_path=f"{b}.norm.key_norm",
                                 layout="bhnd", rope="comfy", rope_path=b, rope_arg=("pe", 2), attention_path=b)
        blocks[-1]["modulation"] = dict(module_path=f"{b}.modulation.lin", columns=(0, 2 * width))
    patch = int(getattr(net, "patch_size", 2))
    return DitLayout(
        ends={"in": dict(module_path="", kind="input"), "embed": dict(module_path="img_in", kind="tokens", span="grid"),
              "out": dict(module_path="", kind="spatial")},
        blocks=blocks, common=dict(grid_path="", grid_divisor=patch, text_path="txt_in", ref_read=COMFY_REFERENCES),
        reference_channels=_latent_channels(net, patch))


SCHNELL = Sampling(4, 1.0, "Flux schnell (no guidance embedding): its model card's 4 steps, guidance_scale 0")


def sampling_variant(denoiser_config, scheduler_config: dict, pipeline: dict) -> Sampling | None:
    """Flux schnell, told from dev by its missing guidance embedding (guidance_embeds false)."""
    return None if denoiser_config.get("guidance_embeds", True) else SCHNELL


FAMILY = Family(
    name="flux", description="Flux.1 dev / schnell / Krea / Kontext (DiT, CLIP-L pooled + T5-XXL)",
    denoiser="transformer", native_size=1024,
    text_encoders=(TextEncoder("clip", 768, pad="<|endoftext|>", use="pooled"), TextEncoder("t5", 4096)),
    text_tokens=512,
    presets={
        # DiTF (Gan et al., NeurIPS 2025): the tenth single-stream block's input (here block 19 + 9 = 28) is Flux's
        # best layer for semantic correspondence (DiTF further suppresses its massive-activation channels).
        "practical": ("vit-block28-in",),
        # DiTF itself: the same tensor, to be put through engine/dit_transforms.ditf (its massive-activation channels,
        # detected, zeroed; then block 28's own AdaLN modulation, captured beside it).
        "ditf": ("vit-block28-in",),
        # The last double block's image output: the reference code's conventional choice.
        "legacy": ("vit-block18-out",),
    },
    vae_float32=True, latent_format="Flux", comfy_configs=("Flux", "FluxSchnell", "FluxInpaint"),
    checkpoint_marks=(r"(model\.diffusion_model\.)?double_blocks\.0\.img_attn\.qkv\.weight$",), single_file=False,
    networks={"FluxTransformer2DModel": diffusers_layout, "Flux": native_layout},
    # diffusers' FluxTransformer2DModel takes sigma (it multiplies by 1000 itself), 2x2-packed latents, and
    # Flux-dev's guidance embedding (3.5: FluxPipeline's default guidance_scale)
    flow=True, timestep_scale=1 / 1000, latent_patch=2, guidance=3.5, linspace_sigmas=True,
    reference_images=True,  # Kontext
    transformer_file=True,  # flux1-dev.safetensors & co: the transformer alone, in Black Forest Labs' layout
    # FluxPipeline's __call__: 28 steps, guidance_scale 3.5 into the embedding (Family.guidance), true_cfg_scale 1
    sampling=Sampling(28, 1.0, "FluxPipeline's __call__ defaults (Flux dev: guidance 3.5, true_cfg_scale 1)"),
    sampling_variant=sampling_variant,
)

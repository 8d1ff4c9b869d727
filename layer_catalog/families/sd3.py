"""Stable Diffusion 3 / 3.5 (SD3 medium, SD3.5 medium / large / large-turbo): an MMDiT of joint blocks, each with
an image stream and a text stream that attend jointly over [text, image]; no rotary embedding (the position
embedding is added to the patch embedding once), QK-norm (RMS) from SD3.5 on.

Ids are the DiT grammar of dit_layout.py; per block:
- `in` / `out`: the block's image (`txt-`: text) stream entering / leaving it.
- `norm-out`: the attention's input, (1 + scale) * LN(x) + shift with the block's own AdaLN modulation.
- `q` / `k`: after QK-norm where the model has one (SD3.5), else the projections' outputs; `v`: the projection's.
- `attn-out`: the attention's output projection (before gate and residual); `ffn-inner`: the MLP's activation.
- the last block is "context pre-only": its text stream feeds the last joint attention (txt-in, txt-norm-out,
  txt-q/k/v) but has no output projection, MLP or output, so those text ids do not exist for it.
- `cross-map` / `self-map`: the image queries' rows of the joint softmax at the text / image keys.
- `attn2-{norm-out|q|k|v|self-map|attn-out}`: SD3.5 medium's second attention (attn2 in its first 13 blocks), an
  image-only self-attention on a second modulation of the block's input; the same definitions, its map over the
  image keys alone. Its gated output is added after the joint attention's, before the MLP.
"""
from __future__ import annotations

import torch

from .dit_layout import DitLayout
from .family import Family, Sampling, TextEncoder


def _read(module: torch.nn.Module, path: str, name: str, **fields) -> dict | None:
    """A read of child `name` of module at `path`, or None when the module has no such child (or it is None)."""
    return dict(module_path=f"{path}.{name}", **fields) if getattr(module, name.split(".")[0], None) is not None \
        else None


def _present(reads: dict) -> dict:
    return {k: v for k, v in reads.items() if v is not None}


def diffusers_layout(model: torch.nn.Module) -> DitLayout:
    """diffusers' SD3Transformer2DModel: JointTransformerBlocks whose attention has separate q/k/v linears for the
    image stream (to_*) and the text stream (add_*_proj), QK-norm modules (norm_q / norm_added_q, on per-head
    tensors (B, heads, N, d)) only when the config has qk_norm; blocks return (text, image)."""
    blocks = []
    for i, block in enumerate(model.transformer_blocks):
        b, attn = f"transformer_blocks.{i}", block.attn
        normed = attn.norm_q is not None
        q, k = ("norm_q", "norm_k") if normed else ("to_q", "to_k")
        tq, tk = ("norm_added_q", "norm_added_k") if normed else ("add_q_proj", "add_k_proj")
        layout = "bhnd" if normed else "bnc"
        last = block.context_pre_only
        reads = {"in": dict(module_path=b, at="input", item=("hidden_states", 0)),
                 "norm-out": dict(module_path=f"{b}.norm1"),  # AdaLayerNormZero(X): item 0 is the normalised input
                 "q": dict(module_path=f"{b}.attn.{q}", layout=layout),
                 "k": dict(module_path=f"{b}.attn.{k}", layout=layout),
                 "v": dict(module_path=f"{b}.attn.to_v"),
                 "attn-out": dict(module_path=f"{b}.attn.to_out.0"),
                 "ffn-inner": dict(module_path=f"{b}.ff.net.0"),  # GELU module: its linear, then the activation
                 "out": dict(module_path=b, item=1),
                 "txt-in": dict(module_path=b, at="input", item=("encoder_hidden_states", 1)),
                 "txt-norm-out": dict(module_path=f"{b}.norm1_context"),
                 "txt-q": dict(module_path=f"{b}.attn.{tq}", layout=layout),
                 "txt-k": dict(module_path=f"{b}.attn.{tk}", layout=layout),
                 "txt-v": dict(module_path=f"{b}.attn.add_v_proj"),
                 "txt-attn-out": _read(attn, f"{b}.attn", "to_add_out"),
                 "txt-ffn-inner": _read(block, b, "ff_context.net.0"),
                 "txt-out": None if last else dict(module_path=b, item=0),
                 "map": dict(module_path=f"{b}.attn.{q}", key_path=f"{b}.attn.{k}", layout=layout,
                             text_query_path=f"{b}.attn.{tq}", text_key_path=f"{b}.attn.{tk}",
                             attention_path=f"{b}.attn")}
        if block.attn2 is not None:
            reads.update({"attn2-norm-out": dict(module_path=f"{b}.norm1", item=5),  # SD35AdaLayerNormZeroX
                          "attn2-q": dict(module_path=f"{b}.attn2.{q}", layout=layout),
                          "attn2-k": dict(module_path=f"{b}.attn2.{k}", layout=layout),
                          "attn2-v": dict(module_path=f"{b}.attn2.to_v"),
                          "attn2-self-map": dict(module_path=f"{b}.attn2.{q}", key_path=f"{b}.attn2.{k}",
                                                 layout=layout, attention_path=f"{b}.attn2"),
                          "attn2-attn-out": dict(module_path=f"{b}.attn2.to_out.0")})
        blocks.append(_present(reads))
    return DitLayout(
        ends={"in": dict(module_path="", kind="input"), "embed": dict(module_path="pos_embed", kind="tokens"),
              "out": dict(module_path="", kind="spatial")},
        blocks=blocks, common=dict(grid_path="", grid_divisor=int(model.config.patch_size),
                                   text_path="context_embedder"))


def native_layout(net: torch.nn.Module) -> DitLayout:
    """ComfyUI's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py): joint_blocks.i = (context_block, x_block),
    whose own forwards never run (JointBlock calls their pre/post_attention pieces), so taps sit on their
    submodules: the fused qkv linear (its input is norm-out, its last third v), ln_q / ln_k on (B, N, heads, d)
    (Identity without QK-norm), proj, mlp.act. The position embedding is added functionally, so dit-embed is the
    image input of the first joint block. Blocks are called as (context, x) and return (context, x)."""
    blocks = []
    for i, block in enumerate(net.joint_blocks):
        b = f"joint_blocks.{i}"

        def stream(name: str) -> dict:
            dismantled = getattr(block, name)
            path = f"{b}.{name}"
            return {"norm-out": dict(module_path=f"{path}.attn.qkv", at="input"),
                    "q": dict(module_path=f"{path}.attn.ln_q", layout="bnhd"),
                    "k": dict(module_path=f"{path}.attn.ln_k", layout="bnhd"),
                    "v": dict(module_path=f"{path}.attn.qkv", part=(2, 3)),
                    "attn-out": _read(dismantled.attn, f"{path}.attn", "proj"),
                    "ffn-inner": None if dismantled.pre_only else dict(module_path=f"{path}.mlp.act")}
        reads = {"in": dict(module_path=b, at="input", item=("x", 1)), **stream("x_block"),
                 "out": dict(module_path=b, item=1),
                 "txt-in": dict(module_path=b, at="input", item=("context", 0)),
                 **{f"txt-{s}": r for s, r in stream("context_block").items()},
                 "txt-out": None if block.context_block.pre_only else dict(module_path=b, item=0),
                 "map": dict(module_path=f"{b}.x_block.attn.ln_q", key_path=f"{b}.x_block.attn.ln_k",
                             layout="bnhd", text_query_path=f"{b}.context_block.attn.ln_q",
                             text_key_path=f"{b}.context_block.attn.ln_k", attention_path=f"{b}.x_block.attn")}
        if block.x_block.x_block_self_attn:
            second = f"{b}.x_block.attn2"
            reads.update({"attn2-norm-out": dict(module_path=f"{second}.qkv", at="input"),
                          "attn2-q": dict(module_path=f"{second}.ln_q", layout="bnhd"),
                          "attn2-k": dict(module_path=f"{second}.ln_k", layout="bnhd"),
                          "attn2-v": dict(module_path=f"{second}.qkv", part=(2, 3)),
                          "attn2-self-map": dict(module_path=f"{second}.ln_q", key_path=f"{second}.ln_k",
                                                 layout="bnhd", attention_path=second),
                          "attn2-attn-out": dict(module_path=f"{second}.proj")})
        blocks.append(_present(reads))
    return DitLayout(
        ends={"in": dict(module_path="", kind="input"),
              "embed": dict(module_path="joint_blocks.0", kind="tokens", at="input", item=("x", 1)),
              "out": dict(module_path="", kind="spatial")},
        blocks=blocks, common=dict(grid_path="", grid_divisor=int(net.patch_size), text_path="context_embedder"))


FAMILY = Family(
    name="sd3", description="Stable Diffusion 3 medium, 3.5 medium / large / large-turbo (MMDiT, CLIP-L + CLIP-G "
                            "(+ T5-XXL))",
    denoiser="transformer", native_size=1024,
    # diffusers' StableDiffusion3Pipeline: CLIP-L and CLIP-G penultimate hidden states side by side (768 + 1280,
    # zero-padded to T5's 4096) for 77 tokens, then T5's 256 tokens after them in the sequence: 333 text tokens; the
    # pooled projection is both CLIPs' pooled embeddings side by side (768 + 1280). Without T5, its tokens are zeros.
    text_encoders=(TextEncoder("clip", 768, pad="<|endoftext|>", use="both"),
                   TextEncoder("clip", 1280, pad="!", use="both"),
                   TextEncoder("t5", 4096, window=256, optional=True)),
    text_tokens=77 + 256,
    penultimate_text=True,  # the pipeline takes both CLIPs' penultimate hidden states (clip_skip None)
    presets={
        # Ours, not validated: we know of no paper that picks SD3 layers for dense features. Image outputs of
        # three blocks at 37-47 % of SD3.5 large's depth (DiT features are known to peak mid-depth); these blocks
        # exist in every SD3 variant (the medium models have 24 blocks).
        "practical": ("vit-block14-out", "vit-block16-out", "vit-block18-out"),
        # The last block's image output (of SD3.5 large, the catalog's model), as for PixArt.
        "legacy": ("vit-block37-out",),
    },
    vae_float32=True, latent_format="SD3", comfy_configs=("SD3",),
    # a bare diffusion model (Load Diffusion Model's file) also has PixArt's x_embedder: the second mark makes sd3
    # the family with more marks, all matching
    checkpoint_marks=(r"(model\.diffusion_model\.)?joint_blocks\.0\.context_block\.attn\.qkv\.weight$",
                      r"(model\.diffusion_model\.)?x_embedder\.proj\.weight$"),
    # sd3.5_large.safetensors & co: the MMDiT is read from the file (whatever else it holds), the text encoders,
    # tokenizers and VAE come from components (a diffusers folder, or clip_l / clip_g (/ t5xxl) and VAE files)
    single_file=False, transformer_file=True,
    networks={"SD3Transformer2DModel": diffusers_layout, "MMDiT": native_layout,
              "OpenAISignatureMMDITWrapper": native_layout},
    # diffusers' SD3Transformer2DModel takes the timestep as sigma * 1000 and patches the latent itself; no guidance
    # embedding (classifier-free guidance only); StableDiffusion3Pipeline lets the scheduler space the timesteps.
    flow=True, timestep_scale=1.0,
    sampling=Sampling(28, 7.0, "StableDiffusion3Pipeline's __call__ defaults"),
)

"""Flux.2 (dev; Klein 4B / 9B share the architecture at other depths and widths): double-stream blocks (image and
text apart, joint attention) then single-stream blocks ([text, image] as one sequence), QK-norm, a 4-axis rotary
embedding, SwiGLU MLPs, no biases, and one AdaLN modulation per block kind computed once for the whole network
(double blocks' image stream, their text stream, single blocks) instead of one per block.

Block ids count the double blocks first (Flux.2 dev: 0-7), then the single ones (8-55). The ids mean:
- `in` / `out`: the block's residual stream entering / leaving it (single blocks: the joint sequence split by the
  text length).
- `norm-out`: the attention's input, (1 + scale) * LayerNorm(in) + shift with the shared modulation's first chunks.
- `q` / `k`: after the RMS QK-norm, before the rotary embedding; `v`: the value projection (single blocks: its part
  of the fused q | k | v | MLP-input linear).
- `attn-out`: double blocks, the output projection (before gate and residual); single blocks fuse that projection
  with the MLP's output linear, so there it is the attention's output before that fused linear (as for Flux.1).
- `ffn-inner`: the SwiGLU's output, silu(gate) * up: the MLP's hidden activation.
- reference images (Flux.2's editing: their tokens after the generated image's in the image stream): image ids read
  the generated image's tokens only (span "grid"; in single blocks "image"), self-maps its keys only; reference I's
  tokens are `vit-block{B}-ref{I}-...` on its own grid (diffusers: from img_ids, axis 0 = 10 (I + 1); ComfyUI:
  from ref_latents).
Each block's "modulation" read is [shift | scale] of its image stream's first AdaLN: columns of the shared
modulation linear (the same tensor for every block of a kind).

diffusers takes the latent patchified (2x2, 128 channels) and flattened outside the model, so its image grid is the
latent's (H/8, W/8) halved: the caller passes token_grid = (H/8, W/8) and dit-in / dit-out are the 128-channel
(H/16, W/16) latent, which is ComfyUI's Flux.2 latent itself.
"""
from __future__ import annotations

import torch

from . import flux
from ..hooks import pack_tokens
from .dit_layout import DitLayout, axis4_position_ids, joint
from .family import Family, Sampling, TextEncoder

_SHARED_MODULATION = "double_stream_modulation_img"  # a Flux.2 network has it on both backends; Flux.1 does not


def diffusers_layout(model: torch.nn.Module) -> DitLayout:
    """diffusers' Flux2Transformer2DModel: separate q/k/v linears per stream in double blocks (Flux2Attention), one
    fused to_qkv_mlp_proj in single blocks (Flux2ParallelSelfAttention); the modulation and the norm are applied
    inline, so norm-out is the attention module's input; blocks return (text, image); single blocks get the joint
    sequence as hidden_states."""
    blocks = []
    width = model.inner_dim
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        norm_out = tuple(dict(module_path=f"{b}.attn", at="input", item=item)
                         for item in (("hidden_states", 0), ("encoder_hidden_states", 1)))
        reads = flux.diffusers_double(b, norm_out, ("ff.act_fn", "ff_context.act_fn"))
        reads["modulation"] = dict(module_path="double_stream_modulation_img.linear", columns=(0, 2 * width))
        blocks.append(reads)
    for i in range(len(model.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        reads = joint({"in": dict(module_path=b, at="input", item=("hidden_states", 0)),
                       "norm-out": dict(module_path=f"{b}.attn", at="input", item=("hidden_states", 0)),
                       "q": dict(module_path=f"{b}.attn.norm_q", layout="bnhd"),
                       "k": dict(module_path=f"{b}.attn.norm_k", layout="bnhd"),
                       "v": dict(module_path=f"{b}.attn.to_qkv_mlp_proj", columns=(2 * width, 3 * width)),
                       "attn-out": dict(module_path=f"{b}.attn.to_out", at="input", columns=(0, width)),
                       "ffn-inner": dict(module_path=f"{b}.attn.mlp_act_fn"),
                       "out": dict(module_path=b)}, flux.STREAM_SUFFIXES)
        reads["map"] = dict(module_path=f"{b}.attn.norm_q", key_path=f"{b}.attn.norm_k", layout="bnhd",
                            rope="diffusers", rope_path=f"{b}.attn", rope_arg=("image_rotary_emb", 2),
                            attention_path=f"{b}.attn")
        reads["modulation"] = dict(module_path="single_stream_modulation.linear", columns=(0, 2 * width))
        blocks.append(reads)
    patch = 2  # the pipeline's 2x2 patchify of the VAE latent, outside the model (its _patchify_latents)
    return DitLayout(
        ends={"in": dict(module_path="", kind="tokens", at="input", item=("hidden_states", 0), span="grid"),
              "embed": dict(module_path="x_embedder", kind="tokens", span="grid"),
              "out": dict(module_path="", kind="tokens", span="grid")},
        blocks=blocks, common=dict(grid_path=None, grid_divisor=patch, text_path="context_embedder",
                                   ref_read=("ids", "img_ids", 3)))  # axis 0 of reference i: 10 (i + 1)


def native_layout(net: torch.nn.Module) -> DitLayout | None:
    """ComfyUI's Flux class with global modulation (how newer ComfyUIs build Flux.2; v0.3.64 has no Flux.2): the
    same double / single block classes as Flux.1's, so Flux.1's reads, with each block's modulation taken from the
    network's shared Modulation linears. None for a Flux.1 network (the same class name: flux.py reads it)."""
    if getattr(net, _SHARED_MODULATION, None) is None:
        return None
    layout = flux.comfy_flux_layout(net)
    width, double = int(net.hidden_size), len(net.double_blocks)
    for b, reads in enumerate(layout.blocks):
        shared = "double_stream_modulation_img.lin" if b < double else "single_stream_modulation.lin"
        reads["modulation"] = dict(module_path=shared, columns=(0, 2 * width))
    return layout


def comfy_missing(net: torch.nn.Module) -> str | None:
    """What a ComfyUI network of a Flux.2 MODEL lacks for the taps (None: nothing): Flux.2's shared modulation,
    which only a ComfyUI that builds Flux.2 gives its Flux class (v0.3.64 has no Flux.2)."""
    if getattr(net, _SHARED_MODULATION, None) is not None:
        return None
    return "ComfyUI's Flux network with Flux.2's shared modulation (a ComfyUI with Flux.2, newer than v0.3.64)"


def network_inputs(denoiser: torch.nn.Module, x_t: torch.Tensor, sigma: float, cond_kwargs: dict,
                   guidance) -> dict:
    """diffusers' Flux2Transformer2DModel's inputs as Flux2Pipeline makes them: the latent's 2x2 patches as tokens
    (its _patchify_latents + _pack_latents), 4-axis position ids, the timestep sigma (the pipeline's t / 1000) and
    the guidance embedding's input."""
    param = next(denoiser.parameters())
    batch, _, h, w = x_t.shape
    img_ids, txt_ids = axis4_position_ids(h // 2, w // 2, cond_kwargs["encoder_hidden_states"].shape[1], param.device)
    kwargs = dict(cond_kwargs, hidden_states=pack_tokens(x_t, 2), img_ids=img_ids, txt_ids=txt_ids,
                  timestep=torch.full((batch,), sigma * 1000, device=param.device, dtype=param.dtype) / 1000)
    if guidance is not None:
        kwargs["guidance"] = torch.full((batch,), guidance, device=param.device, dtype=torch.float32)
    return kwargs


def empirical_mu(image_tokens: int, steps: int) -> float:
    """Flux2Pipeline's resolution shift mu (its compute_empirical_mu): fitted in the image's token count and the
    number of steps, not the scheduler config's line."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_tokens, steps)


KLEIN = Sampling(50, 4.0, "Flux2KleinPipeline's __call__ defaults (Klein base: true CFG, guidance_scale 4)")
KLEIN_DISTILLED = Sampling(4, 1.0, "Flux.2 Klein step-distilled (model_index is_distilled): its model card's 4 "
                                   "steps, guidance_scale 1")


def sampling_variant(denoiser_config, scheduler_config: dict, pipeline: dict) -> Sampling | None:
    """Flux.2 Klein, told from dev by its transformer's missing guidance embedding: the base model's defaults, or the
    step-distilled one's where its folder's model_index.json says is_distilled (Flux2KleinPipeline then runs no CFG)."""
    if denoiser_config.get("guidance_embeds", True):
        return None
    return KLEIN_DISTILLED if pipeline.get("is_distilled") else KLEIN


FAMILY = Family(
    name="flux2", description="Flux.2 dev (DiT, Mistral Small 3.1 text encoder) and Klein (Qwen3 text encoder)",
    denoiser="transformer", native_size=1024,
    # diffusers' Flux2Pipeline: the hidden states of Mistral3's layers 10, 20 and 30 (width 5120 each) side by side
    # per token, for 512 tokens (max_sequence_length). Klein uses Qwen3 (layers 9, 18, 27) instead.
    text_encoders=(TextEncoder("mistral3", 3 * 5120, layers=(10, 20, 30)),), text_tokens=512,
    # Klein (Flux2KleinPipeline), chosen by a folder's Qwen3 text encoder: Qwen3's layers 9, 18, 27 side by side,
    # its chat template with thinking off, all 512 tokens kept (padding included, unmasked). Width: Klein 4B's
    # Qwen3-4B (2560; 9B's Qwen3-8B: 4096); no Klein transformer's guidance embedding (guidance_embeds false).
    text_variants={"qwen3": (TextEncoder("qwen3", 3 * 2560, layers=(9, 18, 27), thinking=False,
                                         keep_padding=True),)},
    presets={
        # Ours, not validated: no paper picks Flux.2 layers yet. The input of the single block at the relative depth
        # of DiTF's Flux.1 choice (block 28 of 57 there; 27 of 56 here).
        "practical": ("vit-block27-in",),
        # DiTF's transform (engine/dit_transforms) of that input: its massive-activation channels zeroed, then its
        # AdaLN with the shared single-stream modulation. Ours, not validated on Flux.2.
        "ditf": ("vit-block27-in",),
        # The last double block's image output, as for Flux.1.
        "legacy": ("vit-block7-out",),
        # Unvalidated until a study picks layers: every 8th block's output and attention input.
        "sweep": tuple(f"vit-block{b}-{s}" for b in range(0, 56, 8) for s in ("norm-out", "out")),
    },
    vae_float32=True, latent_format="Flux2", comfy_configs=("Flux2",),
    # ComfyUI / BFL files: the shared modulation exists in Flux.2 only; Flux.1's double-block mark as well, so the
    # most specific family wins (families.registry.family_of_checkpoint).
    checkpoint_marks=(r"(model\.diffusion_model\.)?double_blocks\.0\.img_attn\.qkv\.weight$",
                      r"(model\.diffusion_model\.)?double_stream_modulation_img\.lin\.weight$"),
    single_file=False,  # until DF_MODEL loads DiT checkpoints
    native=False,  # until the native backend maps ComfyUI's Flux.2 (and only ComfyUIs that have it)
    networks={"Flux2Transformer2DModel": diffusers_layout, "Flux": native_layout}, comfy_missing=comfy_missing,
    # Flux2Pipeline: the VAE latent normalised by the VAE's batch-norm statistics (engine/latent_scaling), 2x2
    # patches packed as tokens, timestep sigma, guidance embedding 4.0 (its default guidance_scale), sigmas
    # linspace(1, 1 / steps) shifted by its empirical mu. Flux2KleinPipeline samples the same way without the
    # guidance embedding (a Klein transformer has none, so guidance_of gives None); its guidance_scale is classifier-
    # free guidance over the empty prompt, i.e. our cfg. It ignores guidance_scale for a step-distilled Klein
    # (is_distilled), whose default cfg here is 1 likewise; a cfg > 1 given explicitly still runs CFG here.
    flow=True, timestep_scale=1 / 1000, latent_patch=2, guidance=4.0, linspace_sigmas=True,
    network_inputs=network_inputs, sampling_mu=empirical_mu, reference_images=True,
    # Flux2Pipeline's __call__: 50 steps, guidance_scale 4 into the embedding (Family.guidance); no true CFG
    sampling=Sampling(50, 1.0, "Flux2Pipeline's __call__ defaults (Flux.2 dev: guidance 4 embedded)"),
    sampling_variant=sampling_variant,
)

"""A family's denoiser without weights, and inputs for one forward of a denoiser: shapes for free."""
from __future__ import annotations

import torch

from ..tap import is_pixart
from .dit_layout import axis4_position_ids
from .registry import FAMILIES, get_family


def denoiser_from_config(config: dict, device: str | torch.device = "meta") -> torch.nn.Module:
    """Instantiate a denoiser of one of the families' classes from its diffusers config (random or empty
    weights)."""
    import diffusers

    known = sorted({f.denoiser_config()["_class_name"] for f in FAMILIES.values()})
    if config.get("_class_name") not in known:
        raise ValueError(f"denoiser class {config.get('_class_name')!r} is not one of the families' "
                         f"({', '.join(known)})")
    with torch.device(device):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def meta_denoiser(family: str) -> torch.nn.Module:
    """The family's full-size denoiser on the meta device: every module and shape, no memory, no weights."""
    return denoiser_from_config(get_family(family).denoiser_config(), "meta")


def patch_position_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h * w, 3) position ids of a grid of latent patches, (0, row, column), as diffusers' FluxPipeline makes
    them (zeros on the meta device, where nothing can be written)."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    if ids.device.type != "meta":
        ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
        ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def dummy_inputs(model: torch.nn.Module, height: int, width: int, *, batch: int = 1, text_tokens: int = 77,
                 timestep: int = 500, device=None, dtype=None, generator=None) -> dict:
    """Keyword arguments for one forward of `model` on a latent of height x width pixels (divided by 8).

    Random normal values (zeros on the meta device); SDXL-type UNets also get pooled text embeds and time ids.
    """
    cfg = model.config
    param = next(model.parameters())
    device = device if device is not None else param.device
    dtype = dtype if dtype is not None else param.dtype

    def rand(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device, dtype)

    if height % 8 or width % 8:
        raise ValueError(f"image size {height}x{width} must be a multiple of 8 on both sides (the VAE's factor)")
    h, w = height // 8, width // 8
    kwargs = {"timestep": torch.full((batch,), timestep, device=device, dtype=torch.long)}
    if type(model).__name__ == "FluxTransformer2DModel":  # packed 2x2 patches with their positions
        ph, pw = h // 2, w // 2
        kwargs.update(hidden_states=rand(batch, ph * pw, cfg.in_channels),
                      encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
                      pooled_projections=rand(batch, cfg.pooled_projection_dim),
                      img_ids=patch_position_ids(ph, pw, device, torch.float32),
                      txt_ids=torch.zeros(text_tokens, 3, device=device), timestep=kwargs["timestep"].to(dtype) / 1000)
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return kwargs
    if type(model).__name__ == "Flux2Transformer2DModel":  # 2x2-patchified latent tokens, 4-axis positions
        ph, pw = h // 2, w // 2
        img_ids, txt_ids = axis4_position_ids(ph, pw, text_tokens, device)
        kwargs.update(hidden_states=rand(batch, ph * pw, cfg.in_channels),
                      encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
                      img_ids=img_ids, txt_ids=txt_ids, timestep=kwargs["timestep"].to(dtype) / 1000)
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 4.0, device=device, dtype=dtype)
        return kwargs
    if type(model).__name__ == "SD3Transformer2DModel":  # the latent itself; text and pooled text as the pipeline's
        kwargs.update(hidden_states=rand(batch, cfg.in_channels, h, w),
                      encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
                      pooled_projections=rand(batch, cfg.pooled_projection_dim))
        return kwargs
    if type(model).__name__ == "QwenImageTransformer2DModel":  # packed 2x2 patches; the grid as img_shapes says it
        ph, pw = h // 2, w // 2
        kwargs.update(hidden_states=rand(batch, ph * pw, cfg.in_channels),
                      encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
                      img_shapes=[[(1, ph, pw)]] * batch, timestep=kwargs["timestep"].to(dtype) / 1000)
        return kwargs
    if type(model).__name__ == "ZImageTransformer2DModel":  # lists of per-sample latents (C, 1, h, w) and captions
        kwargs = {"x": [rand(cfg.in_channels, 1, h, w) for _ in range(batch)],
                  "t": (1000 - kwargs["timestep"].to(dtype)) / 1000,  # as its pipeline turns t into the model's
                  "cap_feats": [rand(text_tokens, cfg.cap_feat_dim) for _ in range(batch)]}
        return kwargs
    if is_pixart(model):
        kwargs["hidden_states"] = rand(batch, cfg.in_channels, h, w)
        kwargs["encoder_hidden_states"] = rand(batch, text_tokens, cfg.caption_channels)
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kwargs
    kwargs["sample"] = rand(batch, cfg.in_channels, h, w)
    kwargs["encoder_hidden_states"] = rand(batch, text_tokens, cfg.cross_attention_dim)
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": rand(batch, 6)}
    return kwargs


def _comfy_flux_inputs(net: torch.nn.Module, h: int, w: int, text_tokens: int, empty) -> tuple[tuple, dict]:
    """ComfyUI's Flux (comfy/ldm/flux/model.py): the unpacked latent, t in 0..1, T5 tokens, CLIP's pooled vector
    and (dev) the guidance value, as model_base.Flux hands them over."""
    kwargs = {"context": empty(1, text_tokens, net.txt_in.in_features), "y": empty(1, net.params.vec_in_dim)}
    if native_takes_guidance(net):
        kwargs["guidance"] = empty(1)
    return (empty(1, net.params.in_channels, h, w), empty(1)), kwargs


def _comfy_qwen_inputs(net: torch.nn.Module, h: int, w: int, text_tokens: int, empty) -> tuple[tuple, dict]:
    """ComfyUI's Qwen-Image (comfy/ldm/qwen_image/model.py): its 5-D latent (B, C, 1, H, W) (the Wan 2.1 latent
    format's; the sampler adds the frame axis to a 4-D one), t in 0..1 and Qwen2.5-VL's hidden states, as
    model_base.QwenImage hands them over (no Edit reference: native/shapes.py adds references of the latent's size
    where reference ids are asked)."""
    channels = net.in_channels // (net.patch_size * net.patch_size)  # img_in takes 2x2 patches of the latent
    return (empty(1, channels, 1, h, w), empty(1)), {"context": empty(1, text_tokens, net.txt_in.in_features)}


def _comfy_mmdit_inputs(net: torch.nn.Module, h: int, w: int, text_tokens: int, empty) -> tuple[tuple, dict]:
    """ComfyUI's SD3 network (comfy/ldm/modules/diffusionmodules/mmdit.py): the latent, t on the 0-1000 scale,
    the text tokens (CLIP-L + CLIP-G + T5 side by side) and the pooled CLIP vector where the network embeds one,
    as model_base.SD3 hands them over; no guidance."""
    kwargs = {"context": empty(1, text_tokens, net.context_embedder.in_features)}
    if net.y_embedder is not None:
        kwargs["y"] = empty(1, net.y_embedder.mlp[0].in_features)
    return (empty(1, net.in_channels, h, w), empty(1)), kwargs


def _comfy_nextdit_inputs(net: torch.nn.Module, h: int, w: int, text_tokens: int, empty) -> tuple[tuple, dict]:
    """ComfyUI's NextDiT (comfy/ldm/lumina/model.py: Lumina2, and Z-Image in newer ComfyUIs): the latent, t in 0..1
    (it embeds 1 - t), the text encoder's hidden states and their token count (num_tokens: model_base.Lumina2 hands
    over the attention mask's sum; without a mask every token counts), as model_base.Lumina2 hands them over."""
    kwargs = {"context": empty(1, text_tokens, net.cap_embedder[1].in_features), "num_tokens": text_tokens}
    return (empty(1, net.in_channels, h, w), empty(1)), kwargs


# ComfyUI's diffusion-transformer classes (as families' `networks` name them) -> their forward's inputs. Only
# ComfyUI's networks are looked up here (diffusers' QwenImageTransformer2DModel, of the same name, goes through
# dummy_inputs).
_COMFY_INPUTS = {"Flux": _comfy_flux_inputs, "QwenImageTransformer2DModel": _comfy_qwen_inputs,
                 "MMDiT": _comfy_mmdit_inputs, "OpenAISignatureMMDITWrapper": _comfy_mmdit_inputs,
                 "NextDiT": _comfy_nextdit_inputs}


def native_dummy_inputs(net: torch.nn.Module, latent_hw: tuple[int, int], text_tokens: int,
                        empty) -> tuple[tuple, dict] | None:
    """(args, kwargs) for one forward of a ComfyUI diffusion transformer on a latent of latent_hw (None: not one of
    those). empty(*shape): the tensor factory (the caller's dtype, device and fake-tensor mode)."""
    make = _COMFY_INPUTS.get(type(net).__name__)
    return None if make is None else make(net, *latent_hw, text_tokens, empty)


def native_takes_guidance(net: torch.nn.Module) -> bool:
    """A ComfyUI network with a guidance embedding (Flux dev; not schnell): its forward reads `guidance`."""
    return type(net).__name__ == "Flux" and bool(net.params.guidance_embed)

"""The model families we know: their denoiser architecture (shipped diffusers configs, JSON only), native size and
text length, and how to build a weightless copy on the meta device (shapes without weights)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DiffusionFeatureError, echo
from .taps import is_pixart

CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str  # the diffusers subfolder of the denoiser: "unet" or "transformer"
    native_size: int  # the side, in pixels, the shipped catalog's shapes are computed at
    text_tokens: int  # tokens the text encoder hands the denoiser (cross-map's last axis)
    description: str

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.name

    def denoiser_config(self) -> dict:
        return json.loads((self.config_dir / self.denoiser / "config.json").read_text())


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "unet", 512, 77, "Stable Diffusion 1.x (CLIP-L)"),
    Family("sd21", "unet", 768, 77, "Stable Diffusion 2.x (OpenCLIP-H); 768 is the v-model's size, the base is 512"),
    Family("sdxl", "unet", 1024, 77, "Stable Diffusion XL (CLIP-L + OpenCLIP-bigG)"),
    Family("playground-v2", "unet", 1024, 77, "Playground v2 (the SDXL UNet)"),
    Family("pixart-sigma", "transformer", 1024, 300, "PixArt-Sigma (DiT, T5 with 300 tokens)"),
)}


class UnknownFamilyError(DiffusionFeatureError, ValueError):
    pass


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown family {echo(name)}; valid families: {', '.join(FAMILIES)}") from None


def denoiser_from_config(config: dict, device: str | torch.device = "meta") -> torch.nn.Module:
    """Instantiate a denoiser from its diffusers config (random or empty weights)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    classes = {"UNet2DConditionModel": UNet2DConditionModel, "PixArtTransformer2DModel": PixArtTransformer2DModel}
    cls = classes[config["_class_name"]]
    with torch.device(device):
        return cls.from_config(config)


def meta_denoiser(family: str) -> torch.nn.Module:
    """The family's full-size denoiser on the meta device: every module and shape, no memory, no weights."""
    return denoiser_from_config(get_family(family).denoiser_config(), "meta")


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

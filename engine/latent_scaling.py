"""The VAE's latents <-> the denoiser's latents, as each family's pipeline scales them: one place for every path
(extraction, generation's img2img start, decoding). Read from the VAE's own config: an SD / Flux VAE scales by
scaling_factor after subtracting shift_factor."""
from __future__ import annotations

import torch


def to_denoiser(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (the posterior's sample or mean) -> the latents the denoiser takes."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def to_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of to_denoiser: the denoiser's latents -> what the VAE decodes."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift

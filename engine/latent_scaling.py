"""The VAE's latents <-> the denoiser's latents, as each family's pipeline scales them: one place for every path
(extraction, generation's img2img start, decoding). Read from the VAE's own config/class: an SD / Flux VAE scales by
scaling_factor after subtracting shift_factor; Flux.2's VAE (a batch-norm over its 2x2-patchified latent) is
normalised by that batch-norm's running statistics in the patchified space, as Flux2Pipeline does. Its latents stay
at the VAE's resolution here (normalised, then un-patchified): the network's 2x2 packing (Family.latent_patch) takes
the same patches the pipeline's _patchify_latents does, in the same (channel, row, column) order."""
from __future__ import annotations

import torch

from ..layer_catalog.hooks import pack_tokens, unpack_tokens


def _batch_norm_stats(vae):
    """(mean, std) of a VAE with a latent batch-norm (Flux.2's), as (1, C * p * p, 1, 1), or None."""
    bn = getattr(vae, "bn", None)
    if not isinstance(bn, torch.nn.BatchNorm2d):
        return None
    eps = vae.config.batch_norm_eps
    return bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps)


def _patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * p * p, H / p, W / p): the packed tokens laid back on their grid."""
    b, _, h, w = z.shape
    return pack_tokens(z, p).transpose(1, 2).reshape(b, -1, h // p, w // p)


def _unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    return unpack_tokens("the latent", z.flatten(2).transpose(1, 2), tuple(z.shape[-2:]), p)


def to_denoiser(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (the posterior's sample or mean) -> the latents the denoiser takes."""
    stats = _batch_norm_stats(vae)
    if stats is not None:
        p = int(vae.config.patch_size[0])
        mean, std = (s.to(latents.device, latents.dtype) for s in stats)
        return _unpatchify((_patchify(latents, p) - mean) / std, p)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def to_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of to_denoiser: the denoiser's latents -> what the VAE decodes."""
    stats = _batch_norm_stats(vae)
    if stats is not None:
        p = int(vae.config.patch_size[0])
        mean, std = (s.to(latents.device, latents.dtype) for s in stats)
        return _unpatchify(_patchify(latents, p) * std + mean, p)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift

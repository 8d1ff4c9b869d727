"""The VAE's latents <-> the denoiser's latents, as each family's pipeline scales them: one place for every path
(extraction, generation's img2img start, decoding). Read from the VAE's own config: an SD / Flux VAE scales by
scaling_factor after subtracting shift_factor; a VAE with per-channel statistics (Qwen-Image's
AutoencoderKLQwenImage: latents_mean / latents_std) standardises each channel, as QwenImagePipeline does.

Video-shaped VAEs (Qwen-Image's, a Wan 2.1 VAE: 3-D convolutions, its config says `temperal_downsample`) take
(B, C, frames, H, W); every path here hands them one frame and gives back the 4-D (B, C, H, W) the rest of the
engine knows (encode_posterior, decode, latent_channels, downscale).

Flux.2's VAE (a batch-norm over its 2x2-patchified latent) is normalised by that batch-norm's running statistics in
the patchified space, as Flux2Pipeline does. Its latents stay at the VAE's resolution here (normalised, then
un-patchified): the network's 2x2 packing (Family.latent_patch) takes the same patches the pipeline's
_patchify_latents does, in the same (channel, row, column) order."""
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


def _channel_stats(vae, latents: torch.Tensor):
    """(mean, std) broadcastable over latents (B, C, ...), or None for a VAE without per-channel statistics."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean)) + (1,) * (latents.ndim - 2)
    return (torch.tensor(mean).view(shape).to(latents.device, latents.dtype),
            torch.tensor(std).view(shape).to(latents.device, latents.dtype))


def to_denoiser(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (the posterior's sample or mean) -> the latents the denoiser takes."""
    stats = _channel_stats(vae, latents)
    if stats is not None:
        return (latents - stats[0]) / stats[1]
    norm = _batch_norm_stats(vae)
    if norm is not None:
        p = int(vae.config.patch_size[0])
        mean, std = (s.to(latents.device, latents.dtype) for s in norm)
        return _unpatchify((_patchify(latents, p) - mean) / std, p)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def to_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of to_denoiser: the denoiser's latents -> what the VAE decodes."""
    stats = _channel_stats(vae, latents)
    if stats is not None:
        return latents * stats[1] + stats[0]
    norm = _batch_norm_stats(vae)
    if norm is not None:
        p = int(vae.config.patch_size[0])
        mean, std = (s.to(latents.device, latents.dtype) for s in norm)
        return _unpatchify(_patchify(latents, p) * std + mean, p)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift


def is_video(vae) -> bool:
    """A VAE of 3-D convolutions that takes (B, C, frames, H, W)."""
    return getattr(vae.config, "temperal_downsample", None) is not None


def latent_channels(vae) -> int:
    return int(vae.config.z_dim if is_video(vae) else vae.config.latent_channels)


def downscale(vae) -> int:
    """Pixels per latent pixel along a side: 2 per downsampling level."""
    levels = len(vae.config.temperal_downsample) if is_video(vae) else len(vae.config.block_out_channels) - 1
    return 2 ** levels


def encode_posterior(vae, pixels: torch.Tensor):
    """vae.encode(pixels (B, 3, H, W)).latent_dist with its mean and std as (B, C, h, w), whatever the VAE's shape:
    (mean, std)."""
    if not is_video(vae):
        dist = vae.encode(pixels).latent_dist
        return dist.mean, dist.std
    dist = vae.encode(pixels[:, :, None]).latent_dist
    return dist.mean[:, :, 0], dist.std[:, :, 0]


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode of latents z (B, C, h, w) as the VAE takes them (after to_vae): pixels (B, 3, H, W) in [-1, 1]."""
    if not is_video(vae):
        return vae.decode(z, return_dict=False)[0]
    return vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]

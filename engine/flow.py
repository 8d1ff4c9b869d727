"""Rectified-flow transformers on DF_MODEL (the families with `flow`: Flux, SD3): their noise and their forward
inputs.

t stays the 0..999 training timestep of every family. For a flow family sigma = t / 1000 and
x_t = (1 - sigma) x0 + sigma eps, with eps from the seeded draw every extraction uses (schedule.seeded_eps). No
resolution shift unless asked: `shift` a number s maps sigma to s sigma / (1 + (s - 1) sigma) (SD3's scheduler
shift), "resolution" to Flux's image-size dependent shift (mu from the image's token count as the scheduler config
says, sigma -> e^mu / (e^mu + 1 / sigma - 1), as FluxPipeline samples; only for the families whose scheduler
shifts dynamically). What the network is given per family comes from its Family: the timestep scale, 2x2 latent
packing with position ids (diffusers' FluxPipeline layout), the guidance embedding's default (none: SD3).
"""
from __future__ import annotations

import math

import torch

from ..layer_catalog import get_family
from ..layer_catalog.errors import echo
from ..layer_catalog.families import family_names, spoken
from ..layer_catalog.families.meta import patch_position_ids
from ..layer_catalog.hooks import pack_tokens, unpack_tokens
from .schedule import NUM_TRAIN_TIMESTEPS, seeded_eps

RESOLUTION_SHIFT = "resolution"


def flow_families() -> list[str]:
    return list(family_names(lambda f: f.flow))


def require_ddpm(family: str, what: str, error=ValueError) -> None:
    """Refuse a tool built on the DDPM schedule (DDIM inversion, PnP, denoise_from, generation) for a flow family,
    naming the families it works on."""
    if get_family(family).flow:
        raise error(f"{what} works on the {spoken(family_names(lambda f: not f.flow))} families, not {family}")


def check_options(family: str, shift, guidance) -> None:
    """Refuse shift / guidance where they mean nothing, and values that are not ones."""
    fam = get_family(family) if family is not None else None
    if guidance is not None and (fam is None or fam.guidance is None):
        raise ValueError(f"guidance applies to the families with a guidance embedding "
                         f"({', '.join(family_names(lambda f: f.guidance is not None))}), not {family or 'this model'}"
                         "; leave it unset")
    if fam is None or not fam.flow:
        if shift is not None:
            raise ValueError(f"shift applies to the flow-matching families ({', '.join(flow_families())}), "
                             f"not {family or 'this model'}; leave it unset")
        return
    scheduler = fam.config("scheduler", "scheduler_config.json")
    if shift == RESOLUTION_SHIFT and not scheduler.get("use_dynamic_shifting"):
        raise ValueError(f"shift {RESOLUTION_SHIFT!r} is the image-size shift of {spoken(_dynamic_families())}, not "
                         f"{family}: give a number (its scheduler shifts by {scheduler.get('shift', 1.0)}) or leave "
                         "it unset")
    if shift is not None and shift != RESOLUTION_SHIFT and (
            isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf):
        raise ValueError(f"shift must be a number > 0 or {RESOLUTION_SHIFT!r} (or unset: sigma = t / 1000), got "
                         f"{echo(shift)}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise ValueError(f"guidance must be a number (the guidance embedding's input), got {echo(guidance)}")


def _dynamic_families() -> list[str]:
    return list(family_names(lambda f: f.flow and f.config("scheduler", "scheduler_config.json").get(
        "use_dynamic_shifting", False)))


def resolution_mu(scheduler_config: dict, image_tokens: int) -> float:
    """Flux's resolution shift mu: linear in the image's token count, between the scheduler config's base and
    max shifts at its base and max sequence lengths."""
    cfg = scheduler_config
    lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    return base + (top - base) * (image_tokens - lo) / (hi - lo)


def image_tokens(family: str, latent_hw) -> int:
    p = get_family(family).latent_patch
    return (latent_hw[0] // p) * (latent_hw[1] // p)


def parse_shift(text: str):
    """The CLI's --shift: 'resolution' or a number > 0."""
    if text == RESOLUTION_SHIFT:
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise ValueError(f"--shift must be a number > 0 or {RESOLUTION_SHIFT!r}, got {echo(text)}")
    return value


def sigma_of(t: int, shift=None, *, scheduler_config: dict | None = None, image_tokens: int | None = None
             ) -> tuple[float, dict]:
    """sigma of timestep t under `shift`, and what to record of it in the features' metadata."""
    sigma = t / NUM_TRAIN_TIMESTEPS
    if shift is None or sigma == 0:
        return sigma, {"sigma": sigma, "shift": shift}
    if shift == RESOLUTION_SHIFT:
        mu = resolution_mu(scheduler_config or {}, image_tokens)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
        return shifted, {"sigma": shifted, "shift": shift, "mu": mu}
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    return shifted, {"sigma": shifted, "shift": float(shift)}


def settings(family: str, denoiser, t: int, shift, guidance, scheduler_config: dict, latent_hw) -> tuple:
    """(sigma, the guidance input, the metadata of both) of one flow extraction at t on a latent of latent_hw."""
    check_options(family, shift, guidance)
    sigma, meta = sigma_of(t, shift, scheduler_config=scheduler_config, image_tokens=image_tokens(family, latent_hw))
    value = guidance_of(family, denoiser, guidance)
    return sigma, value, dict(meta, guidance=value)


def flow_noise(x0: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, eps = seeded_eps(seed) (the same draw for every image of the batch)."""
    eps = seeded_eps(x0.shape[1:], seed).to(x0.device)
    return ((1.0 - sigma) * x0.float() + sigma * eps).to(x0.dtype)


def token_side(family: str, denoiser) -> int:
    """Latent pixels per side of one image token: the patches packed outside the network (Flux's, Flux.2's,
    Qwen-Image's, whose config's patch_size names those same patches) or else those its own patch embedding takes
    (SD3's, PixArt's; Z-Image's first of all_patch_size, the one its pipeline uses); 1 for a UNet."""
    packed = get_family(family).latent_patch
    if packed > 1:
        return packed
    cfg = denoiser.config
    return cfg.get("patch_size") or (cfg.get("all_patch_size") or [1])[0]


def check_latent(family: str, latent_hw, denoiser) -> None:
    """The latent's sides must hold whole patches of a patching family."""
    p = token_side(family, denoiser)
    if latent_hw[0] % p or latent_hw[1] % p:
        raise ValueError(f"{family} takes {p}x{p} latent patches: the image's sides must be multiples of {8 * p} "
                         f"pixels, got {latent_hw[1] * 8}x{latent_hw[0] * 8}")


def guidance_of(family: str, denoiser, guidance) -> float | None:
    """The guidance embedding's input: the given value or the family's default, for a network that has one
    (Flux-dev; schnell has none and refuses a value)."""
    has = bool(getattr(denoiser.config, "guidance_embeds", False))
    if not has:
        if guidance is not None:
            raise ValueError(f"this {family} network has no guidance embedding (e.g. Flux schnell): leave guidance "
                             "unset")
        return None
    return float(get_family(family).guidance if guidance is None else guidance)


def forward_kwargs(family: str, denoiser, x_t: torch.Tensor, sigma: float, cond_kwargs: dict,
                   guidance: float | None) -> dict:
    """The network's keyword arguments for latents x_t (B, C, H, W) at sigma: the conditioning's, plus the
    timestep in the network's own scale, packed latents with their position ids, and the guidance input."""
    fam = get_family(family)
    if fam.network_inputs is not None:
        return fam.network_inputs(denoiser, x_t, sigma, cond_kwargs, guidance)
    param = next(denoiser.parameters())
    batch = x_t.shape[0]
    kwargs = dict(cond_kwargs, timestep=torch.full((batch,), sigma * (NUM_TRAIN_TIMESTEPS * fam.timestep_scale),
                                                   device=param.device, dtype=param.dtype))
    p = fam.latent_patch
    if p > 1:
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p
        tokens = kwargs["encoder_hidden_states"].shape[1]
        kwargs.update(hidden_states=pack_tokens(x_t, p), img_ids=patch_position_ids(h, w, param.device, param.dtype),
                      txt_ids=torch.zeros(tokens, 3, device=param.device, dtype=param.dtype))
    else:
        kwargs["hidden_states"] = x_t
    if guidance is not None:
        kwargs["guidance"] = torch.full((batch,), guidance, device=param.device, dtype=torch.float32)
    return kwargs


FLOW_SCHEDULERS = ("euler", "checkpoint")  # generate(scheduler=) names that mean flow-match Euler here


def flow_scheduler(family: str, scheduler_config: dict, name: str, steps: int, latent_hw, device):
    """A new FlowMatchEulerDiscreteScheduler on the checkpoint's config with the family pipeline's timesteps:
    FluxPipeline's sigmas linspace(1, 1 / steps) where the family says so (linspace_sigmas), else the scheduler's
    own spacing (StableDiffusion3Pipeline); shifted by the image-size mu when the config shifts dynamically."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name not in FLOW_SCHEDULERS:
        raise ValueError(f"{family} samples with flow-match Euler: scheduler must be one of "
                         f"{', '.join(FLOW_SCHEDULERS)}, got {echo(name)}")
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    fam = get_family(family)
    tokens = image_tokens(family, latent_hw)
    mu = None
    if sched.config.use_dynamic_shifting:
        mu = fam.sampling_mu(tokens, steps) if fam.sampling_mu else resolution_mu(scheduler_config, tokens)
    sigmas = np.linspace(1.0, 1 / steps, steps) if get_family(family).linspace_sigmas else None
    sched.set_timesteps(steps, sigmas=sigmas, device=device, mu=mu)
    return sched


def unpack_output(family: str, out: torch.Tensor, latent_hw) -> torch.Tensor:
    """The network's prediction as a latent (B, C, H, W): unpacked from p x p patches where the family packs."""
    fam = get_family(family)
    if fam.network_output is not None:
        return fam.network_output(out, latent_hw)
    p = fam.latent_patch
    if p == 1:
        return out
    return unpack_tokens("the prediction", out, (latent_hw[0] // p, latent_hw[1] // p), p)

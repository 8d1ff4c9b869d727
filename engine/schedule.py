"""Training timesteps and their noise: t is the index 0..999 of the checkpoint's training schedule, and
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps whatever sampler the checkpoint ships with."""
from __future__ import annotations

import re

import torch

from ..layer_catalog.errors import echo

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """abar_t for t = 0..999 from a checkpoint's scheduler config (its beta schedule), in float64."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    config = {k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None}
    abar = DDPMScheduler.from_config(config).alphas_cumprod.double()
    if abar.shape[0] != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the scheduler has {abar.shape[0]} training timesteps; expected {NUM_TRAIN_TIMESTEPS}")
    return abar


def check_timestep(t) -> int:
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"t must be an integer training timestep in 0..{NUM_TRAIN_TIMESTEPS - 1}, got {echo(t)}")
    return t


def denoise_schedule(t: int, denoise_from: int | None, denoise_steps: int, *, off: str = "") -> list[int]:
    """The timesteps of one extraction's forwards: [t], or denoise_from down to t in `denoise_steps` DDIM steps.
    Raises ValueError for a denoise_from not above t or steps that do not fit. off: how the caller's widget turns
    denoising off, appended to the message (the native node: " (0: off)")."""
    from .ddim import descending_timesteps

    if denoise_from is None:
        return [t]
    check_timestep(denoise_from)
    if denoise_from <= t:
        raise ValueError(f"denoise_from ({denoise_from}) must be above t ({t}): it is the timestep the guided "
                         f"denoising starts from before capturing at t{off}")
    return descending_timesteps(denoise_from, t, denoise_steps)


def seeded_eps(shape, seed: int) -> torch.Tensor:
    """The noise of one draw: float32 from a CPU generator seeded by `seed`, one sample's `shape` (every image of a
    batch gets the same draw, so an image's features never depend on its batch). Both backends draw it here."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def noise_latents(x0: torch.Tensor, t: int, abar: torch.Tensor, seed: int) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps = seeded_eps(seed)."""
    eps = seeded_eps(x0.shape[1:], seed)
    a = abar[t].item()
    x_t = a ** 0.5 * x0.float() + (1.0 - a) ** 0.5 * eps.to(x0.device)
    return x_t.to(x0.dtype)


def parse_timesteps(text: str) -> list[int]:
    """"25,50,100" -> [25, 50, 100], order kept: the timesteps of one multi-t pass (the CLI's --t).

    Refused with a ValueError that names the entry: an empty list or entry, a non-integer, a value outside
    0..999, a duplicate (it would write the same features twice under one name)."""
    if not isinstance(text, str):
        raise ValueError(f"timesteps must be given as text such as '25,50,100', got a {type(text).__name__}")
    entries = [e.strip() for e in text.split(",")]
    if not text.strip():
        raise ValueError("no timesteps given: write one or more integers in 0..999 separated by commas, "
                         "e.g. '25,50,100'")
    out: list[int] = []
    for position, entry in enumerate(entries, 1):
        if not entry:
            raise ValueError(f"timestep entry {position} of {echo(text)} is empty: write integers in 0..999 "
                             "separated by single commas, e.g. '25,50,100'")
        if not re.fullmatch(r"[+-]?[0-9]+", entry):  # int() would also take '5_0' and non-ASCII digits
            raise ValueError(f"timestep {echo(entry)} (entry {position} of {echo(text)}) is not an integer: timesteps "
                             f"are training timestep indices 0..{NUM_TRAIN_TIMESTEPS - 1}")
        value = int(entry)
        if not 0 <= value < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"timestep {echo(entry)} (entry {position} of {echo(text)}) is outside "
                             f"0..{NUM_TRAIN_TIMESTEPS - 1}, the training timestep indices")
        if value in out:
            raise ValueError(f"timestep {value} appears twice in {echo(text)}: give each timestep once")
        out.append(value)
    return out


def check_timesteps(timesteps) -> list[int]:
    """A sequence of timesteps for one pass as a list: each a valid t, no duplicates, at least one."""
    if isinstance(timesteps, (str, bytes)) or not hasattr(timesteps, "__iter__"):
        raise ValueError(f"timesteps must be a sequence of integers such as [25, 50, 100], got {echo(timesteps)} "
                         "(parse text with parse_timesteps)")
    out = [check_timestep(t) for t in timesteps]
    if not out:
        raise ValueError("no timesteps given: pass one or more integers in 0..999")
    seen = set()
    for t in out:
        if t in seen:
            raise ValueError(f"timestep {t} appears twice in {list(out)}: give each timestep once")
        seen.add(t)
    return out

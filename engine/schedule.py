"""Training timesteps and their noise: t is the index 0..999 of the checkpoint's training schedule, and
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps whatever sampler the checkpoint ships with."""
from __future__ import annotations

import torch

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
        raise ValueError(f"t must be an integer training timestep in 0..{NUM_TRAIN_TIMESTEPS - 1}, got {t!r}")
    return t


def noise_latents(x0: torch.Tensor, t: int, abar: torch.Tensor, seed: int) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps from a CPU generator seeded by `seed`."""
    eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    a = abar[t].item()
    x_t = a ** 0.5 * x0.float() + (1.0 - a) ** 0.5 * eps.to(x0.device)
    return x_t.to(x0.dtype)

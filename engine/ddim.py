"""Deterministic DDIM moves between training timesteps, in closed form.

A denoiser output at x_t gives (x0, eps) with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; moving to another
timestep s keeps both: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps. Going down (s < t) is a DDIM sampling step
(eta = 0); going up (s > t) is a DDIM inversion step. s = -1 means the clean end (abar = 1).
Used by extraction's denoise_from and by inversion.
"""
from __future__ import annotations

import torch

from ..layer_catalog.errors import echo

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def eps_output(output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """The prediction part of a denoiser output: PixArt's learned-sigma models return [eps, variance] on channels."""
    return output[:, :latent_channels] if output.shape[1] == 2 * latent_channels else output


def split_at(output: torch.Tensor, x_t: torch.Tensor, a: float, prediction_type: str = "epsilon"):
    """(x0, eps) implied by a denoiser `output` at a latent of noise level abar = a, in float32 at least."""
    sa, sb = a ** 0.5, (1.0 - a) ** 0.5
    wide = torch.promote_types(torch.promote_types(output.dtype, x_t.dtype), torch.float32)
    out, x = output.to(wide), x_t.to(wide)
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    raise ValueError(f"unknown prediction type {echo(prediction_type)}; valid: {', '.join(PREDICTION_TYPES)}")


def ddim_move(x_t: torch.Tensor, output: torch.Tensor, t: int, s: int, abar: torch.Tensor,
              prediction_type: str = "epsilon") -> torch.Tensor:
    """x_s from x_t and the denoiser's output at t (sampling when s < t, inversion when s > t)."""
    a_s = 1.0 if s < 0 else float(abar[s])
    return move_between(x_t, output, float(abar[t]), a_s, prediction_type)


def move_between(x: torch.Tensor, output: torch.Tensor, a_from: float, a_to: float,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """The same move written with the noise levels abar of both ends: x lives at a_from, and the denoiser's output
    is read as a prediction there. DDIM inversion (as in Plug-and-Play and null-text inversion) calls the
    denoiser with the *next* timestep on a latent of the previous one; this is the move it then makes."""
    x0, eps = split_at(output, x, a_from, prediction_type)
    return (a_to ** 0.5 * x0 + (1.0 - a_to) ** 0.5 * eps).to(x.dtype)


def descending_timesteps(start: int, stop: int, steps: int) -> list[int]:
    """`steps + 1` integer timesteps from `start` down to `stop`, evenly spaced and strictly decreasing."""
    if steps < 1:
        raise ValueError(f"the number of denoising steps must be >= 1, got {steps}")
    if start - stop < steps:
        raise ValueError(f"{steps} denoising steps do not fit between timesteps {start} and {stop}")
    return [round(start - (start - stop) * k / steps) for k in range(steps + 1)]

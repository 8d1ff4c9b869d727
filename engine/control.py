"""ControlNet guidance attached to a conditioning, and the residuals it adds to a UNet call.

A ControlHint travels inside DF_CONDITIONING (Conditioning.controls), so any node that takes a conditioning honours
it: generation applies each hint during its [start, end) fraction of the steps, as diffusers' pipelines do;
extraction applies every hint to each of its forwards (start/end are fractions of a generation's steps). Several
hints add their residuals, like diffusers' MultiControlNet.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layer_catalog.errors import DiffusionFeatureError, echo


class ControlError(DiffusionFeatureError, ValueError):
    """A bad ControlNet setting; the message names it and what would be valid."""


@dataclass(frozen=True)
class ControlHint:
    controlnet: object  # nodes.controlnet.ControlNet
    image: torch.Tensor  # (1 or B, 3, H, W) float32 in [0, 1], on the CPU
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, steps: int) -> bool:
        """Whether the hint acts at generation step `step` of `steps` (diffusers' control_guidance_start/end)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def comfy_image_to_control(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> (B, 3, H, W) float32 on the CPU (grey or RGBA images made RGB)."""
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ControlError(f"the control image must be an IMAGE tensor [B, H, W, C], got {shape}")
    x = image[..., :3] if image.shape[-1] != 1 else image.expand(*image.shape[:-1], 3)
    return x.permute(0, 3, 1, 2).float().clamp(0, 1).cpu().contiguous()


def _as_pixels(image) -> torch.Tensor:
    """A control image as (B, 3, H, W) in [0, 1]: a ComfyUI IMAGE [B, H, W, C], a (B, 3, H, W) tensor or PIL."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        import numpy as np

        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
    if torch.is_tensor(image) and image.ndim == 4 and image.shape[-1] not in (1, 3, 4) and image.shape[1] == 3:
        return image.float().clamp(0, 1).cpu().contiguous()
    return comfy_image_to_control(image)


def attach_control(cond, controlnet, image: torch.Tensor, strength: float = 1.0, start: float = 0.0,
                   end: float = 1.0):
    """A copy of `cond` with one more ControlNet hint (the input conditioning is unchanged)."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength < 0:
        raise ControlError(f"ControlNet strength must be a finite number >= 0, got {echo(strength)}")
    if not (0.0 <= start < end <= 1.0):
        raise ControlError(f"ControlNet start/end must satisfy 0 <= start < end <= 1 (fractions of the steps), "
                           f"got start={start}, end={end}")
    pixels = _as_pixels(image)
    hint = ControlHint(controlnet, pixels, float(strength), float(start), float(end))
    return dataclasses.replace(cond, controls=tuple(cond.controls) + (hint,))


def check_controls(cond, model) -> None:
    """Refuse, before anything runs, ControlNets that cannot drive this model's denoiser."""
    if not getattr(cond, "controls", ()):
        return
    from .controlnet import check_compatible

    for hint in cond.controls:
        check_compatible(hint.controlnet, model)


def _control_image(hint: ControlHint, rows: int, height: int, width: int, device, dtype) -> torch.Tensor:
    image = hint.image
    if tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    n = image.shape[0]
    if n != 1 and rows % n:
        raise ControlError(f"{n} control images for a batch of {rows}: give one control image or one per image")
    image = image.expand(rows, *image.shape[1:]) if n == 1 else image.repeat(rows // n, 1, 1, 1)
    return image.to(device=device, dtype=dtype)


def control_residuals(controls, sample: torch.Tensor, timestep, forward_kwargs: dict, *, step: int | None = None,
                      steps: int | None = None) -> dict:
    """Summed ControlNet residuals for one UNet call, as keyword arguments for it ({} when no hint acts).

    sample: the UNet's latent input (rows = the call's batch, e.g. [uncond, cond] under CFG; a control image per
    image is repeated for each branch). step/steps: the generation step, for start/end; None in extraction.
    """
    down, mid = None, None
    height, width = sample.shape[-2] * 8, sample.shape[-1] * 8
    for hint in controls:
        if hint.strength == 0 or (step is not None and not hint.active(step, steps)):
            continue
        net = hint.controlnet.module
        param = next(net.parameters())
        image = _control_image(hint, sample.shape[0], height, width, param.device, param.dtype)
        kwargs = {"encoder_hidden_states": forward_kwargs["encoder_hidden_states"].to(param.device, param.dtype)}
        if forward_kwargs.get("added_cond_kwargs") is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(param.device, param.dtype)
                                           for k, v in forward_kwargs["added_cond_kwargs"].items()}
        d, m = net(sample.to(param.device, param.dtype), timestep, controlnet_cond=image,
                   conditioning_scale=hint.strength, return_dict=False, **kwargs)
        d = [x.to(sample.device, sample.dtype) for x in d]
        m = m.to(sample.device, sample.dtype)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

"""DDIM inversion of a real image: the latent at every step of the schedule, for Plug-and-Play translation.

The image is VAE-encoded (posterior mean) and walked up the DDIM schedule of `steps` steps with the conditional
prediction of a prompt (empty by default), as Plug-and-Play and null-text inversion do: the denoiser is called
with the next timestep on the current latent, and the implied (x0, eps) are moved to the next noise level. Every
latent is kept (on the CPU). With `check=True` the last latent is sampled back down the same schedule and the
reconstruction error is reported: DDIM inversion is exact only in the limit of small steps, so it is never zero.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from ..layer_catalog import FeatureCapture, resolve_taps
from ..layer_catalog.errors import DiffusionFeatureError, echo
from ..layer_catalog.tap import is_pixart
from .ddim import eps_output, move_between
from .conditioning import Conditioning, with_time_ids
from .extraction import _pixels, encode_latents
from .flow import require_ddpm
from .interrupts import InterruptChecks
from .samplers import make_scheduler, parse_capture_steps
from .timeline import Timeline


class InversionError(DiffusionFeatureError, ValueError):
    """An inversion that does not fit the model or the request; the message says which and why."""


def fingerprint(model) -> str:
    """Which weights an inversion was made with: family, denoiser config, a checksum of its first weight, LoRAs."""
    param = next(model.denoiser.parameters())
    config = json.dumps(dict(model.denoiser.config), sort_keys=True, default=str)
    loras = [(getattr(lora, "path", ""), sm, sc) for lora, sm, sc in getattr(model, "loras", ())]
    raw = f"{model.family}|{config}|{param.double().sum().item():.12e}|{param.numel()}|{loras}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class Inversion:
    """DF_INVERSION: the latents of one image along a DDIM schedule, and what made them."""

    latents: torch.Tensor  # (steps + 1, C, h, w), CPU float32: the clean latent, then one per timestep
    timesteps: list[int]  # the schedule's timesteps in inversion order (ascending)
    conditioning: Conditioning  # the inversion prompt's, with time ids for the size
    prompt: str
    family: str
    size: tuple[int, int]  # (height, width) in pixels
    fingerprint: str
    image: torch.Tensor  # the input as inverted: IMAGE (1, H, W, 3)
    reconstruction: torch.Tensor | None = None  # IMAGE sampled back from the last latent
    error: dict = field(default_factory=dict)  # latent_rmse, image_mae, psnr of the reconstruction
    features: object | None = None  # Features captured on the way (rows = inversion steps)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def latent_at(self, t: int) -> torch.Tensor:
        """The inverted latent at schedule timestep t, (1, C, h, w)."""
        return self.latents[self.timesteps.index(int(t)) + 1][None]

    def check_model(self, model) -> None:
        """Refuse a model or an inversion that do not belong together (family, weights, latent size)."""
        h, w = self.latents.shape[-2:]
        if (h * 8, w * 8) != tuple(self.size):
            raise InversionError(f"this inversion's latents of {h}x{w} do not fit its {self.size[0]}x{self.size[1]} "
                                 "image: it was altered or built by hand wrongly")
        if model.family != self.family:
            raise InversionError(f"this inversion was made with a {self.family} model; the model given is "
                                 f"{model.family}: invert the image with the model that translates it")
        if fingerprint(model) != self.fingerprint:
            raise InversionError("this inversion was made with other weights (another checkpoint, or other LoRAs) "
                                 "than the model given: invert the image with the model that translates it")

    def __repr__(self) -> str:
        return (f"Inversion({self.family}, {self.size[1]}x{self.size[0]}, {self.steps} steps, prompt="
                f"{self.prompt!r}, error={self.error})")


def _schedule(model, steps: int):
    if not isinstance(steps, int) or steps < 1:
        raise InversionError(f"steps must be an integer >= 1, got {echo(steps)}")
    sched = make_scheduler(model.scheduler_config, "ddim")
    sched.set_timesteps(steps)
    return sched


def _call(denoiser, x, t: int, kwargs: dict, run=None):
    """The denoiser's output at (x, t); `run` is the callable to go through (a FeatureCapture's run, capturing)."""
    timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    name = "hidden_states" if is_pixart(denoiser) else "sample"
    return (run or denoiser)(**{name: x}, timestep=timestep, return_dict=False, **kwargs)[0]


@torch.no_grad()
def invert(model, image, prompt="", steps: int = 50, *, resize: str = "keep-aspect", size=None, check: bool = True,
           layers=None, capture_steps="", on_step=None, interrupt=None) -> Inversion:
    """Invert one image (a path, PIL image or IMAGE tensor of one image) with DDIM; see the module docstring.

    layers / capture_steps: capture these taps at these inversion steps (a timeline of the inversion).
    on_step(i, total) runs after each step (progress, interrupts); interrupt, before each block of the denoiser and
    the VAE (raise to stop a long forward). Refused before any forward when the memory plan (every latent, every
    captured feature, one forward's peak) does not fit (FeatureMemoryError). Returns an Inversion.
    """
    from .features_io import Features, size_meta
    from .generation import check_generation, decode
    from .lora import lora_applied
    from .prompts import encode_prompt

    if not isinstance(prompt, (str, Conditioning)):
        raise InversionError("the inversion prompt must be a string (empty by default) or a conditioning")
    require_ddpm(model.family, "DDIM inversion", InversionError)
    sched = _schedule(model, steps)
    pixels, _ = _pixels(image, model.native_size, resize, size)
    if pixels.shape[0] != 1:
        raise InversionError(f"invert one image at a time, got a batch of {pixels.shape[0]}")
    height, width = (int(v) for v in pixels.shape[-2:])
    denoiser = model.denoiser
    param = next(denoiser.parameters())
    prediction = model.scheduler_config.get("prediction_type") or "epsilon"
    final = float(sched.final_alpha_cumprod)
    abar = sched.alphas_cumprod
    ascending = [int(t) for t in reversed(sched.timesteps)]
    capture_at = set(parse_capture_steps(capture_steps, len(ascending)))
    with lora_applied(model):
        cond = prompt if isinstance(prompt, Conditioning) else encode_prompt(model, prompt)
        cond = with_time_ids(cond, height, width)
        kwargs = cond.for_batch(1, param.device, param.dtype)
        taps = resolve_taps(layers, denoiser, model.family) if layers and capture_at else []
        h, w = height // 8, width // 8
        channels = denoiser.config.in_channels
        check_generation(model, taps, 1, 1 if taps else 0, len(capture_at), height, width,
                         cond.encoder_hidden_states.shape[1], offload=True, images=1 if check else 0, encode=1,
                         extra=(("cpu", f"{len(ascending) + 1} inverted latents",
                                 (len(ascending) + 1) * channels * h * w * 4),),
                         subject=f"inverting a {width}x{height} image in {len(ascending)} steps")
        with InterruptChecks(interrupt, model.vae):
            x0 = encode_latents(model.vae, pixels, 0, sample=False).to(param.device, param.dtype)
        capture = FeatureCapture(denoiser, taps, device="cpu")  # without taps: attaches nothing, runs the denoiser
        timeline = Timeline(capture, len(capture_at), 1)
        latents = torch.empty((len(ascending) + 1, *x0.shape[1:]), dtype=torch.float32)  # no final concatenation
        latents[0] = x0[0].float().cpu()
        x, a_prev = x0, final
        with capture, InterruptChecks(interrupt, denoiser):
            for i, t in enumerate(ascending):
                capture.enabled = bool(taps) and i in capture_at
                out = _call(denoiser, x, t, kwargs, capture.run)
                if capture.enabled:
                    timeline.record([{"step": i, "timestep": float(t), "branch": "inversion", "image": 0}])
                # the prediction was made for timestep t on a latent of a_prev: it is read there (see ddim.py)
                a_t = float(abar[t])
                x = move_between(x, eps_output(out, x.shape[1]), a_prev, a_t, prediction)
                a_prev = a_t
                latents[i + 1] = x[0].float().cpu()
                if on_step is not None:
                    on_step(i, len(ascending) * (2 if check else 1))
        inversion = Inversion(latents, ascending, cond, prompt if isinstance(prompt, str) else
                              " | ".join(cond.prompts), model.family, (height, width), fingerprint(model),
                              (pixels.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1).cpu())
        if taps:
            inversion.features = Features(timeline.tensors(),
                                          {"family": model.family, **size_meta(height, width), "prompt": cond.prompts,
                                           "layers": [t.id for t in taps], "scheduler": "ddim",
                                           "steps": len(ascending),
                                           "rows": timeline.labels})
        if check:
            with InterruptChecks(interrupt, denoiser):
                recon = sample_back(model, inversion, kwargs, on_step=None if on_step is None else
                                    (lambda i, _n: on_step(len(ascending) + i, 2 * len(ascending))))
            inversion.reconstruction = decode(model.vae, recon, interrupt=interrupt)
            rmse = (recon.float().cpu() - inversion.latents[:1]).pow(2).mean().sqrt().item()
            mae = (inversion.reconstruction - inversion.image).abs().mean().item()
            mse = (inversion.reconstruction - inversion.image).pow(2).mean().item()
            psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
            inversion.error = {"latent_rmse": rmse, "image_mae": mae, "psnr": psnr}
    return inversion


def sample_back(model, inversion: Inversion, kwargs: dict, on_step=None) -> torch.Tensor:
    """DDIM sampling from the inversion's last latent down its schedule with the same prompt (no guidance)."""
    denoiser = model.denoiser
    param = next(denoiser.parameters())
    prediction = model.scheduler_config.get("prediction_type") or "epsilon"
    sched = _schedule(model, inversion.steps)
    abar, final = sched.alphas_cumprod, float(sched.final_alpha_cumprod)
    x = inversion.latents[-1:].to(param.device, param.dtype)
    descending = list(reversed(inversion.timesteps))
    for i, t in enumerate(descending):
        out = eps_output(_call(denoiser, x, t, kwargs), x.shape[1])
        a_next = float(abar[descending[i + 1]]) if i + 1 < len(descending) else final
        x = move_between(x, out, float(abar[t]), a_next, prediction)
        if on_step is not None:
            on_step(i, len(descending))
    return x

"""Plug-and-Play translation (Tumanyan et al., CVPR 2023) on the hook engine.

From an Inversion of a real image, DDIM-sample new images for target prompts while the source image's features
are injected: one batch [source, (negative x K), target x K] per step, where the source row is the inverted latent
of that step with the inversion prompt. For the first `feature_threshold` of the steps, the residual features of
`feature_layers` (default: the decoder block the original calls "output block 4") are replaced in every row by the
source's; for the first `attention_threshold`, so are the self-attention queries and keys of `attention_layers`
(default: the decoder's self-attention blocks). Injection goes through FeatureInjection hooks on those taps: no
forward is patched, and nothing remains on the model after the run.

Negative prompting as in the original: the unconditional embedding of step i is w_i * empty + (1 - w_i) *
negative, with w = alpha * schedule (linear: 1 -> 0, constant: 1, exp: exp(-6 s)); alpha = 1 with the constant
schedule is no negative prompting. The negative prompt defaults to the inversion prompt.
"""
from __future__ import annotations

import numpy as np
import torch

from ..layer_catalog import FeatureCapture, FeatureInjection, enumerate_ids, get_family, resolve_taps
from ..layer_catalog.families import family_names, spoken
from ..layer_catalog.errors import DiffusionFeatureError, echo
from .ddim import eps_output
from .conditioning import with_time_ids
from .generation import Generation, _stack_kwargs, check_generation, decode
from .interrupts import InterruptChecks
from .inversion import Inversion, InversionError, _schedule
from .samplers import parse_capture_steps
from .timeline import Timeline

NEGATIVE_SCHEDULES = ("constant", "linear", "exp")
CAPTURE_BRANCHES = ("cond", "uncond", "both", "all")


class PnPError(DiffusionFeatureError, ValueError):
    """A bad Plug-and-Play setting; the message names it and what would be valid."""


def default_feature_layers(family: str) -> list[str]:
    layers = get_family(family).pnp_feature_layers
    if not layers:
        raise PnPError(f"Plug-and-Play runs on {spoken(family_names(lambda f: f.pnp_feature_layers))} UNets, "
                       f"not {family}")
    return list(layers)


def default_attention_layers(model) -> list[str]:
    """The decoder's self-attention queries and keys, less the family's exception (for SD1.x/2.x the first one,
    as the original)."""
    ids = [i for i in enumerate_ids(model.denoiser) if i.startswith("up-") and i.endswith(("-self-q", "-self-k"))]
    skip = get_family(model.family).pnp_attention_skip
    return [i for i in ids if not (skip and i.startswith(skip))]


def negative_weights(alpha: float, schedule: str, steps: int) -> np.ndarray:
    """w_i of the unconditional embedding w * empty + (1 - w) * negative, per step."""
    if schedule not in NEGATIVE_SCHEDULES:
        raise PnPError(f"negative_schedule must be one of {', '.join(NEGATIVE_SCHEDULES)}, got {echo(schedule)}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise PnPError(f"negative_alpha must be in 0..1 (1: no negative prompting, lower: stronger), got {echo(alpha)}")
    if schedule == "linear":
        base = np.linspace(1.0, 0.0, steps)
    elif schedule == "exp":
        base = np.exp(-6.0 * np.linspace(0.0, 1.0, steps))
    else:
        base = np.ones(steps)
    return base * alpha


def _threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PnPError(f"{name} must be a fraction of the steps in 0..1, got {echo(value)}")
    return float(value)


def _mix(a: dict, b: dict, w: float) -> dict:
    """Forward kwargs of w * a + (1 - w) * b (embeddings and pooled embeddings; time ids are equal)."""
    out = {"encoder_hidden_states": w * a["encoder_hidden_states"] + (1 - w) * b["encoder_hidden_states"]}
    if a.get("added_cond_kwargs") is not None:
        out["added_cond_kwargs"] = {k: (w * v + (1 - w) * b["added_cond_kwargs"][k]) if k == "text_embeds" else v
                                    for k, v in a["added_cond_kwargs"].items()}
    return out


def _stack(parts: list[dict]) -> dict:
    """The rows' forward kwargs as one batch; refused when their token counts differ (one forward per step)."""
    if len({p["encoder_hidden_states"].shape[1] for p in parts}) != 1:
        raise PnPError("the inversion prompt, the target prompts and the negative prompt must fit one text window "
                       "each (75 CLIP tokens) so they run as one batch; shorten the longer ones")
    return _stack_kwargs(parts)


@torch.no_grad()
def translate(model, inversion: Inversion, prompts, *, cfg: float = 7.5, feature_threshold: float = 0.8,
              attention_threshold: float = 0.5, feature_layers=None, attention_layers=None, negative: str = "",
              negative_alpha: float = 1.0, negative_schedule: str = "constant", eta: float = 0.0, seed: int = 0,
              layers=None, capture_steps="", capture_branch: str = "cond", on_step=None,
              interrupt=None) -> Generation:
    """Translate the inverted image to each of `prompts` (see the module docstring). Returns a Generation: images
    (K, H, W, 3) in prompt order, and features captured on the way (rows: step x branch x row).

    eta: DDIM's stochasticity (0, the default and the original's: deterministic); with eta > 0 the noise of each
    step comes from a CPU generator seeded by `seed`. interrupt: a callback run before each block of the denoiser
    and the VAE (raise to stop). Refused before any forward when the memory plan does not fit (FeatureMemoryError)."""
    from .features_io import Features, size_meta
    from .generation import _negative
    from .lora import lora_applied
    from .prompts import encode_prompt

    default_feature_layers(model.family)  # a family without Plug-and-Play (the DiTs) is refused first
    if not isinstance(inversion, Inversion):
        raise PnPError(f"expected an inversion (DFInvert), got {type(inversion).__name__}")
    inversion.check_model(model)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PnPError("give one or more target prompts (strings)")
    f_thr, a_thr = _threshold("feature_threshold", feature_threshold), _threshold("attention_threshold",
                                                                                 attention_threshold)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise PnPError(f"eta must be in 0..1 (0: deterministic DDIM), got {echo(eta)}")
    if capture_branch not in CAPTURE_BRANCHES:
        raise PnPError(f"capture_branch must be one of {', '.join(CAPTURE_BRANCHES)}, got {echo(capture_branch)}")
    denoiser = model.denoiser
    param = next(denoiser.parameters())
    device, dtype = param.device, param.dtype
    feature_taps = resolve_taps(feature_layers or default_feature_layers(model.family), denoiser, model.family)
    attention_taps = resolve_taps(attention_layers or default_attention_layers(model), denoiser, model.family)
    sched = _schedule(model, inversion.steps)
    timesteps = [int(t) for t in sched.timesteps]
    if timesteps != list(reversed(inversion.timesteps)):
        raise InversionError("this inversion's schedule is not the model's DDIM schedule of the same steps")
    steps, k = len(timesteps), len(prompts)
    weights = negative_weights(negative_alpha, negative_schedule, steps)
    guided = cfg > 1.0
    height, width = inversion.size
    n_feature, n_attention = int(steps * f_thr), int(steps * a_thr)
    capture_at = set(parse_capture_steps(capture_steps, steps))
    taps = resolve_taps(layers, denoiser, model.family) if layers and capture_at else []
    rows = 1 + (2 * k if guided else k)
    names = ["source"] + (["uncond"] * k if guided else []) + ["cond"] * k
    wanted = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"],
              "all": ["source", "uncond", "cond"]}[capture_branch]
    keep = [r for r, n in enumerate(names) if n in wanted]
    if taps and not keep:
        raise PnPError(f"capture_branch {echo(capture_branch)} needs classifier-free guidance (cfg > 1)")
    kept_rows = keep[-1] - keep[0] + 1 if taps else 0
    check_generation(model, taps, rows, kept_rows, len(capture_at), height, width,
                     inversion.conditioning.encoder_hidden_states.shape[1], offload=True, images=k,
                     subject=f"translating to {k} prompt{'s' if k > 1 else ''} at {width}x{height}")

    features_inj = FeatureInjection(denoiser, feature_taps)  # checked now: nothing has run yet
    attention_inj = FeatureInjection(denoiser, attention_taps)
    with lora_applied(model):
        source = inversion.conditioning.for_batch(1, device, dtype)
        target_cond = with_time_ids(encode_prompt(model, prompts), height, width)
        targets = target_cond.for_batch(k, device, dtype)
        empty = with_time_ids(_negative(model, None, target_cond), height, width).for_batch(k, device, dtype)
        negative_text = negative or inversion.prompt
        neg = with_time_ids(encode_prompt(model, negative_text), height, width).for_batch(k, device, dtype)
        x = inversion.latents[-1:].to(device, dtype).expand(k, -1, -1, -1).clone()
        generator = torch.Generator().manual_seed(int(seed))
        # without taps the capture attaches nothing and its run is the denoiser's call: one code path
        capture = FeatureCapture(denoiser, taps, device="cpu", rows=slice(keep[0], keep[-1] + 1) if taps else None)
        timeline = Timeline(capture, len(capture_at), kept_rows)
        with features_inj, attention_inj, capture, InterruptChecks(interrupt, denoiser):
            for i, t in enumerate(timesteps):
                features_inj.enabled, attention_inj.enabled = i < n_feature, i < n_attention
                parts = [source] + ([_mix(empty, neg, float(weights[i]))] if guided else []) + [targets]
                kwargs = _stack(parts)
                latent_in = torch.cat([inversion.latent_at(t).to(device, dtype)] + [x] * (2 if guided else 1))
                latent_in = sched.scale_model_input(latent_in, t)
                call = {"sample": latent_in, "timestep": torch.tensor(t, device=device), "return_dict": False,
                        **kwargs}
                capture.enabled = bool(taps) and i in capture_at
                out = capture.run(**call)[0]
                if capture.enabled:
                    timeline.record([{"step": i, "timestep": float(t), "branch": names[r],
                                      "image": 0 if names[r] == "source" else (r - 1) % k}
                                     for r in range(keep[0], keep[-1] + 1)])
                out = eps_output(out, x.shape[1])
                if guided:
                    uncond, cond = out[1:1 + k], out[1 + k:]
                    pred = uncond + cfg * (cond - uncond)
                else:
                    pred = out[1:]
                x = sched.step(pred, t, x, eta=float(eta), generator=generator).prev_sample
                if on_step is not None:
                    on_step(i, steps, x)
        images = decode(model.vae, x, interrupt=interrupt)
    features = None
    if taps:
        tensors = timeline.tensors()
        features = Features(tensors, {"family": model.family, **size_meta(height, width), "prompt": prompts,
                                      "layers": list(tensors), "scheduler": "ddim", "steps": steps, "cfg": cfg,
                                      "seed": seed, "rows": timeline.labels})
    return Generation(images, x, features)


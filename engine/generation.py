"""Text-to-image and image-to-image generation that captures layers at chosen steps.

The loop is diffusers' own pipeline loop written out, so that the same seed gives the same image as
StableDiffusion(XL)Pipeline / PixArtSigmaPipeline / their img2img and ControlNet variants: one CPU generator seeded
with `seed` draws the initial noise (and, for image-to-image, the VAE sample first); classifier-free guidance runs
[negative, positive] as one batch when cfg > 1. What is ours: a FeatureCapture attached for the whole run and
enabled only on the capture steps, keeping the requested branch's rows; ControlNet hints from the conditioning;
LoRAs of the model merged for the run and removed after it. Every run builds its own scheduler and capture, so two
runs never share counters or history.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..layer_catalog import FeatureCapture, get_family, resolve_taps
from ..layer_catalog.families.family import Sampling
from ..layer_catalog.errors import echo
from ..layer_catalog.tap import is_pixart
from .control import check_controls, control_residuals
from .ddim import eps_output
from .dit_transforms import ditf_run
from . import memory_guard
from .memory_guard import count
from .conditioning import Conditioning, with_time_ids
from .extraction import _pixels, fits, require
from . import flow, latent_scaling
from .schedule import NUM_TRAIN_TIMESTEPS
from .interrupts import InterruptChecks
from .samplers import DEFAULT_SCHEDULER, make_scheduler, parse_capture_steps
from .timeline import Timeline

BRANCHES = ("cond", "uncond", "both")


@dataclass
class Generation:
    images: torch.Tensor  # ComfyUI IMAGE: (B, H, W, 3) float32 in 0..1, on the CPU
    latents: torch.Tensor  # the final latents (B, C, h, w), as the denoiser sees them
    features: object | None  # Features (rows = captured step x branch x image) or None when nothing was captured


def _encode(model, prompt) -> Conditioning:
    from .prompts import encode_prompt

    return prompt if isinstance(prompt, Conditioning) else encode_prompt(model, prompt)


def _negative(model, negative, positive: Conditioning) -> Conditioning:
    """The unconditional branch: a given prompt/conditioning, else the family's default (diffusers' choice):
    zeros for SDXL-type models (force_zeros_for_empty_prompt), the empty prompt otherwise."""
    if negative is not None:
        return _encode(model, negative)
    if get_family(model.family).zero_negative and model.extra.get("force_zeros_for_empty_prompt", True):
        added = {k: torch.zeros_like(v) if torch.is_tensor(v) else v
                 for k, v in (positive.added_cond_kwargs or {}).items()}
        return Conditioning(torch.zeros_like(positive.encoder_hidden_states), added or None, None, [""])
    return _encode(model, "")


def sampling_defaults(model) -> Sampling:
    """The steps and cfg a run of this model takes when none are given: its family's (its diffusers pipeline's
    defaults), or its variant's (Flux schnell, Z-Image Turbo, Flux.2 Klein; Family.sampling_variant)."""
    return get_family(model.family).sampling_defaults(model.denoiser.config, model.scheduler_config,
                                                      model.extra.get("pipeline", {}))


def sampling_settings(model, steps: int | None, cfg: float | None) -> tuple[int, float, dict]:
    """(steps, cfg, what to record) of a run: the given values, the model's defaults (sampling_defaults) for those
    left None; the record names the defaults' source and which values came from them (empty if none did)."""
    defaults = sampling_defaults(model)
    used = [name for name, value in (("steps", steps), ("cfg", cfg)) if value is None]
    record = {"sampling_defaults": {"model": defaults.model, "used": used}} if used else {}
    return (defaults.steps if steps is None else steps), (defaults.cfg if cfg is None else cfg), record


def _check_size(model, height: int, width: int) -> None:
    multiple = 8 * flow.token_side(model.family, model.denoiser)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels for {model.family}, got "
                             f"{echo(value)}")


def _batch_size(batch: int, *counts: int) -> int:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {echo(batch)}")
    for n in counts:
        if n > 1 and batch == 1:
            batch = n
        if n not in (1, batch):
            raise ValueError(f"{n} prompts or images for a batch of {batch}: give one, or one per image")
    return batch


def _stack_kwargs(parts: list[dict]) -> dict:
    """Concatenate per-branch forward kwargs along the batch ([uncond, cond], as diffusers does)."""
    out = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = {k: (torch.cat([p[key][k] for p in parts]) if torch.is_tensor(v) else v)
                        for k, v in value.items()}
        elif torch.is_tensor(value):
            out[key] = torch.cat([p[key] for p in parts])
        else:
            out[key] = value
    return out


def _passes(branches: list[tuple[str, dict]], batch: int) -> list[tuple[list[str], dict]]:
    """Group the branches into forwards: one batched forward when their token counts and inputs agree (a padding
    mask on one side only: one each), else one each."""
    tokens = {kw["encoder_hidden_states"].shape[1] for _, kw in branches}
    inputs = {tuple(sorted(kw)) for _, kw in branches}
    if len(branches) > 1 and len(tokens) == 1 and len(inputs) == 1:
        return [([name for name, _ in branches], _stack_kwargs([kw for _, kw in branches]))]
    return [([name], kw) for name, kw in branches]


@torch.no_grad()
def generate(model, positive, negative=None, *, steps: int | None = None, cfg: float | None = None, seed: int = 0,
             width: int | None = None, height: int | None = None, batch: int = 1,
             scheduler: str = DEFAULT_SCHEDULER, image=None, denoise: float = 1.0, resize: str = "keep-aspect",
             layers=None, capture_steps="", capture_branch: str = "cond", feature_resize: int = 1,
             dtype: torch.dtype | None = None, offload: bool = True, latents: torch.Tensor | None = None,
             on_step=None, interrupt=None, guidance: float | None = None) -> Generation:
    """Generate images, capturing `layers` at `capture_steps` (see samplers.parse_capture_steps).

    positive / negative: prompts or Conditionings (negative None: the family's default). cfg > 1 enables
    classifier-free guidance. steps / cfg None: the model's defaults, its diffusers pipeline's (sampling_defaults;
    recorded in the features' metadata as sampling_defaults). image + denoise: image-to-image (diffusers' strength:
    of `steps`, the last int(steps * denoise) run); without an image, text-to-image at width x height (default: the
    native size). capture_branch: "cond", "uncond" (needs cfg > 1) or "both". on_step(i, total, latents, x0) is
    called after each step (progress, previews, interrupts: raise to stop). latents: start text-to-image from these
    (1 or B, C, h, w) instead of seeded noise (e.g. an inverted image). interrupt: a callback run before each block
    of the denoiser and the VAE, so a long step can be stopped inside (raise to stop). Returns a Generation.
    A flow family (Flux, SD3) samples with flow-match Euler as its diffusers pipeline does (scheduler "euler" or
    "checkpoint"; guidance: Flux's guidance-embedding input, default the family's; cfg > 1: classifier-free
    guidance over the negative prompt, SD3's guidance_scale, on top of the embedding for Flux as FluxPipeline's
    true_cfg_scale; text-to-image only).
    Refused before any forward (FeatureMemoryError) when the run's memory plan does not fit: see check_generation.
    """
    from .features_io import Features, size_meta
    from .lora import lora_applied

    fam = get_family(model.family)
    steps, cfg, defaulted = sampling_settings(model, steps, cfg)
    flow.check_options(model.family, None, guidance)
    if image is not None:
        flow.require_ddpm(model.family, "image-to-image generation")
    if capture_branch not in BRANCHES:
        raise ValueError(f"capture_branch must be one of {', '.join(BRANCHES)}, got {echo(capture_branch)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {echo(steps)}")
    if image is not None and latents is not None:
        raise ValueError("give an image (image-to-image) or starting latents, not both")
    if image is not None and not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1] for image-to-image, got {denoise}")
    guided = cfg > 1.0
    if capture_branch != "cond" and not guided:
        raise ValueError(f"capture_branch {echo(capture_branch)} needs classifier-free guidance (cfg > 1); with cfg "
                         f"{cfg} only the conditional branch runs")
    denoiser, vae = model.denoiser, model.vae
    param = next(denoiser.parameters())
    device, model_dtype = param.device, param.dtype
    pixart = is_pixart(denoiser)
    latent_channels = denoiser.config.in_channels // fam.latent_patch ** 2  # a packing network takes p x p patches
    guidance = flow.guidance_of(model.family, denoiser, guidance) if fam.flow else None
    pixels = None
    if image is not None:
        size = (height, width) if height and width else None
        pixels, _ = _pixels(image, model.native_size, resize, None if size is None else f"{width}x{height}")
        height, width = pixels.shape[-2:]
    height = height or model.native_size
    width = width or model.native_size
    _check_size(model, height, width)

    with lora_applied(model):
        pos = with_time_ids(_encode(model, positive), height, width)
        neg = with_time_ids(_negative(model, negative, pos), height, width) if guided else None
        check_controls(pos, model)
        batch = _batch_size(batch, pos.batch, neg.batch if neg is not None else 1,
                            pixels.shape[0] if pixels is not None else 1)

        latent_hw = (height // 8, width // 8)
        if fam.flow:
            sched = flow.flow_scheduler(model.family, model.scheduler_config, scheduler, steps, latent_hw, device)
        else:
            sched = make_scheduler(model.scheduler_config, scheduler)
            sched.set_timesteps(steps, device=device)
        timesteps = sched.timesteps
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, latent_channels, height // 8, width // 8)
        if pixels is None and latents is not None:
            if latents.ndim != 4 or tuple(latents.shape[1:]) != shape[1:] or latents.shape[0] not in (1, batch):
                raise ValueError(f"starting latents must be (1 or {batch}, {', '.join(map(str, shape[1:]))}) for "
                                 f"this size, got {tuple(latents.shape)}")
            latents = latents.to(device, model_dtype).expand(batch, -1, -1, -1).clone()
        elif pixels is None:
            latents = torch.randn(shape, generator=generator, dtype=model_dtype).to(device)
            latents = latents * getattr(sched, "init_noise_sigma", 1.0)  # flow-match: pure noise at sigma 1
        else:
            run = min(int(steps * denoise), steps)
            start = max(steps - run, 0) * sched.order
            timesteps = timesteps[start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            if len(timesteps) == 0:
                raise ValueError(f"denoise {denoise} of {steps} steps runs no step; raise steps or denoise")
            vparam = next(vae.parameters())
            mean, std = latent_scaling.encode_posterior(vae, pixels.to(vparam.device, vparam.dtype))
            noise_vae = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            x0 = mean + std * noise_vae.to(mean.device)
            x0 = latent_scaling.to_denoiser(vae, x0).to(device, model_dtype)
            if x0.shape[0] != batch:  # one image for the batch: encoded (and sampled) once, as diffusers does
                x0 = torch.cat([x0] * batch)
            noise = torch.randn(shape, generator=generator, dtype=model_dtype).to(device)
            latents = sched.add_noise(x0, noise, timesteps[:1].repeat(batch))

        total = len(timesteps)
        capture_at = set(parse_capture_steps(capture_steps, total))
        taps = resolve_taps(layers, denoiser, model.family) if layers and capture_at else []
        branches = [("uncond", neg.for_batch(batch, device, model_dtype))] if guided else []
        branches.append(("cond", pos.for_batch(batch, device, model_dtype)))
        passes = _passes(branches, batch)
        tokens = max(kw["encoder_hidden_states"].shape[1] for _, kw in branches)
        kept_rows = batch * (2 if capture_branch == "both" else 1) if taps else 0
        check_generation(model, taps, batch * max(len(names) for names, _ in passes), kept_rows, len(capture_at),
                         height, width, tokens, dtype=dtype, feature_resize=feature_resize, offload=offload,
                         images=batch, encode=pixels.shape[0] if pixels is not None else 0)
        # without taps the capture attaches nothing and its run is the denoiser's call: one code path
        ditf, transform = (ditf_run(layers, denoiser, taps, feature_resize) if taps else None), {}
        capture = FeatureCapture(denoiser, ditf.taps if ditf else taps, dtype=dtype,
                                 device="cpu" if offload else None, feature_resize=1 if ditf else feature_resize,
                                 token_grid=latent_hw)
        timeline = Timeline(capture, len(capture_at), kept_rows,
                            finish=(lambda f: ditf.finish(f, transform)) if ditf else None)
        step_params = inspect.signature(sched.step).parameters  # only what this scheduler's step() takes
        step_kwargs = {k: v for k, v in (("generator", generator), ("eta", 0.0)) if k in step_params}

        with capture, InterruptChecks(interrupt, denoiser):
            for i, t in enumerate(timesteps):
                outputs = {}
                for names, kwargs in passes:
                    x_in = torch.cat([latents] * len(names))
                    if hasattr(sched, "scale_model_input"):  # flow-match schedulers feed x as it is
                        x_in = sched.scale_model_input(x_in, t)
                    extra = control_residuals(pos.controls, x_in, t, kwargs, step=i, steps=total)
                    if fam.flow:  # the scheduler's timesteps are sigma * 1000
                        call = dict(flow.forward_kwargs(model.family, denoiser, x_in, float(t) / NUM_TRAIN_TIMESTEPS,
                                                        kwargs, guidance), return_dict=False)
                    else:
                        call = _call_kwargs(pixart, x_in, t, kwargs, extra)
                    wanted = [k for k, n in enumerate(names) if capture_branch in (n, "both")]
                    capture.enabled = bool(taps and wanted) and i in capture_at
                    if capture.enabled:
                        capture.rows = slice(wanted[0] * batch, (wanted[-1] + 1) * batch)
                    out = capture.run(**call)
                    if capture.enabled:  # a diffusion transformer's rows also say where its tokens are
                        tokens = capture.token_ranges()
                        timeline.record([{"step": i, "timestep": float(t), "branch": names[k], "image": j,
                                          **({} if tokens is None else {"tokens": tokens})}
                                         for k in range(wanted[0], wanted[-1] + 1) for j in range(batch)])
                    out = eps_output(flow.unpack_output(model.family, out[0], latent_hw), latent_channels)
                    for k, name in enumerate(names):
                        outputs[name] = out[k * batch:(k + 1) * batch]
                if guided and fam.guided is not None:  # the family pipeline's own combination
                    pred = fam.guided(outputs["cond"], outputs["uncond"], cfg, latent_hw)
                elif guided:
                    pred = outputs["uncond"] + cfg * (outputs["cond"] - outputs["uncond"])
                else:
                    pred = outputs["cond"]
                result = sched.step(pred, t, latents, **step_kwargs)
                latents = result.prev_sample
                if on_step is not None:
                    on_step(i, total, latents, getattr(result, "pred_original_sample", None))

        images = decode(vae, latents, interrupt=interrupt)
    features = None
    if taps:
        tensors = timeline.tensors()
        meta = {"family": model.family, "seed": seed, **size_meta(height, width), "prompt": pos.prompts,
                "layers": list(tensors), "scheduler": scheduler, "steps": total, "cfg": cfg,
                "denoise": denoise if pixels is not None else 1.0, "rows": timeline.labels, **defaulted}
        if fam.flow:
            meta["guidance"] = guidance
        features = Features(tensors, {**meta, **transform})
    return Generation(images, latents, features)


def _call_kwargs(pixart: bool, x_in, t, kwargs: dict, extra: dict) -> dict:
    """The denoiser's keyword arguments for one call, as the family's diffusers pipeline makes them."""
    if pixart:
        timestep = t[None].to(x_in.device) if t.ndim == 0 else t
        return {"hidden_states": x_in, "timestep": timestep.expand(x_in.shape[0]), "return_dict": False, **kwargs}
    return {"sample": x_in, "timestep": t, "return_dict": False, **kwargs, **extra}


@torch.no_grad()
def decode(vae, latents: torch.Tensor, interrupt=None) -> torch.Tensor:
    """Latents -> ComfyUI IMAGE (B, H, W, 3) in 0..1 on the CPU, one image at a time (VAE decoding at full size is
    the memory peak of a run) into one output allocated up front (a concatenation would hold the images twice)."""
    vparam = next(vae.parameters())
    out = None
    with InterruptChecks(interrupt, vae):
        for i, z in enumerate(latents.split(1)):
            z = latent_scaling.to_vae(vae, z).to(vparam.device, vparam.dtype)
            x = latent_scaling.decode(vae, z)
            image = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
            if out is None:
                out = image.new_empty((latents.shape[0], *image.shape[1:]))
            out[i:i + 1] = image
    return out


GENERATE_ADVICE = "fewer layers (attention maps above all), fewer capture steps, a smaller batch, offload to the CPU"


def generation_needs(model, taps, forward_rows: int, kept_rows: int, captures: int, height: int, width: int,
                     tokens: int, *, dtype=None, feature_resize: int = 1, offload: bool = True, images: int = 1,
                     encode: int = 0, extra: tuple = ()) -> dict:
    """The memory plan of a sampling run: on the compute device the largest of one denoiser forward of
    `forward_rows` rows, one VAE decode, and the VAE encode of `encode` images (image-to-image); where features are
    kept, `kept_rows` rows of every tap at each of `captures` steps plus one step in flight; on the CPU the output
    images plus one in flight; `extra`: more (device, what, bytes) a caller keeps (an inversion's latents)."""
    param = next(model.denoiser.parameters())
    latent_hw = (height // 8, width // 8)
    cost = memory_guard.denoiser_cost(model.denoiser, taps, forward_rows, latent_hw, tokens,
                                      dtype=dtype or param.dtype, feature_resize=feature_resize)
    per_row = cost.kept // forward_rows
    peak = max(cost.peak, memory_guard.vae_decode_peak(model.vae, latent_hw))
    needs: dict = {}
    if encode:
        peak = max(peak, memory_guard.vae_encode_peak(model.vae, (height, width), encode))
        memory_guard.add(needs, "cpu", "the input pixels", encode * 3 * height * width * 4)
    memory_guard.add(needs, param.device, f"the peak of one denoiser forward of {count(forward_rows, 'row')} or the "
                     "VAE", peak)
    store = torch.device("cpu") if offload else param.device
    memory_guard.add(needs, store, f"the features of {count(captures, 'captured step')} x "
                     f"{count(kept_rows, 'row')}",
                     per_row * kept_rows * (captures + 1))
    memory_guard.add(needs, "cpu", f"{count(images, 'output image')}", (images + 1) * height * width * 3 * 4)
    for device, what, n in extra:
        memory_guard.add(needs, device, what, n)
    return needs


def check_generation(model, taps, forward_rows, kept_rows, captures, height, width, tokens, *,
                     subject: str | None = None, **kw) -> None:
    """Refuse, before anything runs, a sampling run whose memory plan does not fit, saying what would: how many
    capture steps fit, and the largest size of the same aspect that fits."""
    needs = generation_needs(model, taps, forward_rows, kept_rows, captures, height, width, tokens, **kw)
    if fits(needs):
        return
    advice = []
    if taps and captures > 1:
        most = memory_guard.largest(lambda k: k == 0 or fits(generation_needs(
            model, taps, forward_rows, kept_rows, k, height, width, tokens, **kw)), 0, captures - 1)
        advice.append(f"at most {count(most, 'capture step')} fit at this size" if most else
                      "not one capture step fits at this size")
    images = kw.get("images", 1)
    if subject is None and images > 1 and forward_rows % images == 0 and kept_rows % images == 0:
        def batch_fits(b):  # rows and kept rows grow with the batch (the same branches per image)
            more = dict(kw, images=b, encode=b if kw.get("encode") else 0)
            return fits(generation_needs(model, taps, forward_rows // images * b, kept_rows // images * b, captures,
                                         height, width, tokens, **more))
        most = memory_guard.largest(batch_fits, 1, images - 1)
        if most:
            advice.append(f"a batch of at most {most} fits")
    smaller = memory_guard.smaller_side(lambda h, w: fits(generation_needs(
        model, taps, forward_rows, kept_rows, captures, h, w, tokens, **kw)), height, width, 64)
    advice.append(f"{smaller[1]}x{smaller[0]} fits" if smaller else "even 64x64 does not fit")
    require(needs, (subject or f"generating {count(kw.get('images', 1), 'image')} of {width}x{height}")
            + (f" capturing {count(len(taps), 'layer')} at {count(captures, 'step')}" if taps else ""),
            f"{'; '.join(advice)} (or use {GENERATE_ADVICE})")

"""Extraction at a training timestep: encode -> noise -> one conditional forward -> features.

Semantics (also in the README):
- `t` is the training timestep index 0..999: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and the denoiser is
  called with timestep t, whatever scheduler the checkpoint ships (abar comes from its beta schedule).
- The VAE latent is sampled (or its posterior mean taken) and the noise drawn from CPU generators seeded by `seed`;
  every image of a call gets the same draw, so an image's features do not depend on its batch or its position.
- One conditional forward, no classifier-free guidance; it stops as soon as every requested tap has fired.
- `ensemble=N` averages the features over N noise draws (seeds seed, seed+1, ...), as DIFT does.
- Several timesteps in one pass (extract_timesteps): the VAE encodes once and the same latent x0 and the same noise
  draws serve every t, so each t's features are those of a run with that t alone, bit for bit.
- A LatentCache keeps each image's VAE posterior (mean and std) on disk; the sample drawn from it is computed as
  without the cache, so features do not change.
"""
from __future__ import annotations

import functools

import torch

from ..layer_catalog import FeatureCapture, get_family, resolve_taps
from ..layer_catalog.tap import is_pixart
from . import flow, latent_scaling, memory_guard
from .conditioning import Conditioning, with_time_ids
from .dit_transforms import ditf_run, merge_meta
from .driver import capture_dtype, check_batch_size, check_ensemble, ensemble_features, features_meta, fill_batches
from .interrupts import InterruptChecks
from .memory_guard import count
from .schedule import check_timestep, check_timesteps, denoise_schedule, noise_latents


def check_denoise_from(family: str, denoise_from) -> None:
    """denoise_from's DDIM steps need a DDPM schedule: refused for the flow families."""
    if denoise_from is not None:
        flow.require_ddpm(family, "denoise_from (DDIM steps before the capture)")


def _free_bytes(device: torch.device) -> int | None:
    """What this process can still allocate on `device` (None: unknown); every run's guard reads it here."""
    return memory_guard.available_bytes(device)


def require(needs: dict, subject: str, advice: str) -> None:
    """memory_guard.require against _free_bytes (looked up at call time, so a test or host can set it)."""
    memory_guard.require(needs, subject, advice, available=lambda device: _free_bytes(device))


def fits(needs: dict) -> bool:
    return memory_guard.shortfall(needs, available=lambda device: _free_bytes(device)) is None


EXTRACT_ADVICE = ("extract fewer layers (attention maps above all), fewer images or a smaller batch_size, offload "
                  "features to the CPU, a smaller image size, or feature_resize > 1")


def extraction_needs(denoiser, taps, batch: int, latent_hw, tokens: int, *, dtype=None, feature_resize: int = 1,
                     offload: bool = False, ensemble: int = 1, kept_images: int | None = None, in_flight: int = 0,
                     vae=None, timesteps: int = 1) -> dict:
    """The memory plan of extracting `taps`, `batch` images per forward: one forward's peak (or the VAE encoder's,
    whichever is larger) on the compute device; on the store device the features of `kept_images` images (default
    one batch) plus `in_flight` images of a batch not yet copied into the output, each at `timesteps` timesteps
    (a multi-t pass holds every t's features), and an ensemble's float32 sums (one t at a time)."""
    param = next(denoiser.parameters())
    final = dtype or param.dtype
    kept_dtype = capture_dtype(final, ensemble)
    cost = memory_guard.denoiser_cost(denoiser, taps, batch, latent_hw, tokens, dtype=kept_dtype,
                                      feature_resize=feature_resize, early_exit=True)
    per_image = cost.kept * final.itemsize // kept_dtype.itemsize // batch
    store = torch.device("cpu") if offload else param.device
    needs: dict = {}
    peak = cost.peak
    if vae is not None:
        pixel_hw = (latent_hw[0] * 8, latent_hw[1] * 8)
        peak = max(peak, memory_guard.vae_encode_peak(vae, pixel_hw, batch))
        memory_guard.add(needs, "cpu", "the batch's pixels", batch * 3 * pixel_hw[0] * pixel_hw[1] * 4)
    memory_guard.add(needs, param.device, f"the peak of one forward of {count(batch, 'image')}", peak)
    images = batch if kept_images is None else kept_images
    at = f" at {timesteps} timesteps" if timesteps > 1 else ""
    per_image *= timesteps
    memory_guard.add(needs, store, f"the features of {count(images, 'image')}{at}", per_image * images)
    memory_guard.add(needs, store, f"the features of {count(in_flight, 'image')} in flight{at}",
                     per_image * in_flight)
    if ensemble > 1:
        memory_guard.add(needs, store, "the ensemble's float32 sums", 2 * cost.kept)
    return needs


def vae_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of (B, 3, H, W) pixels in [-1, 1], unscaled, on the VAE's device and dtype:
    what a LatentCache stores, so any seed and both vae_sample settings can reuse it."""
    param = next(vae.parameters())
    mean, std = latent_scaling.encode_posterior(vae, pixels.to(param.device, param.dtype))
    # Contiguous, as a cached posterior is: the denoiser's convolutions may round differently for another layout.
    return mean.contiguous(), std.contiguous()


def latents_from_posterior(vae, mean: torch.Tensor, std: torch.Tensor, seed: int, sample: bool = True
                           ) -> torch.Tensor:
    """Scaled latents x0 from a posterior: a draw from a CPU generator seeded by `seed` (the same for every image)
    when sample=True, else the mean."""
    if sample:
        eps = torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed))
        latents = mean + std * eps.to(mean.device, mean.dtype)
    else:
        latents = mean
    return latent_scaling.to_denoiser(vae, latents)


def encode_latents(vae, pixels: torch.Tensor, seed: int, sample: bool = True, *, latent_cache=None
                   ) -> torch.Tensor:
    """VAE latents x0 of (B, 3, H, W) pixels in [-1, 1], scaled as the denoiser expects.

    sample=True draws from the posterior with a CPU generator seeded by `seed` (same draw for every image);
    sample=False takes the posterior mean. latent_cache: a LatentCache that supplies (or stores) the posterior.
    """
    if latent_cache is None:
        mean, std = vae_posterior(vae, pixels)
    else:
        mean, std = latent_cache.posterior(vae, pixels, vae_posterior)
    return latents_from_posterior(vae, mean, std, seed, sample)


def grad_mode(fn):
    """Run fn without autograd unless it is called with grad=True (gradient mode: features on the graph)."""
    @functools.wraps(fn)
    def run(*args, grad: bool = False, **kwargs):
        if not isinstance(grad, bool):
            raise ValueError(f"grad must be True or False, got {grad!r}")
        with torch.set_grad_enabled(grad):
            return fn(*args, grad=grad, **kwargs)
    return run


@grad_mode
def extract_latents(denoiser, x0: torch.Tensor, cond: Conditioning, layers, t: int, seed: int, abar: torch.Tensor,
                    *, family: str | None = None, ensemble: int = 1, feature_resize: int = 1,
                    dtype: torch.dtype | None = None, offload: bool = False, denoise_from: int | None = None,
                    denoise_steps: int = 1, prediction_type: str = "epsilon", interrupt=None, shift=None,
                    guidance: float | None = None, scheduler_config: dict | None = None,
                    transform_meta: dict | None = None, grad: bool = False) -> dict[str, torch.Tensor]:
    """Features of clean latents x0 (B, C, h, w) at timestep t: the core shared by every entry point.

    A flow family (Flux, SD3) noises x_t = (1 - sigma) x0 + sigma eps instead (abar unused; see engine/flow.py for
    sigma, `shift`, `guidance` and the network's packed inputs; `scheduler_config` gives the resolution shift).

    denoise_from: noise to this higher timestep instead and take `denoise_steps` deterministic DDIM steps down to
    t, each a conditional forward guided by the prompt and any ControlNet of `cond`, before capturing at t (the
    content-shift recipe: a ControlNet pulls the imagined content back towards the image).
    interrupt: a callback run before each block of the denoiser (it raises to stop a long forward).
    grad: gradient mode, the features stay on the autograd graph (see `extract`).
    A request naming the ditf preset gets DiTF's feature of its block inputs (engine/dit_transforms.DitfRun);
    transform_meta: a dict that receives the transform and the channels found, for the features' metadata, and a
    diffusion transformer's token ranges ("tokens": FeatureCapture.token_ranges).
    The run is refused before any forward when its memory plan does not fit (FeatureMemoryError).
    """
    from .control import control_residuals
    from .ddim import ddim_move, eps_output

    t = check_timestep(t)
    check_ensemble(ensemble)
    is_flow = family is not None and get_family(family).flow
    if is_flow:
        flow.check_latent(family, x0.shape[-2:], denoiser)
        check_denoise_from(family, denoise_from)
        sigma, guidance, _ = flow.settings(family, denoiser, t, shift, guidance, scheduler_config or {},
                                           x0.shape[-2:])
    else:
        flow.check_options(family, shift, guidance)
    schedule = denoise_schedule(t, denoise_from, denoise_steps)
    taps = resolve_taps(layers, denoiser, family)
    ditf = ditf_run(layers, denoiser, taps, feature_resize)
    if ditf is not None:  # captured unpooled with the modulations; pooled after the transform
        taps, feature_resize = ditf.taps, 1
    param = next(denoiser.parameters())
    batch = x0.shape[0]
    require(extraction_needs(denoiser, taps, batch, tuple(x0.shape[-2:]), cond.encoder_hidden_states.shape[1],
                             dtype=dtype, feature_resize=feature_resize, offload=offload, ensemble=ensemble),
            f"extracting {count(len(taps), 'layer')} from {count(batch, 'image')}", EXTRACT_ADVICE)
    kwargs = cond.for_batch(batch, param.device, param.dtype)
    sample_name = "hidden_states" if is_pixart(denoiser) else "sample"
    x0 = x0.to(param.device, param.dtype)

    def forward(capture, x, step_t):
        if is_flow:
            return capture.run(**flow.forward_kwargs(family, denoiser, x, sigma, kwargs, guidance))
        timestep = torch.full((batch,), step_t, device=param.device, dtype=torch.long)
        extra = control_residuals(cond.controls, x, timestep, kwargs)
        return capture.run(**{sample_name: x}, timestep=timestep, **kwargs, **extra)

    def draw(draw_seed):
        x_t = flow.flow_noise(x0, sigma, draw_seed) if is_flow else noise_latents(x0, schedule[0], abar, draw_seed)
        capture.enabled = False  # the denoising steps run whole and capture nothing
        for a, b in zip(schedule[:-1], schedule[1:]):
            out = eps_output(forward(capture, x_t, a)[0], x0.shape[1])
            x_t = ddim_move(x_t, out, a, b, abar, prediction_type)
        capture.enabled = True
        forward(capture, x_t, t)
        tokens = capture.token_ranges()
        if transform_meta is not None and tokens is not None:
            transform_meta["tokens"] = tokens
        return capture.features if ditf is None else ditf.finish(capture.features, transform_meta)

    with FeatureCapture(denoiser, taps, dtype=capture_dtype(dtype, ensemble), device="cpu" if offload else None,
                        feature_resize=feature_resize, early_exit=True, token_grid=tuple(x0.shape[-2:]),
                        grad=grad) as capture, \
            InterruptChecks(interrupt, denoiser):
        return ensemble_features(draw, seed, ensemble, dtype or param.dtype)


def _pixels(images, native: int, resize: str, size) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images (paths, PIL images, or a ComfyUI IMAGE tensor) -> (B, 3, H, W) in [-1, 1] and the first input's
    (width, height). An IMAGE stays in floating point (see images.prepare_comfy)."""
    from PIL import Image

    from .images import ImageInputError, open_image, prepare, prepare_comfy, to_tensor

    if size is not None:
        from ..layer_catalog import parse_size

        h, w = parse_size(size)
        size = (w, h)
    if torch.is_tensor(images):
        return prepare_comfy(images, native, resize, size), (int(images.shape[2]), int(images.shape[1]))
    items = images if isinstance(images, (list, tuple)) else [images]
    pil = []
    for item in items:
        if isinstance(item, Image.Image):
            pil.append(item.convert("RGB"))
        elif isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            pil.append(open_image(item))
        else:
            raise ImageInputError(f"cannot use a {type(item).__name__} as an image: give paths, PIL images or "
                                  "an IMAGE tensor [B, H, W, C]")
    if not pil:
        raise ImageInputError("no images given")
    return to_tensor([prepare(im, native, resize, size) for im in pil]), pil[0].size


@grad_mode
def extract(model, images, prompt="", layers=None, t: int = 50, seed: int = 0, *, resize: str = "keep-aspect",
            size=None, ensemble: int = 1, feature_resize: int = 1, dtype: torch.dtype | None = None,
            offload: bool = False, vae_sample: bool = True, target_side: int | None = None,
            denoise_from: int | None = None, denoise_steps: int = 1, interrupt=None, kept_images: int | None = None,
            in_flight: int = 0, latent_cache=None, shift=None, guidance: float | None = None, grad: bool = False):
    """Features of images at training timestep t (see the module docstring for the exact semantics).

    model: a FeatureModel. images: paths, PIL images, or a ComfyUI IMAGE tensor; one batch (they must share a size
    after resizing). prompt: a string for all images, a list (one per image), or a Conditioning. layers: ids, a
    preset or a JSON file; default the taps attached to the model. target_side: keep-aspect resizing aims at
    target_side**2 pixels instead of the native area. denoise_from / denoise_steps: see extract_latents.
    ControlNets attached to the conditioning and LoRAs of the model apply. Returns Features (tensors + metadata).
    interrupt: a callback run before each block of the VAE and the denoiser (raise to stop). kept_images /
    in_flight: for the memory plan of a caller that keeps more than this batch (extract_in_batches).
    latent_cache: a LatentCache (engine/latent_cache.py) that keeps each image's VAE posterior on disk, or None.
    shift / guidance: the flow families' (Flux) resolution shift and guidance-embedding input (engine/flow.py);
    both recorded in the metadata with sigma.
    grad: gradient mode. The features stay on the autograd graph of the denoiser's (and VAE's) parameters, so a
    loss on them trains the model (a LoRA, a head on the features); the forward still stops at the last tap.
    Default: no autograd at all.
    """
    t = check_timestep(t)
    return extract_timesteps(model, images, prompt, layers, [t], seed, resize=resize, size=size, ensemble=ensemble,
                             feature_resize=feature_resize, dtype=dtype, offload=offload, vae_sample=vae_sample,
                             target_side=target_side, denoise_from=denoise_from, denoise_steps=denoise_steps,
                             interrupt=interrupt, kept_images=kept_images, in_flight=in_flight,
                             latent_cache=latent_cache, shift=shift, guidance=guidance, grad=grad)[0]


@grad_mode
def extract_timesteps(model, images, prompt, layers, timesteps, seed: int = 0, *, resize: str = "keep-aspect",
                      size=None, ensemble: int = 1, feature_resize: int = 1, dtype: torch.dtype | None = None,
                      offload: bool = False, vae_sample: bool = True, target_side: int | None = None,
                      denoise_from: int | None = None, denoise_steps: int = 1, interrupt=None,
                      kept_images: int | None = None, in_flight: int = 0, latent_cache=None, shift=None,
                      guidance: float | None = None, grad: bool = False) -> list:
    """Features of the same images at several training timesteps in one pass: one Features per t, in the given
    order, each equal (bit for bit on the CPU) to `extract(..., t=that t)` with the same arguments.

    The prompt and the VAE are encoded once (encode -> per t, noise -> forward); the same latent x0 and the same
    seeded noise serve every t, and the denoiser runs once per t (plus any denoise_from steps, which must start
    above every t). The memory plan, checked before anything runs, counts every timestep's features.
    """
    from .control import check_controls
    from .features_io import Features
    from .lora import lora_applied
    from .prompts import encode_prompt

    timesteps = check_timesteps(timesteps)
    layers = layers if layers is not None else model.layers
    if not layers:
        raise ValueError("no layers to extract: pass layers= (ids, a preset or a JSON file) or attach them first")
    check_ensemble(ensemble)
    check_denoise_from(model.family, denoise_from)
    flow.check_options(model.family, shift, guidance)
    for t in timesteps:  # every t's schedule is valid before the VAE runs, not after the first t's features
        denoise_schedule(t, denoise_from, denoise_steps)
    pixels, input_size = _pixels(images, target_side or model.native_size, resize, size)
    height, width = pixels.shape[-2:]
    is_flow = get_family(model.family).flow
    if is_flow:
        flow.check_latent(model.family, (height // 8, width // 8), model.denoiser)
    with lora_applied(model):
        cond = prompt if isinstance(prompt, Conditioning) else encode_prompt(model, prompt)
        check_controls(cond, model)
        cond = with_time_ids(cond, height, width)
        batch = pixels.shape[0]
        taps = resolve_taps(layers, model.denoiser, model.family)
        at = f" at {count(len(timesteps), 'timestep')}" if len(timesteps) > 1 else ""
        require(extraction_needs(model.denoiser, taps, batch, (height // 8, width // 8),
                                 cond.encoder_hidden_states.shape[1], dtype=dtype, feature_resize=feature_resize,
                                 offload=offload, ensemble=ensemble, kept_images=kept_images, in_flight=in_flight,
                                 vae=model.vae, timesteps=len(timesteps)),
                f"extracting {count(len(taps), 'layer')} from "
                f"{count(kept_images or batch, 'image')} of {width}x{height}{at}",
                EXTRACT_ADVICE)
        with InterruptChecks(interrupt, model.vae):
            x0 = encode_latents(model.vae, pixels, seed, sample=vae_sample, latent_cache=latent_cache)
        del pixels
        prediction_type = model.scheduler_config.get("prediction_type") or "epsilon"
        abar = None if is_flow else model.alphas_cumprod
        passes = []
        for t in timesteps:
            transform: dict = {}
            tensors = extract_latents(model.denoiser, x0, cond, layers, t, seed, abar,
                                      family=model.family, ensemble=ensemble, feature_resize=feature_resize,
                                      dtype=dtype, offload=offload, denoise_from=denoise_from,
                                      denoise_steps=denoise_steps, prediction_type=prediction_type,
                                      interrupt=interrupt, shift=shift, guidance=guidance,
                                      scheduler_config=model.scheduler_config, transform_meta=transform,
                                      grad=grad)
            extra = (flow.settings(model.family, model.denoiser, t, shift, guidance, model.scheduler_config,
                                   x0.shape[-2:])[2] if is_flow else {})
            passes.append(Features(tensors, _meta(model, cond, input_size, t, seed, height, width, tensors, ensemble,
                                                  denoise_from, denoise_steps, {**extra, **transform})))
    return passes


def _meta(model, cond, input_size, t, seed, height, width, tensors, ensemble, denoise_from, denoise_steps,
          extra) -> dict:
    controls = [{"name": getattr(h.controlnet, "name", ""), "strength": h.strength} for h in cond.controls]
    return features_meta(model.family, t, seed, height, width, input_size, tensors, ensemble, cond.prompts,
                         denoise_from, denoise_steps, controls, **extra)


def extract_in_batches(model, images, prompt, layers=None, t: int = 50, seed: int = 0, *, batch_size: int = 1,
                       on_batch=None, **kw):
    """`extract` over chunks of `batch_size` images, concatenated; on_batch(n) runs after each chunk (progress
    bars, interrupt checks). images: a list or a ComfyUI IMAGE tensor, all of one size after resizing.

    The memory plan of the whole run (every image's features, one batch in flight, one forward's peak) is checked
    before the first chunk runs, and the output is allocated once and filled chunk by chunk: a final concatenation
    would hold every feature twice."""
    from .features_io import Features
    from .lora import lora_applied
    from .prompts import encode_prompt

    check_batch_size(batch_size)
    n = images.shape[0] if torch.is_tensor(images) else len(images)
    if isinstance(prompt, list) and len(prompt) not in (1, n):
        raise ValueError(f"{len(prompt)} prompts for {n} images: give one prompt or one per image")
    if isinstance(prompt, Conditioning) and prompt.batch not in (1, n):
        raise ValueError(f"conditioning holds {prompt.batch} prompts for {n} images")
    if n == 0:
        raise ValueError("no images given")
    prompts: list = []
    meta = None
    with lora_applied(model):  # merged once for every chunk (each extract's own merge is then a no-op)
        if isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1):
            prompt = encode_prompt(model, prompt)  # once for every chunk, not once per chunk

        def chunk(start, stop):
            nonlocal meta
            chunk_prompt = prompt
            if isinstance(prompt, Conditioning):
                chunk_prompt = prompt.take(start, stop)
            elif isinstance(prompt, list) and len(prompt) == n:
                chunk_prompt = prompt[start:stop]
            # The first chunk's plan covers the whole run; later chunks check their own batch against what is left.
            first = start == 0
            part = extract(model, images[start:stop], chunk_prompt, layers, t, seed, **kw,
                           kept_images=n if first else None, in_flight=min(batch_size, n) if first and n > stop
                           else 0)
            if meta is None:
                meta = part.meta
            else:
                merge_meta(meta, part.meta)
            prompts.extend(part.meta["prompt"])
            return part.tensors

        out = fill_batches(n, batch_size, chunk, on_batch)
    return Features(out, dict(meta, prompt=prompts))

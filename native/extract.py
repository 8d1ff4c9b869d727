"""DFExtractNative's engine: DFExtractFeatures' semantics on ComfyUI's own MODEL, VAE and CONDITIONING.

- `t` is the training timestep 0..999; its sigma comes from the MODEL's own noise schedule, and the model is called
  with x0 + sigma_t eps, which ComfyUI scales to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: the same x_t as the
  DF_MODEL path for the same x0 and eps. Rectified-flow models (Flux, SD3): sigma = t / 1000 and
  x_t = (1 - sigma) x0 + sigma eps, no resolution shift unless `shift` asks for the MODEL's own shifted schedule;
  a guidance-distilled network (Flux dev) gets `guidance` (default 3.5, diffusers' FluxPipeline's); a network
  without a guidance embedding (SD3, Flux schnell) is not given it, since the node's default is always set, and
  its metadata records guidance None. Both are in the metadata.
- eps is drawn on the CPU from a generator seeded by `seed`, one draw for every image (an image's features do not
  depend on its batch); `ensemble=N` averages over seeds seed .. seed+N-1.
- One conditional forward with the positive conditioning only, through ComfyUI's own sampling path, so ControlNets
  attached by Apply ControlNet and LoRAs of LoraLoader apply exactly as in sampling; it stops after the last tap
  when no ControlNet is attached.
- denoise_from: noise to that timestep instead and take `denoise_steps` deterministic DDIM steps down to t with the
  prompt and its ControlNets, then capture at t (engine.extraction.extract_latents' recipe).
- Images are resized as DFExtractFeatures resizes them (keep-aspect to the family's native area by default), in
  floating point.
- A run whose features would not fit in memory is refused before the VAE runs (native/memory.py).

The loop around the model calls (validation, ensemble, noise draws, batching, metadata) is engine/driver.py's,
shared with DFExtractFeatures. The ComfyUI calls themselves live in `comfy_model`; this module is ComfyUI-free.
"""
from __future__ import annotations

import torch

from ..engine.dit_transforms import kept_request
from ..engine.driver import capture_dtype, check_batch_size, check_ensemble, ensemble_features, features_meta, \
    fill_batches
from ..engine.features_io import Features, size_meta
from ..engine.interrupts import InterruptChecks
from ..engine.schedule import check_timestep, denoise_schedule, seeded_eps
from ..layer_catalog import get_family
from ..layer_catalog.errors import echo
from . import comfy_model

DEFAULT_NATIVE_SIZE = 1024  # a UNet we tap but have no family for (e.g. the SDXL refiner)
DEFAULT_GUIDANCE = 3.5  # diffusers' FluxPipeline's guidance_scale


def _check_positive(positive) -> None:
    ok = isinstance(positive, (list, tuple)) and all(
        isinstance(c, (list, tuple)) and len(c) == 2 and torch.is_tensor(c[0]) and isinstance(c[1], dict)
        for c in positive)
    if not ok or not positive:
        raise ValueError("positive must be a ComfyUI CONDITIONING (from CLIP Text Encode, Apply ControlNet, ...)")
    if len(positive) != 1:
        raise ValueError(f"positive holds {len(positive)} conditionings (Conditioning Combine / area prompts?): "
                         "DFExtractNative takes one, so each feature row has one prompt; extract them one by one")


def _layers_of(model, layers):
    if layers:
        return layers
    capture = comfy_model.capture_of(model)
    if capture is None:
        raise ValueError("no layers to extract: connect the MODEL through DFCaptureLayers, or fill in `layers` "
                         "(ids, a preset or a JSON file)")
    return kept_request(capture.ids, capture.ditf is not None)


def _guidance(model, guidance) -> float | None:
    """The guidance value the MODEL's network gets (None: it has no guidance embedding), checked."""
    if not comfy_model.takes_guidance(model):
        return None
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 100:
        raise ValueError(f"guidance must be a number from 0 to 100 (Flux dev: 3.5), got {echo(guidance)}")
    return float(guidance)


def flow_meta(model, t: int, shift: bool, guidance) -> dict:
    """The metadata of a flow model's extraction: its sigma at t, the shift used (None: none) and the guidance."""
    if not comfy_model.is_flow_model(model):
        return {}
    sigma = float(comfy_model.sigmas_at(model, [t], shift)[0]) if shift else t / 1000.0
    return {"sigma": sigma,
            "shift": comfy_model.flow_shift(model) if shift else None, "guidance": _guidance(model, guidance)}


def schedule(t: int, denoise_from: int | None, denoise_steps: int) -> list[int]:
    """The training timesteps of one extraction: [t], or denoise_from ... t for the guided denoising."""
    return denoise_schedule(check_timestep(t), denoise_from, denoise_steps, off=" (0: off)")


@torch.no_grad()
def extract_native_latents(model, positive, latents: torch.Tensor, layers, t: int = 50, seed: int = 0, *,
                           ensemble: int = 1, feature_resize: int = 1, dtype: torch.dtype | None = None,
                           offload: bool = False, denoise_from: int | None = None,
                           denoise_steps: int = 1, interrupt=None, shift: bool = False,
                           guidance: float = DEFAULT_GUIDANCE, transform_meta: dict | None = None
                           ) -> dict[str, torch.Tensor]:
    """Features of ComfyUI latents (B, C, h, w, or a 5-D model's (B, C, 1, h, w): a LATENT's samples, before the
    model's process_in) at t.
    interrupt: a callback run before each block of the network (it raises to stop a long forward). shift, guidance:
    for flow models (see the module's docstring). transform_meta: receives the metadata of DiTF's transform when
    the layers name the ditf preset."""
    _check_positive(positive)
    check_ensemble(ensemble)
    if not isinstance(feature_resize, int) or feature_resize < 1:
        raise ValueError(f"feature_resize must be an integer >= 1, got {echo(feature_resize)}")
    sigmas = comfy_model.sigmas_at(model, schedule(t, denoise_from, denoise_steps), shift)
    guidance = _guidance(model, guidance)
    model = comfy_model.without_capture(model)
    early_exit = not comfy_model.conditioning_controls(positive)
    latents = latents.float().cpu()

    def draw(draw_seed):
        noise = seeded_eps(latents.shape[1:], draw_seed).expand_as(latents).contiguous()
        return comfy_model.run_at_sigmas(model, positive, latents, noise, sigmas, layers, seed=draw_seed,
                                         dtype=capture_dtype(dtype, ensemble), device="cpu" if offload else None,
                                         early_exit=early_exit, feature_resize=feature_resize,
                                         guidance=guidance, transform_meta=transform_meta)

    with InterruptChecks(interrupt, comfy_model.diffusion_model(model)):
        return ensemble_features(draw, seed, ensemble, dtype)


@torch.no_grad()
def extract_native(model, vae, positive, images: torch.Tensor, layers=None, t: int = 50, seed: int = 0, *,
                   resize: str = "keep-aspect", size=None, ensemble: int = 1, feature_resize: int = 1,
                   dtype: torch.dtype | None = None, offload: bool = True, batch_size: int = 4,
                   denoise_from: int | None = None, denoise_steps: int = 1, on_batch=None,
                   prompt: str | None = None, interrupt=None, shift: bool = False,
                   guidance: float = DEFAULT_GUIDANCE) -> Features:
    """DF_FEATURES of a ComfyUI IMAGE [B, H, W, C] on a native MODEL + VAE + positive CONDITIONING.

    layers: ids, a preset or a JSON file; None takes those of the DFCaptureLayers the MODEL came through.
    on_batch(n) runs after each chunk of `batch_size` images (progress), interrupt() before each block of the
    network (raise to stop). prompt: the text `positive` was encoded from, for the metadata (a CONDITIONING
    carries no text); None records no prompt.
    The run is refused before the VAE runs when its features would not fit in memory (native.memory)."""
    from ..engine.extraction import _pixels
    from .memory import check_extraction

    check_timestep(t)
    schedule(t, denoise_from, denoise_steps)  # a bad denoise_from is refused before the VAE runs
    _check_positive(positive)
    check_ensemble(ensemble)
    check_batch_size(batch_size)
    layers = _layers_of(model, layers)
    family = comfy_model.native_family(model)  # an unsupported MODEL is refused here
    flow = flow_meta(model, t, shift, guidance)  # a bad shift or guidance before the VAE runs
    native_side = get_family(family).native_size if family else DEFAULT_NATIVE_SIZE
    pixels, input_size = _pixels(images, native_side, resize, size)  # (B, 3, H, W) in [-1, 1], as DFExtractFeatures
    height, width = pixels.shape[-2:]
    net = comfy_model.diffusion_model(model)
    check_extraction(net, family, layers, pixels.shape[0], height, width, dtype=dtype,
                     compute_dtype=comfy_model.inference_dtype(model), ensemble=ensemble,
                     store="cpu" if offload else getattr(model, "load_device", next(net.parameters()).device),
                     feature_resize=feature_resize, batch_size=batch_size,
                     known=getattr(comfy_model.capture_of(model), "sizes", None),
                     text_tokens=int(positive[0][0].shape[1]) if positive[0][0].ndim == 3 else None)
    comfy_pixels = ((pixels + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous()  # ComfyUI IMAGE, 0..1
    transform: dict = {}  # DiTF's channels over every batch, draw and image (the ditf preset)

    def chunk(start, stop):
        latents = comfy_model.encode_pixels(vae, comfy_pixels[start:stop], seed)
        return extract_native_latents(model, positive, latents, layers, t, seed, ensemble=ensemble,
                                      feature_resize=feature_resize, dtype=dtype, offload=offload,
                                      denoise_from=denoise_from, denoise_steps=denoise_steps, interrupt=interrupt,
                                      shift=shift, guidance=guidance, transform_meta=transform)

    out = fill_batches(comfy_pixels.shape[0], batch_size, chunk, on_batch)
    controls = [{"name": type(c).__name__, "strength": float(getattr(c, "strength", 1.0))}
                for c in comfy_model.conditioning_controls(positive)]
    return Features(out, features_meta(family, t, seed, height, width, input_size, out, ensemble,
                                       [] if prompt is None else [prompt], denoise_from, denoise_steps, controls,
                                       backend="native", **flow, **transform))


def collect(capture, latent: dict | None = None) -> Features:
    """DF_FEATURES of a capture after its sampler ran: one row per captured step x branch x conditioning x image,
    labelled in meta['rows'] (step, timestep, sigma, branch, image, cond_index), as DFGenerate's rows. `latent` is
    the sampler's output: rows another prompt's sampler made are refused (see NativeCapture.check_current)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    capture.check_current(samples)
    labels, tensors = capture.stacked()
    meta = {"family": capture.family, "layers": list(tensors), "rows": labels, "steps": capture.total_steps,
            "branch": capture.branch, "backend": "native", **capture.transform_meta}
    if torch.is_tensor(samples) and samples.ndim in (4, 5):  # 5-D: Qwen-Image's (B, C, 1, h, w)
        meta.update(size_meta(int(samples.shape[-2]) * 8, int(samples.shape[-1]) * 8))
    return Features(tensors, meta)

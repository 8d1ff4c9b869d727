"""The one module of the native backend that touches ComfyUI's objects (MODEL = comfy.model_patcher.ModelPatcher).

It imports `comfy` only inside functions, so the pack still imports without ComfyUI. Everything here works on both
supported ComfyUI generations: the keyed wrappers of current ComfyUI (`add_wrapper_with_key`, APPLY_MODEL) and the
single `model_function_wrapper` slot of the 2024-03 one, which we chain rather than replace.
"""
from __future__ import annotations

import contextlib
import torch

from .capture import WRAPPER_KEY, ApplyModelWrapper, NativeCapture, UnetFunctionWrapper
from .names import (NativeLayout, UnsupportedModelError, is_native_pixart, native_ids, native_taps,
                    unsupported_message)
from .taps import CallHooks

# ComfyUI's model configs (comfy/supported_models.py class names) -> our family ids. Playground v2 loads as SDXL in
# ComfyUI (same UNet): its ids are the same, so 'sdxl' presets serve it.
_FAMILY_OF_CONFIG = {
    "SD15": "sd15", "SD15_instructpix2pix": "sd15",
    "SD20": "sd21", "SD21UnclipL": "sd21", "SD21UnclipH": "sd21", "SD_X4Upscaler": None,
    "SDXL": "sdxl", "SDXL_instructpix2pix": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl", "SDXLRefiner": None, "PixArtSigma": "pixart-sigma", "PixArtAlpha": None,
}


def _base_model(model):
    """The comfy.model_base.BaseModel of a MODEL (ModelPatcher), or the BaseModel itself."""
    base = getattr(model, "model", model)
    if not hasattr(base, "diffusion_model"):
        raise UnsupportedModelError(unsupported_message(f"a {type(model).__name__} (not a ComfyUI MODEL)"))
    return base


def diffusion_model(model) -> torch.nn.Module:
    """The native network of a MODEL (ComfyUI's UNetModel or PixArtMS); a clear error naming the supported
    families for any other architecture (SD3, Flux, video models, ...)."""
    base = _base_model(model)
    unet = base.diffusion_model
    config = getattr(base, "model_config", None)
    owner = f"ComfyUI's {type(base).__name__} model" + (f" ({type(config).__name__})" if config is not None else "")
    if type(unet).__name__ == "PixArtMS" and is_native_pixart(unet):
        return unet
    if type(unet).__name__ != "UNetModel" or getattr(unet, "num_classes", None) not in (None, "sequential"):
        raise UnsupportedModelError(unsupported_message(f"{owner} with network {type(unet).__name__}"))
    try:
        NativeLayout(unet)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{owner}: {e}") from None
    return unet


def native_family(model) -> str | None:
    """Our family id for a MODEL, from ComfyUI's own model detection (None: a UNet we tap but have no catalog for,
    e.g. the SDXL refiner; its ids still come from its module tree)."""
    diffusion_model(model)
    config = type(getattr(_base_model(model), "model_config", None)).__name__
    return _FAMILY_OF_CONFIG.get(config)


def model_layer_ids(model) -> list[str]:
    """Every layer id of this MODEL (read from its module tree), in forward order: for DFShowLayers / the picker."""
    return native_ids(diffusion_model(model))


def capture_layers(model, layers, steps="all", branch: str = "cond", *, dtype: torch.dtype | None = None,
                   device=None) -> tuple[object, NativeCapture]:
    """A clone of MODEL that records `layers` during sampling, and the capture that receives the rows.

    The original MODEL is not changed and never records. The clone carries one small wrapper (the capture's
    key); torch hooks are put on the shared UNet only while one of the clone's model calls runs and removed in
    `finally`. Other packs' patches and wrappers stay where they are (the 2024-03 wrapper slot is chained).
    """
    unet = diffusion_model(model)
    family = native_family(model)
    capture = NativeCapture(native_taps(layers, unet, family), steps, branch, family=family, dtype=dtype,
                            device=device)
    tapped = model.clone()
    if hasattr(tapped, "add_wrapper_with_key"):
        import comfy.patcher_extension

        tapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                    ApplyModelWrapper(capture.key))
    else:
        inner = tapped.model_options.get("model_function_wrapper")
        tapped.set_model_unet_function_wrapper(UnetFunctionWrapper(capture.key, inner))
    return tapped, capture


@contextlib.contextmanager
def call_hooks(model, layers, *, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None, device=None,
               early_exit: bool = False):
    """Hooks on MODEL's UNet for the calls made inside the block (direct extraction, one forward):

        with call_hooks(model, ids, early_exit=True) as hooks:
            hooks.run(model.model.apply_model, x, sigma, c_crossattn=context)
        hooks.features

    Removed on exit, whatever happened inside."""
    unet = diffusion_model(model)
    with CallHooks(unet, native_taps(layers, unet, native_family(model)), rows=rows, dtype=dtype, device=device,
                   early_exit=early_exit) as hooks:
        yield hooks


"""The native backend: layer ids, taps and attention maps on ComfyUI's own networks (the MODEL of Load Checkpoint
or Load Diffusion Model: its UNets, PixArt, and the diffusion transformers a family reads, Flux and SD3), captured
per model call during ordinary sampling. Only `comfy_model` touches ComfyUI objects, and it imports
`comfy` lazily; the rest imports without ComfyUI.

    from diffusion_feature.native import capture_layers
    tapped, capture = capture_layers(model, "practical", steps="every 5", branch="both")
    # ... sample with `tapped` (KSampler, SamplerCustom, ...) ...
    labels, features = capture.stacked()   # one row per step x branch x conditioning x image
"""
from ..layer_catalog.hooks import TokenGridError  # the hook engine's: one class for both engines
from .capture import BRANCHES, NativeCapture, NoCaptureError, Record
from .comfy_model import capture_layers, diffusion_model, model_layer_ids, native_family
from .names import SUPPORTED_FAMILIES, NativeLayout, UnsupportedModelError, is_native_unet, native_ids, native_taps

__all__ = [
    "BRANCHES", "NativeCapture", "NoCaptureError", "Record", "capture_layers", "diffusion_model",
    "model_layer_ids", "native_family", "SUPPORTED_FAMILIES", "NativeLayout", "UnsupportedModelError",
    "is_native_unet", "native_ids", "native_taps", "TokenGridError",
]

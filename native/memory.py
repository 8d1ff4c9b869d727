"""The native memory guard: what a capture or extraction on ComfyUI's MODEL keeps, refused before it runs when that
would not fit (engine/memory_guard.py's check and message).

ComfyUI loads, offloads and sizes its own model calls, so what the pack adds is what it keeps: every tap's features
for every kept row. Per-sample shapes come from shapes.layer_shapes (a fake-tensor pass: nothing computed or
allocated) at a reference size, scaled to the run's (FeatureSizes), in the dtype the features are stored in.
Counted:
- DFCaptureLayers (during sampling): the rows of every wanted step, plus DFCollectFeatures' stacked copy of them;
  checked at the first captured model call of a run, before it runs, when the latent size and the schedule are
  known (the reference pass ran in DFCaptureLayers, outside sampling). Without a
  schedule (the 2024-03 ComfyUI) the number of steps is not known then: one step is checked.
- DFExtractNative: every image's features in the output, a batch in flight and an ensemble's float32 sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import memory_guard
from ..engine.extraction import fits, require
from ..engine.features_io import is_map
from ..engine.memory_guard import count
from .names import native_taps

CAPTURE_ADVICE = "capture fewer layers (attention maps above all), a smaller latent, fewer images, or feature_resize"
EXTRACT_ADVICE = ("extract fewer layers (attention maps above all), fewer images, a smaller image, or "
                  "feature_resize > 1")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def inference_dtype(net: torch.nn.Module) -> torch.dtype:
    """The dtype the network's activations (and so captured features) have: ComfyUI's networks cast their input
    to their `dtype`; else the weights' dtype."""
    dtype = getattr(net, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(net.parameters()).dtype


_REF = 64  # the latent side of the reference pass (512 pixels for the SD families)


@dataclass(frozen=True)
class FeatureSizes:
    """Per-sample shapes of some taps at a reference latent size, scaled to any size without running the network
    again (running it inside a sampler's model call would also fire other packs' hooks): spatial features and map
    queries follow the latent grid, self-attention keys too, cross-attention keys (text tokens) stay."""

    shapes: tuple  # ((tap id, shape at _REF x _REF latent), ...)

    def sample_bytes(self, latent_hw, dtype: torch.dtype, feature_resize: int = 1) -> int:
        """Bytes of one sample's features at latent_hw, stored in `dtype`, spatial ones pooled by feature_resize."""
        h, w = (int(v) for v in latent_hw)
        total = 0
        for tap_id, shape in self.shapes:
            if is_map(tap_id):
                heads, nq, nk = shape
                nq = nq * h * w // (_REF * _REF)
                shape = (heads, nq, nq if "self-map" in tap_id else nk)
            else:
                shape = (shape[0], max(1, shape[1] * h // _REF), max(1, shape[2] * w // _REF))
                if feature_resize > 1:
                    shape = (shape[0], max(1, shape[1] // feature_resize), max(1, shape[2] // feature_resize))
            total += math.prod(shape)
        return total * _itemsize(dtype)


def feature_sizes(net: torch.nn.Module, family: str | None, taps) -> FeatureSizes:
    """FeatureSizes of `taps` from one fake-tensor pass (shapes.layer_shapes: nothing computed or allocated)."""
    from .shapes import layer_shapes

    shapes = layer_shapes(net, family, _REF * 8, _REF * 8, [t.id for t in taps])
    return FeatureSizes(tuple((t.id, tuple(shapes[t.id])) for t in taps))


def capture_needs(per_row: int, rows: int, steps: int, store) -> dict:
    needs: dict = {}
    memory_guard.add(needs, store, f"the features of {count(steps, 'captured step')} x {count(rows, 'row')}",
                     per_row * rows * steps)
    memory_guard.add(needs, store, "DFCollectFeatures' stacked copy of them", per_row * rows * steps)
    return needs


def check_capture(net: torch.nn.Module, sizes: FeatureSizes, x_shape, rows: int, steps: int, *,
                  dtype: torch.dtype | None, device) -> None:
    """Refuse (FeatureMemoryError) a capture of `rows` rows at each of `steps` steps of latents shaped x_shape
    whose features would not fit where they are stored, naming the most steps that fit."""
    height, width = int(x_shape[-2]) * 8, int(x_shape[-1]) * 8
    per_row = sizes.sample_bytes(x_shape[-2:], dtype or inference_dtype(net))
    store = torch.device(device) if device is not None else next(net.parameters()).device
    if fits(capture_needs(per_row, rows, steps, store)):
        return
    most = memory_guard.largest(lambda k: fits(capture_needs(per_row, rows, k, store)), 1, steps)
    fit = (f"at most {count(most, 'capture step')} fit at this size" if most else
           "not one capture step fits at this size")
    require(capture_needs(per_row, rows, steps, store),
             f"capturing {count(len(sizes.shapes), 'layer')} at {count(steps, 'step')} of {count(rows, 'row')} at "
             f"{width}x{height}", f"{fit} (or {CAPTURE_ADVICE})")


def extraction_needs(per_image: int, images: int, batch: int, ensemble: int, final: torch.dtype, store) -> dict:
    """DFExtractNative's plan: the output's features of every image, one batch in flight, an ensemble's sums."""
    needs: dict = {}
    memory_guard.add(needs, store, f"the features of {count(images, 'image')}", per_image * images)
    memory_guard.add(needs, store, f"the features of {count(batch, 'image')} in flight", per_image * batch)
    if ensemble > 1:
        memory_guard.add(needs, store, "the ensemble's float32 sums",
                         per_image * batch * 4 // _itemsize(final))
    return needs


def check_extraction(model, layers, images: int, height: int, width: int, *, dtype: torch.dtype | None,
                     offload: bool, ensemble: int = 1, feature_resize: int = 1, batch_size: int = 4) -> None:
    """Refuse (FeatureMemoryError) a DFExtractNative run of `images` images whose features would not fit,
    naming how many images do."""
    from .comfy_model import diffusion_model, native_family

    net, family = diffusion_model(model), native_family(model)
    final = dtype or inference_dtype(net)
    taps = native_taps(layers, net, family)
    per_image = feature_sizes(net, family, taps).sample_bytes((height // 8, width // 8), final, feature_resize)
    store = torch.device("cpu") if offload else getattr(model, "load_device", next(net.parameters()).device)

    def needs(n):
        return extraction_needs(per_image, n, min(batch_size, n), ensemble, final, store)

    if fits(needs(images)):
        return
    most = memory_guard.largest(lambda n: fits(needs(n)), 1, images)
    fit = f"at most {count(most, 'image')} fit" if most else "not one image fits"
    require(needs(images), f"extracting {count(len(taps), 'layer')} from {count(images, 'image')} of "
             f"{width}x{height}", f"{fit} (or {EXTRACT_ADVICE})")

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


_REF = 64  # the latent side of the reference pass (512 pixels for the SD families)


@dataclass(frozen=True)
class FeatureSizes:
    """Per-sample shapes of some taps at a reference latent size, scaled to any size without running the network
    again (running it inside a sampler's model call would also fire other packs' hooks): spatial features and map
    queries follow the latent grid, self-attention keys too; cross-attention keys and text-token features follow the
    prompt's length where the run knows it (the reference pass has the family's)."""

    shapes: tuple  # ((tap id, shape at _REF x _REF latent), ...)
    dtype: torch.dtype  # the network's compute dtype: its activations', so the features' unless told otherwise
    tokens: int  # the text tokens of the reference pass (shapes.reference_tokens)

    def sample_bytes(self, latent_hw, dtype: torch.dtype, feature_resize: int = 1,
                     text_tokens: int | None = None) -> int:
        """Bytes of one sample's features at latent_hw, stored in `dtype`, spatial ones pooled by feature_resize;
        text_tokens: the run's prompt length (cross-map keys, text-token features), else the reference's."""
        h, w = (int(v) for v in latent_hw)
        tokens = text_tokens or self.tokens
        total = 0
        for tap_id, shape in self.shapes:
            if is_map(tap_id):
                heads, nq, nk = shape
                nq = nq * h * w // (_REF * _REF)
                shape = (heads, nq, nq if "self-map" in tap_id else nk * tokens // self.tokens)
            elif len(shape) == 2:  # text tokens (C, T) of a diffusion transformer: no grid to follow
                shape = (shape[0], shape[1] * tokens // self.tokens)
            else:
                shape = (shape[0], max(1, shape[1] * h // _REF), max(1, shape[2] * w // _REF))
                if feature_resize > 1:
                    shape = (shape[0], max(1, shape[1] // feature_resize), max(1, shape[2] // feature_resize))
            total += math.prod(shape)
        return total * dtype.itemsize


def feature_sizes(net: torch.nn.Module, family: str | None, taps, dtype: torch.dtype) -> FeatureSizes:
    """FeatureSizes of `taps` from one fake-tensor pass (shapes.layer_shapes: nothing computed or allocated) in the
    model's compute dtype (comfy_model.inference_dtype)."""
    from .shapes import layer_shapes, reference_tokens

    shapes = layer_shapes(net, family, _REF * 8, _REF * 8, dtype, [t.id for t in taps])
    return FeatureSizes(tuple((t.id, tuple(shapes[t.id])) for t in taps), dtype, reference_tokens(family))


def _check(needs_of, n: int, unit: str, subject: str, advice: str, where: str = "") -> None:
    """Refuse (FeatureMemoryError) when needs_of(n) does not fit, naming how many `unit`s do."""
    if fits(needs_of(n)):
        return
    most = memory_guard.largest(lambda k: fits(needs_of(k)), 1, n)
    fit = f"at most {count(most, unit)} fit{where}" if most else f"not one {unit} fits{where}"
    require(needs_of(n), subject, f"{fit} (or {advice})")


def check_capture(net: torch.nn.Module, sizes: FeatureSizes, x_shape, rows: int, steps: int, *,
                  dtype: torch.dtype | None, device, text_tokens: int | None = None) -> None:
    """Refuse a capture of `rows` rows at each of `steps` steps of latents shaped x_shape (with prompts of
    text_tokens tokens, when known) whose features (and DFCollectFeatures' stacked copy) would not fit where they
    are stored, naming the most steps that fit."""
    per_row = sizes.sample_bytes(x_shape[-2:], dtype or sizes.dtype, text_tokens=text_tokens)
    store = torch.device(device) if device is not None else next(net.parameters()).device

    def needs(k):
        plan: dict = {}
        memory_guard.add(plan, store, f"the features of {count(k, 'captured step')} x {count(rows, 'row')}",
                         per_row * rows * k)
        memory_guard.add(plan, store, "DFCollectFeatures' stacked copy of them", per_row * rows * k)
        return plan

    _check(needs, steps, "capture step", f"capturing {count(len(sizes.shapes), 'layer')} at {count(steps, 'step')} "
           f"of {count(rows, 'row')} at {int(x_shape[-1]) * 8}x{int(x_shape[-2]) * 8}", CAPTURE_ADVICE,
           " at this size")


def check_extraction(net: torch.nn.Module, family: str | None, layers, images: int, height: int, width: int, *,
                     dtype: torch.dtype | None, compute_dtype: torch.dtype, store, ensemble: int = 1,
                     feature_resize: int = 1, batch_size: int = 4, known: FeatureSizes | None = None,
                     text_tokens: int | None = None) -> None:
    """Refuse a DFExtractNative run whose features would not fit on `store`: every image's in the output, a batch
    in flight and an ensemble's float32 sums; naming how many images do. compute_dtype: the model's
    (comfy_model.inference_dtype), the features' unless `dtype` says otherwise. known: sizes already measured
    (the DFCaptureLayers capture the MODEL came through), used when they are of these taps: no second pass.
    text_tokens: the prompt's length (the conditioning's), for cross-maps and text-token features."""
    final = dtype or compute_dtype
    taps = native_taps(layers, net, family)
    same = known is not None and known.dtype == compute_dtype and [i for i, _ in known.shapes] == [t.id for t in taps]
    sizes = known if same else feature_sizes(net, family, taps, compute_dtype)
    per_image = sizes.sample_bytes((height // 8, width // 8), final, feature_resize, text_tokens)

    def needs(n):
        plan: dict = {}
        memory_guard.add(plan, store, f"the features of {count(n, 'image')}", per_image * n)
        batch = min(batch_size, n)
        memory_guard.add(plan, store, f"the features of {count(batch, 'image')} in flight", per_image * batch)
        if ensemble > 1:
            memory_guard.add(plan, store, "the ensemble's float32 sums", per_image * batch * 4 // final.itemsize)
        return plan

    _check(needs, images, "image", f"extracting {count(len(taps), 'layer')} from {count(images, 'image')} of "
           f"{width}x{height}", EXTRACT_ADVICE)

"""Per-sample shapes of every layer id of a native network at an image size, without computing anything.

DFShowLayers on a ComfyUI MODEL answers from the model's own module tree (a checkpoint of another depth gets its
own ids and shapes). ComfyUI's attention picks its kernel from the free memory of the tensors' device, so a meta-
device copy cannot run it; instead the real network runs once under torch's FakeTensorMode: every op propagates
shapes only, no weight is read or copied and nothing is allocated, and the taps' own hooks (maps from q and k
included) report the shapes they would store. The inputs take the model's inference dtype, as ComfyUI's own call
does (fp8 and quantized weights compute in another dtype). Layers may cache per-device state on themselves (current
ComfyUI's streamed weights do): every attribute the pass set is put back, so no fake tensor outlives it. Other
code's hooks on the network are set aside for the pass (and put back after it): this is no model call of theirs.
Reference-image ids (`vit-block{B}-ref{I}-...`) are sized with references of the generated image's size in the pass:
a run's references are only known when it runs.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..layer_catalog import get_family
from ..layer_catalog.families.meta import native_dummy_inputs
from ..layer_catalog.hooks import FeatureCapture
from .names import is_native_dit, is_native_pixart, native_taps


def _context_width(net: torch.nn.Module) -> int:
    """The text-embedding width the network's cross-attention takes (from its key projections)."""
    if is_native_pixart(net):
        return net.y_embedder.y_proj.fc1.in_features
    for name, module in net.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return module.to_k.in_features
    raise ValueError("this network has no cross-attention to size the text embedding for")


def reference_tokens(family: str | None) -> int:
    """The text tokens of the shape pass: the family's (Flux: T5's 512), CLIP's 77 for a UNet without a family."""
    return get_family(family).text_tokens if family else 77


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _with_references(taps, args, kwargs) -> dict:
    """The pass's keyword inputs with as many reference latents as the taps read, each the generated latent's size
    (ComfyUI's networks take them as a list, Tap.ref_read's "latents" form)."""
    wanted = [t for t in taps if t.ref is not None]
    if not wanted:
        return kwargs
    _, name, _ = wanted[0].ref_read
    return {**kwargs, name: [torch.empty_like(args[0])] * (max(t.ref for t in wanted) + 1)}


def layer_shapes(net: torch.nn.Module, family: str | None, height: int, width: int, dtype: torch.dtype,
                 layers="full") -> dict[str, list[int]]:
    """{layer id: per-sample shape} of `layers` (default every id) of a native UNetModel / PixArtMS / diffusion
    transformer at height x width pixels (multiples of 8); dtype: the model's inference dtype
    (comfy_model.inference_dtype)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if height % 8 or width % 8 or height < 8 or width < 8:
        raise ValueError(f"image size must be positive multiples of 8 pixels, got {width}x{height}")
    tokens = reference_tokens(family)
    taps = native_taps(layers, net, family)
    like = {"dtype": dtype, "device": next(net.parameters()).device}
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers)) for m in net.modules()]
    try:
        for module, attributes, _, _ in saved:  # fresh hook dicts: the originals stay in `attributes`, untouched
            for name in _HOOK_DICTS:
                if name in attributes:
                    vars(module)[name] = OrderedDict()
        with FakeTensorMode(allow_non_fake_inputs=True):
            dit = native_dummy_inputs(net, (height // 8, width // 8), tokens, lambda *s: torch.empty(*s, **like))
            if dit is not None:  # a diffusion transformer: its family knows its forward's inputs
                args, kwargs = dit
            elif is_native_dit(net):
                raise ValueError(f"no example inputs for ComfyUI's {type(net).__name__} network to size its layers "
                                 "with (layer_catalog/families/meta.py lists them per class)")
            else:
                args = (torch.empty(1, net.in_channels, height // 8, width // 8, **like),
                        torch.empty(1, device=like["device"]))  # t: float32
                kwargs = {"context": torch.empty(1, tokens, _context_width(net), **like)}
                if getattr(net, "num_classes", None) == "sequential":  # SDXL's pooled text + size embedding
                    kwargs["y"] = torch.empty(1, net.label_emb[0][0].in_features, **like)
            kwargs = _with_references(taps, args, kwargs)
            # device="meta": stored copies are shapes only too (no data-pointer checks on fake tensors)
            with FeatureCapture(net, taps, device="meta") as hooks:
                hooks.run(*args, **kwargs)
    finally:
        for module, attributes, parameters, buffers in saved:
            vars(module).clear()
            vars(module).update(attributes)
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
    return {t.id: list(hooks.features[t.id].shape[1:]) for t in taps}

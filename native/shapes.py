"""Per-sample shapes of every layer id of a native network at an image size, without computing anything.

DFShowLayers on a ComfyUI MODEL answers from the model's own module tree (a checkpoint of another depth gets its
own ids and shapes). ComfyUI's attention picks its kernel from the free memory of the tensors' device, so a meta-
device copy cannot run it; instead the real network runs once under torch's FakeTensorMode: every op propagates
shapes only, no weight is read or copied and nothing is allocated, and the taps' own hooks (maps from q and k
included) report the shapes they would store.
"""
from __future__ import annotations

import torch

from ..layer_catalog import get_family
from .names import is_native_pixart, native_taps
from .taps import CallHooks


def _context_width(net: torch.nn.Module) -> int:
    """The text-embedding width the network's cross-attention takes (from its key projections)."""
    if is_native_pixart(net):
        return net.y_embedder.y_proj.fc1.in_features
    for name, module in net.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return module.to_k.in_features
    raise ValueError("this network has no cross-attention to size the text embedding for")


def layer_shapes(net: torch.nn.Module, family: str | None, height: int, width: int, layers="full"
                 ) -> dict[str, list[int]]:
    """{layer id: per-sample shape} of `layers` (default every id) of a native UNetModel / PixArtMS at height x
    width pixels (multiples of 8)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if height % 8 or width % 8 or height < 8 or width < 8:
        raise ValueError(f"image size must be positive multiples of 8 pixels, got {width}x{height}")
    tokens = get_family(family).text_tokens if family else 77
    taps = native_taps(layers, net, family)
    param = next(net.parameters())
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(1, net.in_channels, height // 8, width // 8, dtype=param.dtype, device=param.device)
        timestep = torch.empty(1, dtype=param.dtype, device=param.device)
        context = torch.empty(1, tokens, _context_width(net), dtype=param.dtype, device=param.device)
        extra = {}
        if getattr(net, "num_classes", None) == "sequential":  # SDXL's pooled text + size embedding
            extra["y"] = torch.empty(1, net.label_emb[0][0].in_features, dtype=param.dtype, device=param.device)
        # device="meta": stored copies are shapes only too (no data-pointer checks on fake tensors)
        with CallHooks(net, taps, device="meta") as hooks:
            hooks.run(net, x, timestep, context=context, **extra)
    return {t.id: list(hooks.features[t.id].shape[1:]) for t in taps}

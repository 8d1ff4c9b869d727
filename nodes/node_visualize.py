"""DFFeaturePCA and DFAttentionMap: features -> IMAGE (and MASK)."""
from __future__ import annotations

import numpy as np
import torch

from ..engine.features_io import image_size, is_text
from ..engine.visualize import attention_heatmap, pca_rgb, self_attention_pca, to_image_size
from ..layer_catalog.errors import echo

# A text-token feature (C, T) has no image grid: its PCA colours one cell per token, in token order, as a strip
# TEXT_CELL pixels high and T * TEXT_CELL wide (size "image"), or 1 x T (size "feature grid").
TEXT_CELL = 16
# An output image costs 3 float32 values per pixel (the IMAGE) plus the uint8 drawing and one resize buffer.
_BYTES_PER_PIXEL = 3 * 4 + 2 * 3


def _recorded_size(features) -> tuple[int, int] | None:
    """(height, width) of the image the features came from, as given (else as the model saw it), when recorded."""
    return image_size(features.meta, "input_") or image_size(features.meta)


def _image_size(features, count: int, default=None) -> tuple[int, int]:
    """(height, width) of the output images, from the features' metadata (the input image's size), checked before
    anything is drawn: a bounded size, and `count` images of it must fit in the memory this process has."""
    size = _recorded_size(features) or default
    if size is None:
        raise ValueError("these features record no image size; choose size 'feature grid'")
    height, width = size
    _check_output_memory(count, height, width)
    return height, width


def _check_output_memory(count: int, height: int, width: int) -> None:
    from ..engine import memory_guard
    from ..engine.extraction import require

    needs: dict = {}
    memory_guard.add(needs, "cpu", "the output images", count * height * width * _BYTES_PER_PIXEL)
    require(needs, f"drawing {memory_guard.count(count, 'image')} of {width}x{height}",
            "choose size 'feature grid', or show fewer images")


def _pick(features, layer: str, want_map: bool) -> str:
    names = [k for k in features.tensors if k.endswith("-map") == want_map]
    if not names:
        kind = "attention-map" if want_map else "spatial"
        raise ValueError(f"these features hold no {kind} layer (they hold: {', '.join(features.tensors)})")
    layer = layer.strip()
    if not layer:
        return names[0]
    if layer not in features.tensors:
        raise ValueError(f"layer {echo(layer)} is not in these features; they hold: {', '.join(features.tensors)}")
    if layer not in names:
        raise ValueError(f"{echo(layer)} is {'not ' if want_map else ''}an attention map; use "
                         f"{'DFAttentionMap' if not want_map else 'DFFeaturePCA'} for it")
    return layer


def _as_image(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def _sized(rgb: list[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    """Feature images at (height, width), nearest-neighbour (to_image_size leaves the right size alone)."""
    return [np.asarray(to_image_size(a, (width, height))) for a in rgb]


class DFFeaturePCA:
    DESCRIPTION = ("Show one spatial layer as an RGB image: its first three principal components. Joint fitting "
                   "uses one PCA for the whole batch, so equal features get equal colours across images. A "
                   "text-token layer (vit-block{B}-txt-...) is shown as a strip of one cell per token.")
    CATEGORY = "diffusion_feature/visualize"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "pca"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features": ("DF_FEATURES", {"tooltip": "Features from DFExtractFeatures or DFLoadFeatures."}),
            "layer": ("STRING", {"default": "", "tooltip": "A spatial layer id of the features; empty: the first."}),
            "joint": ("BOOLEAN", {"default": True, "tooltip": "One PCA over the whole batch (comparable colours)."}),
        }, "optional": {
            **{f"features_{k}": ("DF_FEATURES", {"tooltip": "More features (e.g. another prompt, ControlNet or "
                                                            "LoRA) shown after the first, fitted in the same PCA "
                                                            "when joint: side by side with comparable colours."})
               for k in (2, 3, 4)},
            "foreground_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                               "tooltip": "Black out pixels whose first component is below this "
                                                          "(0: off)."}),
            "size": (["image", "feature grid"], {"default": "image",
                                                 "tooltip": "Output at the input image's size or the feature "
                                                            "grid's."}),
        }}

    def pca(self, features, layer="", joint=True, foreground_threshold=0.0, size="image", features_2=None,
            features_3=None, features_4=None):
        layer = _pick(features, layer, want_map=False)
        sets = [features] + [f for f in (features_2, features_3, features_4) if f is not None]
        for k, other in enumerate(sets[1:], start=2):
            if layer not in other.tensors:
                raise ValueError(f"features_{k} holds no layer {echo(layer)} (it holds: {', '.join(other.tensors)})")
        items = [x for f in sets for x in f.tensors[layer]]
        if is_text(layer):  # (C, T): PCA over the tokens, drawn as a strip of T cells (see TEXT_CELL)
            rgb = pca_rgb([x.unsqueeze(1) for x in items], joint=joint,
                          foreground_threshold=foreground_threshold or None)
            tokens = items[0].shape[-1]
            return (_as_image(_sized(rgb, TEXT_CELL if size == "image" else 1,
                                     tokens * (TEXT_CELL if size == "image" else 1))),)
        rgb = pca_rgb(items, joint=joint, foreground_threshold=foreground_threshold or None)
        if size == "image" and _recorded_size(features):
            height, width = _image_size(features, len(items))
        else:  # the first set's feature grid; every image of the batch gets that size
            height, width = features.tensors[layer].shape[-2:]
        return (_as_image(_sized(rgb, height, width)),)


class DFAttentionMap:
    DESCRIPTION = ("Show an attention map as a heatmap: for a cross-map, where the image attends to one text token; "
                   "for a self-map, where one query point attends. Returns the heatmap (over the image when given) "
                   "and a MASK in 0..1.")
    CATEGORY = "diffusion_feature/visualize"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heatmap", "mask")
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features": ("DF_FEATURES", {"tooltip": "Features holding a self-map or cross-map layer."}),
            "layer": ("STRING", {"default": "", "tooltip": "A -map layer id; empty: the first map."}),
            "token_index": ("INT", {"default": 1, "min": 0, "max": 4096,
                                    "tooltip": "cross-map: the text token (CLIP: 0 is the start token; Flux's T5: "
                                               "0 is the first word's first token)."}),
            "query_x": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "self-map: the query point's x, as a fraction of the width."}),
            "query_y": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "self-map: the query point's y, as a fraction of the height."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "Blend the heatmap over this image."}),
        }}

    def show(self, features, layer="", token_index=1, query_x=0.5, query_y=0.5, image=None):
        layer = _pick(features, layer, want_map=True)
        count = features.tensors[layer].shape[0]
        if image is not None:
            height, width = int(image.shape[1]), int(image.shape[2])
            _check_output_memory(count, height, width)
        else:
            height, width = _image_size(features, count, default=(512, 512))
        kwargs = {"token": token_index} if "cross-map" in layer else {"query": (query_x, query_y)}
        rgb, masks = attention_heatmap(features.tensors[layer], (height, width), **kwargs)
        heat = _as_image(list(rgb))
        if image is not None:
            base = image[..., :3].float()
            if base.shape[0] not in (1, heat.shape[0]):
                raise ValueError(f"{base.shape[0]} images for {heat.shape[0]} heatmaps")
            heat = 0.5 * heat + 0.5 * base
        return (heat, torch.from_numpy(masks))


class DFSelfAttentionPCA:
    DESCRIPTION = ("Show a self-attention map as an RGB image: each position's attention row (where it looks, "
                   "averaged over heads) projected on three principal components, as Plug-and-Play shows its "
                   "self-attention. Joint fitting over the batch compares images or the steps of a timeline.")
    CATEGORY = "diffusion_feature/visualize"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "pca"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features": ("DF_FEATURES", {"tooltip": "Features holding a self-map layer."}),
            "layer": ("STRING", {"default": "", "tooltip": "A -self-map layer id; empty: the first self-map."}),
            "joint": ("BOOLEAN", {"default": True, "tooltip": "One PCA over the whole batch (comparable colours)."}),
        }, "optional": {
            "size": (["image", "feature grid"], {"default": "image",
                                                 "tooltip": "Output at the input image's size or the grid's."}),
        }}

    def pca(self, features, layer="", joint=True, size="image"):
        if not layer.strip():
            layer = next((k for k in features.tensors if k.endswith("-self-map")), "")
            if not layer:
                raise ValueError(f"these features hold no self-map layer (they hold: {', '.join(features.tensors)})")
        layer = _pick(features, layer, want_map=True)
        if not layer.endswith("-self-map"):
            raise ValueError(f"{echo(layer)} is not a self-attention map; give a -self-map layer")
        height, width = _image_size(features, features.tensors[layer].shape[0] if size == "image" else 0)
        rgb = self_attention_pca(features.tensors[layer], (height, width), joint=joint)
        return (_as_image(_sized(rgb, height, width) if size == "image" else rgb),)

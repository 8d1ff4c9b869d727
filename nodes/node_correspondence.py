"""DFMatchPoints and DFSimilarityMap: two images' features -> matched points, a similarity heat map (thin faces over
engine/correspondence.py)."""
from __future__ import annotations

import numpy as np
import torch

from ..engine.correspondence import describe, match_points, parse_points, similarity_map
from ..engine.visualize import draw_matches, heatmaps, preview_data_url
from .node_visualize import _as_image, _check_output_memory

_FEATURES_TIP = "Features of image {} (DFExtractNative, DFExtractFeatures or DFLoadFeatures), the same layers."
_LAYERS_TIP = ("Layer ids to match on, comma separated (each upsampled to the finest grid and L2-normalised, then "
               "concatenated); empty: every spatial layer of the features.")


def _size(image) -> tuple[int, int]:
    """(width, height) of a ComfyUI IMAGE [B, H, W, C]."""
    return int(image.shape[2]), int(image.shape[1])


def _row(image, i: int) -> np.ndarray:
    """Row i of an IMAGE (the last one for a shorter batch) as uint8 RGB."""
    x = image[min(i, image.shape[0] - 1), ..., :3].float().clamp(0, 1)
    return (x * 255).round().to(torch.uint8).cpu().numpy()


class DFMatchPoints:
    DESCRIPTION = ("Find, for each point of image A, the matching point of image B: nearest neighbours of the "
                   "diffusion features (semantic correspondence, as DIFT). Returns A and B side by side with a "
                   "coloured line per match, and the matched points of B as text.")
    CATEGORY = "diffusion_feature/correspondence"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("matches", "points_b")
    FUNCTION = "match"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features_a": ("DF_FEATURES", {"tooltip": _FEATURES_TIP.format("A")}),
            "features_b": ("DF_FEATURES", {"tooltip": _FEATURES_TIP.format("B")}),
            "image_a": ("IMAGE", {"tooltip": "Image A, as given to the extraction (points are its pixels)."}),
            "image_b": ("IMAGE", {"tooltip": "Image B, as given to the extraction."}),
            "points": ("STRING", {"default": "64,64; 128,128", "multiline": True,
                                  "tooltip": "Points of image A in pixels: 'x,y; x,y' (or one per line)."}),
            "layers": ("STRING", {"default": "", "tooltip": _LAYERS_TIP}),
            "window": ("INT", {"default": 0, "min": 0, "max": 16,
                               "tooltip": "Soft-argmax window in feature cells around the best match, for sub-cell "
                                          "positions; 0: the best cell's centre."}),
        }}

    def match(self, features_a, features_b, image_a, image_b, points, layers="", window=0):
        layers = layers or None
        da = describe(features_a, layers, size=_size(image_a))
        db = describe(features_b, layers or list(da.layers), size=_size(image_b))
        pts = parse_points(points)
        found = match_points(da, db, pts, window=window)
        batch = found.points.shape[0]
        _check_output_memory(batch, max(image_a.shape[1], image_b.shape[1]), image_a.shape[2] + image_b.shape[2])
        drawn = [draw_matches(_row(image_a, i), _row(image_b, i), pts, found.points[i].tolist())
                 for i in range(batch)]
        text = "\n".join("; ".join(f"{x:.1f},{y:.1f}" for x, y in row) for row in found.points.tolist())
        return (_as_image(drawn), text)


class DFSimilarityMap:
    DESCRIPTION = ("Show how similar every place of image B is to one query point of image A (the cosine "
                   "similarity of their diffusion features) as a heat map, blended over image B when given; and "
                   "the similarity as a MASK in 0..1. With image_a connected, the node shows A beside the heat map: "
                   "click on A to query another point (the graph runs again; only this node recomputes).")
    CATEGORY = "diffusion_feature/correspondence"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heatmap", "mask")
    FUNCTION = "show"
    OUTPUT_NODE = True  # its preview (A | heat map over B) is what the click-to-query acts on

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features_a": ("DF_FEATURES", {"tooltip": _FEATURES_TIP.format("A (the query's image)")}),
            "features_b": ("DF_FEATURES", {"tooltip": _FEATURES_TIP.format("B (where the heat map is drawn)")}),
            "x": ("FLOAT", {"default": 64.0, "min": 0.0, "max": 16384.0, "step": 1.0,
                            "tooltip": "The query point's x, in pixels of image A (or click on A in the preview)."}),
            "y": ("FLOAT", {"default": 64.0, "min": 0.0, "max": 16384.0, "step": 1.0,
                            "tooltip": "The query point's y, in pixels of image A (or click on A in the preview)."}),
            "layers": ("STRING", {"default": "", "tooltip": _LAYERS_TIP}),
        }, "optional": {
            "image_b": ("IMAGE", {"tooltip": "Blend the heat map over image B (and take its size)."}),
            "image_a": ("IMAGE", {"tooltip": "Image A, shown beside the heat map in the node's preview with the query "
                                             "point and its best match; click on it to query another point."}),
        }}

    def show(self, features_a, features_b, x, y, layers="", image_b=None, image_a=None):
        layers = layers or None
        da = describe(features_a, layers, size=_size(image_a) if image_a is not None else None)
        db = describe(features_b, layers or list(da.layers), size=_size(image_b) if image_b is not None else None)
        sim = similarity_map(da, db, (x, y))
        _check_output_memory(sim.shape[0], db.height, db.width)
        rgb, masks = heatmaps(sim.float().cpu().numpy(), (db.height, db.width))
        heat = _as_image(list(rgb))
        if image_b is not None:
            base = image_b[..., :3].float().cpu()
            if base.shape[0] not in (1, heat.shape[0]):
                raise ValueError(f"image_b holds {base.shape[0]} images for {heat.shape[0]} heat maps")
            heat = 0.5 * heat + 0.5 * base
        preview = {"b_width": db.width, "b_height": db.height, "x": x, "y": y}
        if image_a is not None:  # A | heat map, the query joined to its best match: what a click acts on
            best = match_points(da, db, [(x, y)]).points[0].tolist()
            drawn = draw_matches(_row(image_a, 0), _row(heat, 0), [(x, y)], best)
            preview.update(image=preview_data_url(drawn), a_width=da.width, a_height=da.height)
        else:
            preview["image"] = preview_data_url(_row(heat, 0))
        return {"ui": {"df_similarity": [preview]}, "result": (heat, torch.from_numpy(masks))}

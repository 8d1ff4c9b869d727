"""Looking at features: PCA to RGB, and attention-map heatmaps.

PCA can be fitted per image or jointly over a batch. Joint fitting (what Plug-and-Play does for its figures) uses one
projection and one colour range for every image, so the same feature vector gets the same colour everywhere.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from sklearn.decomposition import PCA


def _fit_project(x: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, 3) principal components, colours scaled to 0..1 over these N rows."""
    n_comp = min(3, x.shape[0], x.shape[1])
    proj = PCA(n_components=n_comp, svd_solver="full").fit_transform(x)
    if n_comp < 3:
        proj = np.concatenate([proj, np.zeros((proj.shape[0], 3 - n_comp))], axis=1)
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    return (proj - lo) / np.where(hi > lo, hi - lo, 1.0)


def pca_rgb(features: torch.Tensor, joint: bool = True, foreground_threshold: float | None = None) -> np.ndarray:
    """(B, C, H, W) features -> (B, H, W, 3) uint8 RGB.

    joint: one PCA for the whole batch (comparable colours); else one per image.
    foreground_threshold: in 0..1; pixels whose first component (scaled to 0..1) is below it become black.
    """
    if features.ndim != 4:
        raise ValueError(f"PCA needs spatial features (B, C, H, W); got shape {tuple(features.shape)} "
                         "(attention maps are shown with attention_heatmap instead)")
    if foreground_threshold is not None and not 0.0 <= foreground_threshold <= 1.0:
        raise ValueError(f"foreground_threshold must be in 0..1, got {foreground_threshold}")
    b, c, h, w = features.shape
    rows = features.detach().float().permute(0, 2, 3, 1).reshape(b, h * w, c).cpu().numpy().astype(np.float64)
    if joint:
        rgb = _fit_project(rows.reshape(b * h * w, c)).reshape(b, h * w, 3)
    else:
        rgb = np.stack([_fit_project(r) for r in rows])
    if foreground_threshold is not None:
        rgb = np.where(rgb[..., :1] >= foreground_threshold, rgb, 0.0)
    return (rgb.reshape(b, h, w, 3) * 255).round().astype(np.uint8)


def grid_for(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of `tokens` queries for an image of height x width: the factorisation whose aspect is
    closest to the image's (never sqrt(N), which is wrong for every non-square image)."""
    target = math.log(width / height)
    _, h = min((abs(math.log(tokens // h / h) - target), h) for h in range(1, tokens + 1) if tokens % h == 0)
    return h, tokens // h


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> RGB in 0..1 along black, red, yellow, white (readable in print and for colour-blindness)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 0], [0.8, 0.1, 0.1], [1.0, 0.85, 0.1], [1, 1, 1]], dtype=np.float64)
    pos = v * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    frac = pos - i
    return stops[i[..., 0]] * (1 - frac) + stops[i[..., 0] + 1] * frac


def attention_heatmap(maps: torch.Tensor, image_size: tuple[int, int], *, token: int | None = None,
                      query: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, heads, Nq, Nk) attention probabilities -> (uint8 RGB heatmaps (B, H, W, 3), float masks (B, H, W)).

    cross-map: give `token` (index of the text token). self-map: give `query` as (x, y) in 0..1 of the image; the
    heatmap shows where that location attends. Maps are averaged over heads and scaled to 0..1 per image.
    """
    if maps.ndim != 4:
        raise ValueError(f"attention maps are (B, heads, Nq, Nk); got shape {tuple(maps.shape)}")
    height, width = image_size
    b, _heads, nq, nk = maps.shape
    mean = maps.detach().float().mean(dim=1)  # (B, Nq, Nk)
    if (token is None) == (query is None):
        raise ValueError("give exactly one of token (cross-map) or query (self-map)")
    if token is not None:
        if not 0 <= token < nk:
            raise ValueError(f"token index {token} is outside 0..{nk - 1}")
        values, grid_tokens = mean[:, :, token], nq
    else:
        x, y = query
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"query point {query} must be (x, y) fractions in 0..1")
        gh, gw = grid_for(nq, height, width)
        index = min(int(y * gh), gh - 1) * gw + min(int(x * gw), gw - 1)
        values, grid_tokens = mean[:, index, :], nk
    gh, gw = grid_for(grid_tokens, height, width)
    values = values.reshape(b, gh, gw).cpu().numpy()
    lo, hi = values.min(axis=(1, 2), keepdims=True), values.max(axis=(1, 2), keepdims=True)
    values = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    masks = np.stack([np.asarray(Image.fromarray((v * 255).astype(np.uint8)).resize((width, height),
                                                                                    Image.Resampling.BILINEAR),
                                 dtype=np.float32) / 255.0 for v in values])
    return (heat_colors(masks) * 255).round().astype(np.uint8), masks


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> list[Image.Image]:
    """(B, h, w, 3) uint8 -> PIL images of size (width, height), nearest-neighbour so feature cells stay crisp."""
    return [Image.fromarray(a).resize(size, Image.Resampling.NEAREST) for a in rgb]

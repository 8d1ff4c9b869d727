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


def pca_rgb(features, joint: bool = True, foreground_threshold: float | None = None) -> list[np.ndarray]:
    """Spatial features -> one (H, W, 3) uint8 RGB array per image.

    features: a (B, C, H, W) tensor or a list of (C, H, W) tensors (their grids may differ, e.g. images of
    different aspect ratios). joint: one PCA and one colour range for all of them (comparable colours); else one
    per image. foreground_threshold: in 0..1; pixels whose first component (scaled to 0..1) is below it are black.
    """
    items = list(features) if isinstance(features, (list, tuple)) else None
    if items is None:
        if features.ndim != 4:
            raise ValueError(f"PCA needs spatial features (B, C, H, W); got shape {tuple(features.shape)} "
                             "(attention maps are shown with attention_heatmap instead)")
        items = list(features)
    if not items or any(x.ndim != 3 for x in items):
        raise ValueError("PCA needs spatial features: (C, H, W) per image")
    if len({x.shape[0] for x in items}) != 1:
        raise ValueError("PCA over several images needs the same channel count in each")
    if foreground_threshold is not None and not 0.0 <= foreground_threshold <= 1.0:
        raise ValueError(f"foreground_threshold must be in 0..1, got {foreground_threshold}")
    rows = [x.detach().float().flatten(1).T.cpu().numpy().astype(np.float64) for x in items]  # (H*W, C) each
    if joint:
        colours = _fit_project(np.concatenate(rows))
        bounds = np.cumsum([0] + [len(r) for r in rows])
        rgb = [colours[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        rgb = [_fit_project(r) for r in rows]
    out = []
    for x, c in zip(items, rgb):
        if foreground_threshold is not None:
            c = np.where(c[:, :1] >= foreground_threshold, c, 0.0)
        out.append((c.reshape(x.shape[1], x.shape[2], 3) * 255).round().astype(np.uint8))
    return out


def self_attention_pca(maps: torch.Tensor, image_size: tuple[int, int], joint: bool = True) -> list[np.ndarray]:
    """Self-attention maps (B, heads, N, N) -> one (h, w, 3) uint8 image per row: each query's attention row
    (averaged over heads) is its feature vector, projected on three principal components on the query grid, as
    Plug-and-Play shows its self-attention. Joint: one PCA for every row (e.g. every step of a timeline)."""
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"self-attention PCA needs self-maps (B, heads, N, N); got shape {tuple(maps.shape)} "
                         "(a cross-map attends to text tokens, not to image positions)")
    n = maps.shape[-1]
    h, w = grid_for(n, *image_size)
    rows = maps.detach().float().mean(dim=1)  # (B, Nq, Nk): row q = where query q attends
    return pca_rgb([r.T.reshape(n, h, w) for r in rows], joint=joint)  # channels = keys, grid = queries


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
    return heatmaps(values.reshape(b, gh, gw).cpu().numpy(), image_size)


def heatmaps(values: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(B, h, w) values on a grid -> (uint8 RGB heatmaps (B, H, W, 3), float masks (B, H, W)) at image_size
    (height, width): scaled to 0..1 per image, resized bilinearly."""
    height, width = image_size
    lo, hi = values.min(axis=(1, 2), keepdims=True), values.max(axis=(1, 2), keepdims=True)
    values = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    masks = np.stack([np.asarray(Image.fromarray((v * 255).astype(np.uint8)).resize((width, height),
                                                                                    Image.Resampling.BILINEAR),
                                 dtype=np.float32) / 255.0 for v in values])
    return (heat_colors(masks) * 255).round().astype(np.uint8), masks


def to_image_size(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An (h, w, 3) uint8 feature image as a PIL image of size (width, height): nearest-neighbour, so each feature
    cell stays a crisp block over the part of the input image it describes."""
    image = Image.fromarray(rgb)
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.NEAREST)


def save_png(rgb: np.ndarray, path, size: tuple[int, int] | None = None) -> None:
    """Write an (H, W, 3) uint8 array as PNG (resized to `size` = (width, height) when given), atomically and never
    over an existing file."""
    from pathlib import Path

    from .features_io import write_atomic

    image = to_image_size(rgb, size) if size is not None else Image.fromarray(rgb)
    write_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def match_colors(n: int) -> list[tuple[int, int, int]]:
    """n distinct bright colours (hues around the circle), one per drawn match."""
    import colorsys

    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.85, 1.0)) for i in range(n)]


def draw_matches(image_a: np.ndarray, image_b: np.ndarray, points_a, points_b) -> np.ndarray:
    """Two uint8 RGB images (H, W, 3) side by side (A left, B right, top-aligned on black) with a coloured line and
    end markers per match; points are pixels (x, y) of their own image."""
    from PIL import ImageDraw

    ha, wa = image_a.shape[:2]
    hb, wb = image_b.shape[:2]
    canvas = Image.new("RGB", (wa + wb, max(ha, hb)))
    canvas.paste(Image.fromarray(image_a), (0, 0))
    canvas.paste(Image.fromarray(image_b), (wa, 0))
    draw = ImageDraw.Draw(canvas)
    radius = max(2, round(min(wa + wb, max(ha, hb)) / 100))
    for color, (xa, ya), (xb, yb) in zip(match_colors(len(points_a)), points_a, points_b):
        draw.line([(xa, ya), (wa + xb, yb)], fill=color, width=max(1, radius // 2))
        for x, y in ((xa, ya), (wa + xb, yb)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, width=max(1, radius // 2))
    return np.asarray(canvas)


def preview_data_url(rgb: np.ndarray, max_side: int = 768) -> str:
    """A uint8 RGB image as a JPEG data URL for a node's preview in the browser (no file is written), its longer
    side at most max_side pixels."""
    import base64
    import io

    image = Image.fromarray(rgb)
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

"""Semantic correspondence on diffusion features: which point of image B matches a point of image A.

The descriptor of an image is built as DIFT and the reference project build it: every chosen layer (C, h, w) is
upsampled bilinearly to one common grid (the finest of the set), L2-normalised over its channels (so a layer's
weight does not depend on its width), and the layers are concatenated and normalised once more, so a dot product
of two descriptors is their cosine similarity. Everything runs batched on the features' own device.

Points are pixels (x, y) of the image as given (the size recorded in the features' metadata as input_width /
input_height: under the keep-aspect and stretch resize policies the feature grid covers that whole image; pass the
size yourself after a center-crop). Pixel x has its centre at x; the feature cell j of a grid of w cells spanning
W pixels has its centre at pixel (j + 0.5) * W / w - 0.5, so conversions hold for non-square images and for grids
that do not divide the image.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layer_catalog.errors import DiffusionFeatureError, echo


class CorrespondenceError(DiffusionFeatureError, ValueError):
    """Features or points that cannot be matched; the message says what would be valid."""


@dataclass
class Descriptors:
    """Unit-norm descriptors (B, D, h, w) of images of `width` x `height` pixels (the pixels points refer to)."""

    tensor: torch.Tensor
    width: int
    height: int
    layers: tuple[str, ...]
    family: str | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])


@dataclass
class Matches:
    """points: (B, N, 2) matched pixels (x, y) in image B; scores: (B, N) cosine similarity at the match."""

    points: torch.Tensor
    scores: torch.Tensor


def _layer_list(layers, available) -> list[str]:
    if layers is None:
        chosen = [k for k in available if not k.endswith("-map")]
        if not chosen:
            raise CorrespondenceError("these features hold no spatial layer (only attention maps): extract spatial "
                                      "layers (e.g. a preset such as practical) to match points")
        return chosen
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    chosen = list(layers)
    if not chosen:
        raise CorrespondenceError("layers is empty: give layer ids of the features, or None for all spatial ones")
    return chosen


def describe(features, layers=None, *, size: tuple[int, int] | None = None, grid: tuple[int, int] | None = None
             ) -> Descriptors:
    """Descriptors of DF_FEATURES (a Features or a {layer id: (B, C, h, w)} dict; given Descriptors are returned
    as they are).

    layers: ids (a list or comma-separated), default every spatial layer. size: (width, height) of the images the
    points refer to (default: the metadata's input size, else its size). grid: (h, w) to resample to (default the
    finest grid of the layers)."""
    if isinstance(features, Descriptors):
        return features
    tensors = getattr(features, "tensors", features)
    meta = getattr(features, "meta", {}) or {}
    if not isinstance(tensors, dict) or not tensors:
        raise CorrespondenceError("features to match must be DF_FEATURES (or a dict of layer id -> tensor) holding "
                                  "at least one layer")
    chosen = _layer_list(layers, list(tensors))
    for name in chosen:
        if name not in tensors:
            raise CorrespondenceError(f"layer {echo(name)} is not in these features; they hold: "
                                      f"{', '.join(tensors)}")
        if name.endswith("-map") or tensors[name].dim() != 4:
            raise CorrespondenceError(f"layer {echo(name)} is not a spatial feature (B, C, H, W): attention maps "
                                      "cannot be matched; choose spatial layers")
    if size is None:
        size = _meta_size(meta)
    width, height = _check_size(size)
    maps = [tensors[name] for name in chosen]
    if len({m.shape[0] for m in maps}) != 1:
        raise CorrespondenceError("the chosen layers hold different batch sizes; they must come from one extraction")
    if grid is None:
        grid = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    device = maps[0].device
    parts = []
    for m in maps:
        m = m.to(device, torch.float32)
        if tuple(m.shape[-2:]) != tuple(grid):
            m = F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False)
        parts.append(F.normalize(m, dim=1))
    stacked = F.normalize(torch.cat(parts, dim=1), dim=1)
    return Descriptors(stacked, width, height, tuple(chosen), meta.get("family"))


def _meta_size(meta: dict) -> tuple[int, int]:
    for prefix in ("input_", ""):
        if f"{prefix}width" in meta and f"{prefix}height" in meta:
            return int(meta[f"{prefix}width"]), int(meta[f"{prefix}height"])
    raise CorrespondenceError("these features record no image size: pass size=(width, height) of the images the "
                              "points refer to")


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise CorrespondenceError(f"an image size must be (width, height) in pixels, got {echo(size)}") from None
    if width < 1 or height < 1:
        raise CorrespondenceError(f"an image size must be positive (width, height), got {echo(size)}")
    return width, height


def _pair(a, b, layers, size_a, size_b) -> tuple[Descriptors, Descriptors]:
    """Descriptors of both sides on a's device, checked to be comparable (same family, same layers and widths)."""
    da = describe(a, layers, size=size_a)
    db = describe(b, list(da.layers) if layers is None and not isinstance(b, Descriptors) else layers, size=size_b)
    if da.family and db.family and da.family != db.family:
        raise CorrespondenceError(f"features of family {da.family!r} cannot be matched with features of "
                                  f"{db.family!r}: extract both images with the same model")
    if da.layers != db.layers or da.tensor.shape[1] != db.tensor.shape[1]:
        raise CorrespondenceError(f"the two feature sets hold different layers or channel counts ({', '.join(da.layers)}"
                                  f" vs {', '.join(db.layers)}): extract both with the same layers and model")
    if da.tensor.shape[0] != db.tensor.shape[0] and 1 not in (da.tensor.shape[0], db.tensor.shape[0]):
        raise CorrespondenceError(f"batches of {da.tensor.shape[0]} and {db.tensor.shape[0]} images cannot be paired:"
                                  " give equal batches, or one image on either side")
    if db.tensor.device != da.tensor.device:
        db = Descriptors(db.tensor.to(da.tensor.device), db.width, db.height, db.layers, db.family)
    return da, db


def parse_points(text: str) -> list[tuple[float, float]]:
    """'x,y; x,y' (pixels) -> [(x, y), ...]; newlines also separate points."""
    points = []
    for part in re.split(r"[;\n]", text or ""):
        if not part.strip():
            continue
        fields = part.split(",")
        try:
            if len(fields) != 2:
                raise ValueError
            points.append((float(fields[0]), float(fields[1])))
        except ValueError:
            raise CorrespondenceError(f"points must be written 'x,y; x,y' in pixels, got {echo(part.strip())}"
                                      ) from None
    if not points:
        raise CorrespondenceError("no points given: write them as 'x,y; x,y' in pixels of image A")
    return points


def _points_tensor(points, batch: int, width: int, height: int, device) -> torch.Tensor:
    """(N, 2) or (B, N, 2) pixels -> (B, N, 2) float32, each inside the image (0 <= x <= width, 0 <= y <= height)."""
    if isinstance(points, str):
        points = parse_points(points)
    p = torch.as_tensor(points, dtype=torch.float32, device=device)
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(batch, -1, -1)
    if p.dim() != 3 or p.shape[-1] != 2 or p.shape[0] != batch or p.shape[1] == 0:
        raise CorrespondenceError(f"points must be (N, 2) or ({batch}, N, 2) pixel pairs (x, y), got shape "
                                  f"{tuple(p.shape)}")
    bad = ~torch.isfinite(p).all(-1) | (p[..., 0] < 0) | (p[..., 0] > width) | (p[..., 1] < 0) | (p[..., 1] > height)
    if bad.any():
        x, y = p[bad][0].tolist()
        raise CorrespondenceError(f"point ({x:g}, {y:g}) lies outside image A of {width}x{height} pixels: points must "
                                  f"have 0 <= x <= {width} and 0 <= y <= {height}")
    return p


def pixels_to_cells(points: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Pixels (x, y) of an image of size (width, height) -> continuous cell coordinates (u, v) of an (h, w) grid,
    cell centres at integers."""
    (width, height), (h, w) = size, grid
    scale = points.new_tensor([w / width, h / height])
    return (points + 0.5) * scale - 0.5


def cells_to_pixels(cells: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of pixels_to_cells."""
    (width, height), (h, w) = size, grid
    scale = cells.new_tensor([width / w, height / h])
    return (cells + 0.5) * scale - 0.5


def sample_descriptors(d: Descriptors, points: torch.Tensor) -> torch.Tensor:
    """Unit descriptors (B, N, D) at pixel points (B, N, 2), bilinear between cells."""
    norm = (points + 0.5) / points.new_tensor([d.width, d.height]) * 2 - 1
    out = F.grid_sample(d.tensor, norm.unsqueeze(2), mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(out.squeeze(-1).transpose(1, 2), dim=-1)


def _similarities(query: torch.Tensor, db: Descriptors) -> torch.Tensor:
    """Cosine similarity (B, N, h, w) of queries (B, N, D) with every cell of db."""
    h, w = db.grid
    batch = max(query.shape[0], db.tensor.shape[0])
    cells = db.tensor.expand(batch, -1, -1, -1).flatten(2)
    return torch.bmm(query.expand(batch, -1, -1), cells).view(batch, -1, h, w)


def _argmax_cells(sim: torch.Tensor, window: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, h, w) similarities -> cell coordinates (B, N, 2) as (u, v) and the peak similarity (B, N).
    window > 0: a soft-argmax over the cells within `window` cells (Chebyshev) of the peak, weights
    softmax(similarity / temperature)."""
    h, w = sim.shape[-2:]
    flat = sim.flatten(2)
    score, index = flat.max(-1)
    v, u = (index // w).float(), (index % w).float()
    if window <= 0:
        return torch.stack([u, v], -1), score
    ys = torch.arange(h, device=sim.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=sim.device, dtype=torch.float32).view(1, 1, 1, w)
    near = ((ys - v[..., None, None]).abs() <= window) & ((xs - u[..., None, None]).abs() <= window)
    weights = torch.softmax((sim / temperature).masked_fill(~near, float("-inf")).flatten(2), -1).view_as(sim)
    u = (weights * xs).sum((-2, -1))
    v = (weights * ys).sum((-2, -1))
    return torch.stack([u, v], -1), score


def _check_window(window, temperature) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise CorrespondenceError(f"window must be an integer >= 0 (cells around the peak for a soft-argmax; 0 is "
                                  f"the plain argmax), got {echo(window)}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise CorrespondenceError(f"temperature must be a number > 0, got {echo(temperature)}")


def match_points(a, b, points, layers=None, *, size_a=None, size_b=None, window: int = 0,
                 temperature: float = 0.02) -> Matches:
    """For each pixel point of image A, its nearest neighbour in image B (cosine similarity of the descriptors).

    a, b: DF_FEATURES, {layer id: tensor} dicts or Descriptors, batches of equal size (or one image on a side).
    points: 'x,y; x,y', (N, 2) for every image of the batch, or (B, N, 2). window / temperature: an optional
    soft-argmax around the peak (window in cells), for sub-cell positions."""
    _check_window(window, temperature)
    da, db = _pair(a, b, layers, size_a, size_b)
    batch = max(da.tensor.shape[0], db.tensor.shape[0])
    p = _points_tensor(points, batch, da.width, da.height, da.tensor.device)
    query = sample_descriptors(Descriptors(da.tensor.expand(batch, -1, -1, -1), da.width, da.height, da.layers), p)
    cells, score = _argmax_cells(_similarities(query, db), window, temperature)
    return Matches(cells_to_pixels(cells, (db.width, db.height), db.grid), score)


def similarity_map(a, b, point, layers=None, *, size_a=None, size_b=None) -> torch.Tensor:
    """The cosine similarity (B, h, w) of one pixel point (x, y) of image A with every feature cell of image B."""
    da, db = _pair(a, b, layers, size_a, size_b)
    batch = max(da.tensor.shape[0], db.tensor.shape[0])
    p = _points_tensor([tuple(point)] if not isinstance(point, str) else point, batch, da.width, da.height,
                       da.tensor.device)
    if p.shape[1] != 1:
        raise CorrespondenceError(f"similarity_map takes one query point, got {p.shape[1]}")
    query = sample_descriptors(Descriptors(da.tensor.expand(batch, -1, -1, -1), da.width, da.height, da.layers), p)
    return _similarities(query, db)[:, 0]


@dataclass
class MutualMatches:
    """One image pair's mutual nearest neighbours: points_a (M, 2) and points_b (M, 2) pixels (cell centres),
    scores (M,) their cosine similarity."""

    points_a: torch.Tensor
    points_b: torch.Tensor
    scores: torch.Tensor


def mutual_matches(a, b, layers=None, *, size_a=None, size_b=None) -> list[MutualMatches]:
    """Mutual nearest neighbours: the cells of A whose best match in B has them as its best match in A, one
    MutualMatches per image pair of the batch."""
    da, db = _pair(a, b, layers, size_a, size_b)
    batch = max(da.tensor.shape[0], db.tensor.shape[0])
    wa, wb = da.grid[1], db.grid[1]
    out = []
    for i in range(batch):
        fa = da.tensor[min(i, da.tensor.shape[0] - 1)].flatten(1)
        fb = db.tensor[min(i, db.tensor.shape[0] - 1)].flatten(1)
        sim = fa.T @ fb  # (Na, Nb)
        ab = sim.argmax(1)
        ba = sim.argmax(0)
        src = torch.nonzero(ba[ab] == torch.arange(ab.shape[0], device=ab.device)).squeeze(1)
        dst = ab[src]
        cells_a = torch.stack([(src % wa).float(), (src // wa).float()], -1)
        cells_b = torch.stack([(dst % wb).float(), (dst // wb).float()], -1)
        out.append(MutualMatches(cells_to_pixels(cells_a, (da.width, da.height), da.grid),
                                 cells_to_pixels(cells_b, (db.width, db.height), db.grid), sim[src, dst]))
    return out

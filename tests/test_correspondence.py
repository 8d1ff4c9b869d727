"""Point matching (engine/correspondence.py) against geometric ground truth: a bundled image shifted, scaled and
flipped, described by features that are equivariant by construction (its own pixels: local colour patches,
symmetric under horizontal flips, at two grids), so every match must land on the true position's cell."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_feature.engine.commands import SAMPLES
from diffusion_feature.engine.correspondence import (CorrespondenceError, cells_to_pixels, describe, match_points,
                                                     mutual_matches, parse_points, pixels_to_cells, similarity_map)
from diffusion_feature.engine.features_io import Features

FINE, COARSE = "up-level2-repeat0-res-out", "up-level1-repeat0-res-out"
W, H = 160, 120  # non-square on purpose


def _tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def pixel_features(image: torch.Tensor, stride: int) -> dict[str, torch.Tensor]:
    """Features of an image's own pixels: each cell's 5x5 neighbourhood of `stride`-pooled colours minus its own
    colour, folded so it is symmetric under a horizontal flip (FINE, one cell per stride), and the colours pooled
    over twice the stride (COARSE, half the grid, so matching must upsample it)."""
    fine = F.avg_pool2d(image[None], stride)
    patch = F.unfold(F.pad(fine, (2, 2, 2, 2), mode="replicate"), 5).view(1, 3, 5, 5, *fine.shape[-2:])
    patch = patch - fine[:, :, None, None]
    patch = (patch + patch.flip(3))[:, :, :, :3].reshape(1, -1, *fine.shape[-2:])
    return {FINE: patch, COARSE: F.avg_pool2d(image[None], 2 * stride) - 0.5}


def distinct_points(features: dict, stride: int) -> torch.Tensor:
    """Cell centres (pixels) of image A whose descriptor is unlike every cell more than one cell away (cosine below
    0.95) and away from the border (where padding breaks equivariance): points with one right answer. Computed
    here independently of the library."""
    h, w = features[FINE].shape[-2:]
    parts = [F.normalize(F.interpolate(v, size=(h, w), mode="bilinear"), dim=1) for v in features.values()]
    f = F.normalize(torch.cat(parts, 1)[0].flatten(1), dim=0)
    sim = f.T @ f
    ys, xs = (g.flatten() for g in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    far = ((ys[:, None] - ys[None]).abs() > 1) | ((xs[:, None] - xs[None]).abs() > 1)
    second = sim.masked_fill(~far, -2).max(1).values
    keep = (second < 0.95) & (xs >= 2) & (xs < w - 2) & (ys >= 2) & (ys < h - 2)
    return torch.stack([xs[keep] * stride + stride / 2 - 0.5, ys[keep] * stride + stride / 2 - 0.5], 1).float()


@pytest.fixture(scope="module")
def house():
    return Image.open(SAMPLES / "house.jpg").convert("RGB")


def _cases(house):
    """(image A, image B, stride of B's features, true position in B of a pixel of A). Box resizes by integer
    factors, so a scaled image's pooled colours are those of the original's blocks."""
    a = _tensor(house.resize((W, H), Image.BOX))
    canvas = _tensor(house.resize((200, 150), Image.BOX))
    return {
        "flip": (a, a.flip(-1), 4, lambda p: torch.stack([W - 1 - p[:, 0], p[:, 1]], 1)),
        "scale": (a, _tensor(house.resize((2 * W, 2 * H), Image.BOX)), 8, lambda p: (p + 0.5) * 2 - 0.5),
        "shift": (canvas[:, 16:136, 20:180], canvas[:, 8:128, 28:188], 4, lambda p: p + torch.tensor([-8.0, 8.0])),
    }


@pytest.mark.parametrize("case", ["flip", "scale", "shift"])
def test_matches_land_on_the_true_cell(house, case):
    a, b, stride, truth = _cases(house)[case]
    fa, fb = pixel_features(a, 4), pixel_features(b, stride)
    points = distinct_points(fa, 4)
    assert len(points) >= 40
    feats_a = Features(fa, {"family": "sd15", "input_width": W, "input_height": H})
    feats_b = Features(fb, {"family": "sd15", "input_width": b.shape[2], "input_height": b.shape[1]})
    m = match_points(feats_a, feats_b, points)
    cell = b.shape[2] / fb[FINE].shape[-1]  # pixels of B per feature cell
    error = (m.points[0] - truth(points)).abs().max(1).values
    assert error.max() <= cell, (case, error.max())
    assert m.points.shape == (1, len(points), 2) and m.scores.shape == (1, len(points))
    assert torch.all(m.scores <= 1 + 1e-5) and torch.all(m.scores > 0.9)


def test_batched_pairs_and_points_per_row(house):
    """A batch of two pairs (B flipped in row 0, unchanged in row 1) with one point list each."""
    a, b, _, truth = _cases(house)["flip"]
    fa = pixel_features(a, 4)
    points = distinct_points(fa, 4)
    fa2 = {k: v.expand(2, -1, -1, -1) for k, v in fa.items()}
    fb2 = {k: torch.cat([v, fa[k]]) for k, v in pixel_features(b, 4).items()}
    m = match_points(fa2, fb2, torch.stack([points, points.flip(0)]), size_a=(W, H), size_b=(W, H))
    assert torch.equal(m.points[0], truth(points)) and torch.equal(m.points[1], points.flip(0))


def test_cell_conversions_of_a_non_square_grid():
    size, grid = (100, 30), (4, 9)  # 100x30 pixels (WxH) on 4 rows x 9 columns: neither divides evenly
    centres = torch.tensor([[0.0, 0.0], [8.0, 3.0]])
    pixels = cells_to_pixels(centres, size, grid)
    torch.testing.assert_close(pixels, torch.tensor([[100 / 18 - 0.5, 30 / 8 - 0.5],
                                                     [8.5 * 100 / 9 - 0.5, 3.5 * 30 / 4 - 0.5]]))
    torch.testing.assert_close(pixels_to_cells(pixels, size, grid), centres)


def test_soft_argmax_finds_the_point_between_two_cells():
    """B's best cells are two neighbours equally similar to the query: the hard argmax takes one, the soft-argmax
    their midpoint (within the window; a far, equally similar cell outside it does not pull)."""
    fa = torch.zeros(1, 2, 1, 1)
    fa[0, 0] = 1
    fb = torch.zeros(1, 2, 3, 8)
    fb[0, 1] = 1  # every cell orthogonal to the query ...
    fb[0, :, 1, 2] = fb[0, :, 1, 3] = torch.tensor([1.0, 0.0])  # ... but two neighbours
    fb[0, :, 1, 7] = torch.tensor([0.999, 0.0447])  # and a far cell almost as good
    a, b = {FINE: fa}, {FINE: fb}
    hard = match_points(a, b, [(0, 0)], size_a=(1, 1), size_b=(8, 3))
    soft = match_points(a, b, [(0, 0)], size_a=(1, 1), size_b=(8, 3), window=1, temperature=0.01)
    assert hard.points[0, 0].tolist() == [2.0, 1.0]
    torch.testing.assert_close(soft.points[0, 0], torch.tensor([2.5, 1.0]), atol=1e-3, rtol=0)


def test_similarity_map_is_the_cosine_of_the_normalised_layers(house):
    a, b, _, _ = _cases(house)["flip"]
    fa, fb = pixel_features(a, 4), pixel_features(b, 4)
    got = similarity_map(fa, fb, (41.5, 29.5), size_a=(W, H), size_b=(W, H))
    # by hand: cell (7, 10) of A (pixel 41.5, 29.5 is its centre), each layer upsampled and normalised
    def desc(f):
        parts = [F.normalize(F.interpolate(v, size=(30, 40), mode="bilinear"), dim=1) for v in f.values()]
        return F.normalize(torch.cat(parts, 1), dim=1)[0]
    da, db = desc(fa), desc(fb)
    want = torch.einsum("c,chw->hw", da[:, 7, 10], db)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)


def test_mutual_nearest_neighbours_equal_a_brute_force(house):
    a, b, _, truth = _cases(house)["flip"]
    fa, fb = pixel_features(a, 4), pixel_features(b, 4)
    [m] = mutual_matches(fa, fb, size_a=(W, H), size_b=(W, H))
    da, db = describe(fa, size=(W, H)).tensor[0].flatten(1), describe(fb, size=(W, H)).tensor[0].flatten(1)
    sim = (da.T @ db).numpy()
    pairs = {(i, int(sim[i].argmax())) for i in range(sim.shape[0]) if sim[:, sim[i].argmax()].argmax() == i}
    got = {(int((y - 1.5) / 4) * 40 + int((x - 1.5) / 4), int((v - 1.5) / 4) * 40 + int((u - 1.5) / 4))
           for (x, y), (u, v) in zip(m.points_a.tolist(), m.points_b.tolist())}
    assert got == pairs and len(pairs) > 100
    # mutual matches of the distinct points are the true ones
    distinct = {tuple(p) for p in distinct_points(fa, 4).tolist()}
    chosen = [i for i, p in enumerate(m.points_a.tolist()) if tuple(p) in distinct]
    assert len(chosen) > 20
    torch.testing.assert_close(m.points_b[chosen], truth(m.points_a[chosen]))


@pytest.mark.parametrize("call, message", [
    (lambda a, b: match_points(a, b, [(170, 5)]), "point (170, 5) lies outside image A of 160x120 pixels"),
    (lambda a, b: match_points(a, b, [(5, -1)]), "point (5, -1) lies outside"),
    (lambda a, b: match_points(a, b, "3,4; 5"), "points must be written 'x,y; x,y'"),
    (lambda a, b: match_points(a, b, ""), "no points given"),
    (lambda a, b: match_points(a, Features(b.tensors, dict(b.meta, family="sdxl")), [(1, 1)]),
     "family 'sd15' cannot be matched with features of 'sdxl'"),
    (lambda a, b: match_points(a, Features({FINE: b.tensors[FINE][:, :5], COARSE: b.tensors[COARSE]}, b.meta),
                               [(1, 1)]), "different layers or channel counts"),
    (lambda a, b: match_points(a, b, [(1, 1)], layers=["up-level3-repeat0-res-out"]),
     "layer 'up-level3-repeat0-res-out' is not in these features"),
    (lambda a, b: match_points(a, b, [(1, 1)], window=-1), "window must be an integer >= 0"),
    (lambda a, b: match_points(Features(a.tensors, {}), b, [(1, 1)]), "record no image size"),
    (lambda a, b: match_points(Features({"up-level1-repeat0-vit-block0-self-map": torch.zeros(1, 2, 4, 4)},
                                        a.meta), b, [(1, 1)]), "no spatial layer"),
])
def test_bad_input_errors(house, call, message):
    a = _tensor(house.resize((W, H), Image.BOX))
    meta = {"family": "sd15", "input_width": W, "input_height": H}
    fa = Features(pixel_features(a, 4), meta)
    with pytest.raises(CorrespondenceError, match=None) as e:
        call(fa, Features(pixel_features(a, 4), dict(meta)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parse_points():
    assert parse_points("10,20; 30.5, 4\n7,8;") == [(10.0, 20.0), (30.5, 4.0), (7.0, 8.0)]


def test_match_points_node_draws_and_returns_the_true_matches(house):
    from diffusion_feature.nodes.node_correspondence import DFMatchPoints

    a, b, _, truth = _cases(house)["flip"]
    fa, fb = pixel_features(a, 4), pixel_features(b, 4)
    points = distinct_points(fa, 4)[:5]
    meta = {"family": "sd15", "input_width": W, "input_height": H}
    image_a, image_b = a.permute(1, 2, 0)[None], b.permute(1, 2, 0)[None]
    text = "; ".join(f"{x},{y}" for x, y in points.tolist())
    drawn, matched = DFMatchPoints().match(Features(fa, meta), Features(fb, meta), image_a, image_b, text)
    got = torch.tensor([[float(v) for v in p.split(",")] for p in matched.split("; ")])
    torch.testing.assert_close(got, truth(points), atol=0.05, rtol=0)
    assert drawn.shape == (1, H, 2 * W, 3)
    torch.testing.assert_close(drawn[0, :5, :W], image_a[0, :5], atol=1 / 255, rtol=0)  # A on the left ...
    from diffusion_feature.engine.visualize import match_colors

    for (x, y), color in zip(got.round().int().tolist(), match_colors(5)):  # ... a marker of its colour at each match
        near = drawn[0, y - 3:y + 4, W + x - 3:W + x + 4].reshape(-1, 3)
        assert (near == torch.tensor(color) / 255).all(-1).any(), (x, y)


def test_similarity_map_node_peaks_at_the_match(house):
    from diffusion_feature.nodes.node_correspondence import DFSimilarityMap

    a, b, _, truth = _cases(house)["flip"]
    fa, fb = pixel_features(a, 4), pixel_features(b, 4)
    point = distinct_points(fa, 4)[3]
    meta = {"family": "sd15", "input_width": W, "input_height": H}
    heat, mask = DFSimilarityMap().show(Features(fa, meta), Features(fb, meta), *point.tolist())["result"]
    assert heat.shape == (1, H, W, 3) and mask.shape == (1, H, W) and float(mask.max()) > 0.95
    peak = torch.nonzero(mask[0] == mask[0].max()).float().mean(0).flip(0)  # (x, y) of the brightest pixels
    assert (peak - truth(point[None])[0]).abs().max() <= 4  # within the true cell
    shown = DFSimilarityMap().show(Features(fa, meta), Features(fb, meta), *point.tolist(),
                                   image_b=b.permute(1, 2, 0)[None], image_a=a.permute(1, 2, 0)[None])
    blended = shown["result"][0]
    torch.testing.assert_close(blended, 0.5 * heat + 0.5 * b.permute(1, 2, 0)[None])
    # the node's preview for the click-to-query: A (with the query) beside the heat map over B, and their sizes
    [preview] = shown["ui"]["df_similarity"]
    import base64
    import io

    header, data = preview["image"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (2 * W, H)
    assert (preview["a_width"], preview["a_height"], preview["b_width"], preview["b_height"]) == (W, H, W, H)
    assert (preview["x"], preview["y"]) == tuple(point.tolist())

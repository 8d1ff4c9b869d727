"""Save -> load round trips for every format and layout; no overwrite; bad files; PCA and heatmaps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_feature.engine.features_io import (FeatureFileError, Features, aggregate, load_features,
                                                  save_features, size_meta)
from diffusion_feature.engine.visualize import attention_heatmap, grid_for, pca_rgb


def sample_features(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "up-level1-repeat1-res-out": torch.randn(2, 6, 4, 6, generator=g).to(dtype),
        "up-level3-repeat0-vit-block0-self-k": torch.randn(2, 3, 8, 12, generator=g).to(dtype),
        "up-level2-repeat1-vit-block0-cross-map": torch.softmax(torch.randn(2, 2, 24, 5, generator=g), -1).to(dtype),
    }
    meta = {"family": "sd15", "t": 50, "seed": 0, **size_meta(64, 96), "prompt": ["a cat", "a dog"]}
    return Features(tensors, meta)


@pytest.mark.parametrize("layout", ["per-sample", "per-layer"])
@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_round_trip(tmp_path, fmt, layout):
    feats = sample_features()
    written = save_features(feats, tmp_path, ["cat", "dog"], fmt=fmt, layout=layout)
    assert all(p.exists() for p in written)
    entry = {("safetensors", "per-sample"): "cat.safetensors", ("safetensors", "per-layer"): "cat.safetensors",
             ("npy", "per-sample"): "cat/meta.json", ("npy", "per-layer"): "cat.json"}[fmt, layout]
    back = load_features(tmp_path / entry)
    assert list(back.tensors) == list(feats.tensors)
    for k, v in feats.tensors.items():
        assert torch.equal(back.tensors[k], v[:1])
    assert back.meta["family"] == "sd15" and back.meta["t"] == 50
    assert (back.meta["height"], back.meta["width"]) == (64, 96)
    assert back.meta["layers"] == list(feats.tensors) and back.meta["name"] == "cat"
    assert not list(tmp_path.rglob("*.tmp"))


def test_sizes_are_named_and_files_with_the_old_pair_still_load(tmp_path):
    """A [H, W] pair under 'size' read as the CLI's WxH swapped the sides: files name them; old files still load."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    sizes = {**size_meta(16, 24), **size_meta(5, 7, "input_")}
    (path,) = save_features(Features({"mid-repeat0-res-out": torch.ones(1, 2, 2, 3)}, sizes), tmp_path / "new", ["a"])
    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
    assert {k: json.loads(stored[k]) for k in ("height", "width", "input_height", "input_width")} == {
        "height": 16, "width": 24, "input_height": 5, "input_width": 7}
    assert "size" not in stored and "input_size" not in stored
    old = {"layers": ["mid-repeat0-res-out"], "size": [16, 24], "input_size": [5, 7]}
    save_file({"mid-repeat0-res-out": torch.ones(2, 2, 3)}, str(tmp_path / "old.safetensors"),
              {k: json.dumps(v) for k, v in old.items()})
    (tmp_path / "old-npy").mkdir()
    np.save(tmp_path / "old-npy" / "mid-repeat0-res-out.npy", np.ones((2, 2, 3), np.float32))
    (tmp_path / "old-npy" / "meta.json").write_text(json.dumps({**old, "name": "old-npy"}))
    for entry in ("old.safetensors", "old-npy/meta.json"):
        meta = load_features(tmp_path / entry).meta
        assert (meta["height"], meta["width"], meta["input_height"], meta["input_width"]) == (16, 24, 5, 7), entry
        assert "size" not in meta and "input_size" not in meta
    for bad in (0, 40000, 2.5, True, "16"):
        save_file({"mid-repeat0-res-out": torch.ones(2, 2, 3)}, str(tmp_path / "bad.safetensors"),
                  {"height": json.dumps(bad), "width": "24"})
        with pytest.raises(FeatureFileError, match="'height' must be an integer in 1..16384"):
            load_features(tmp_path / "bad.safetensors")
        (tmp_path / "bad.safetensors").unlink()


def test_bfloat16_survives_safetensors(tmp_path):
    feats = sample_features(torch.bfloat16)
    save_features(feats, tmp_path, ["a", "b"])
    back = load_features(tmp_path / "b.safetensors")
    for k, v in feats.tensors.items():
        assert back.tensors[k].dtype == torch.bfloat16 and torch.equal(back.tensors[k], v[1:])


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_aggregate_layout(tmp_path, fmt):
    feats = sample_features()
    save_features(feats, tmp_path, ["cat", "dog"], fmt=fmt, layout="aggregate")
    back = load_features(tmp_path / ("dog.safetensors" if fmt == "safetensors" else "dog.json"))
    agg = back.tensors["aggregate"]
    assert agg.shape == (1, 9, 8, 12)  # 6 + 3 channels on the largest grid; the map is left out
    slices = back.meta["aggregate_slices"]
    assert slices == {"up-level1-repeat1-res-out": [0, 6], "up-level3-repeat0-vit-block0-self-k": [6, 9]}
    want = F.interpolate(feats.tensors["up-level1-repeat1-res-out"], size=(8, 12), mode="bilinear")
    torch.testing.assert_close(agg[0, 0:6], want[1])
    torch.testing.assert_close(agg[0, 6:9], feats.tensors["up-level3-repeat0-vit-block0-self-k"][1])
    with pytest.raises(ValueError, match="at least one spatial layer"):
        aggregate({"x-map": torch.zeros(1, 1, 2, 2)})


@pytest.mark.parametrize("fmt,layout", [("safetensors", "per-sample"), ("npy", "per-sample"), ("npy", "per-layer")])
def test_second_save_never_overwrites(tmp_path, fmt, layout):
    feats = sample_features()
    first = save_features(feats, tmp_path, ["cat", "dog"], fmt=fmt, layout=layout)
    before = {p: p.read_bytes() for p in first}
    other = Features({k: v + 1 for k, v in feats.tensors.items()}, feats.meta)
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_features(other, tmp_path, ["cat", "dog"], fmt=fmt, layout=layout)
    assert {p: p.read_bytes() for p in first} == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_files(tmp_path):
    with pytest.raises(FeatureFileError, match="does not exist"):
        load_features(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(FeatureFileError, match="not a valid safetensors file"):
        load_features(corrupt)
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(FeatureFileError, match="give a .safetensors file"):
        load_features(other)
    with pytest.raises(ValueError, match="unknown format"):
        save_features(sample_features(), tmp_path, ["a", "b"], fmt="pt")
    with pytest.raises(ValueError, match="2 names for 2 samples|names for"):
        save_features(sample_features(), tmp_path, ["a"])


def test_unsafe_names_stay_inside_the_folder(tmp_path):
    out = tmp_path / "out"
    written = save_features(sample_features(), out, ["../../evil", "a/b"])
    assert all(out in p.parents for p in written)


def test_joint_pca_gives_the_same_colour_to_the_same_vector():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 16, 6, 6, generator=g)
    feats[1, :, 2, 3] = feats[0, :, 4, 1]  # one vector appears in both images
    rgb = np.stack(pca_rgb(feats, joint=True))
    assert rgb.shape == (2, 6, 6, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[1, 2, 3], rgb[0, 4, 1])
    per_image = np.stack(pca_rgb(feats, joint=False))
    assert not np.array_equal(per_image, rgb)


def test_pca_colours_follow_the_first_component_and_threshold():
    # two clusters along one direction: the first component separates them
    feats = torch.zeros(1, 4, 2, 4)
    feats[0, 0, :, :2], feats[0, 0, :, 2:] = -5.0, 5.0
    feats[0, 1] = torch.tensor([[0.1, -0.1, 0.2, -0.2], [0.0, 0.3, -0.3, 0.1]])
    rgb = np.stack(pca_rgb(feats))
    assert set(np.unique(rgb[0, :, :, 0])) == {0, 255}
    masked = np.stack(pca_rgb(feats, foreground_threshold=0.5))
    assert (masked[0][rgb[0, :, :, 0] == 0] == 0).all()
    with pytest.raises(ValueError, match="spatial features"):
        pca_rgb(torch.zeros(2, 3, 4))


def test_joint_pca_over_different_grids():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 4, 6, generator=g), torch.randn(8, 6, 4, generator=g)
    b[:, 0, 0] = a[:, 3, 5]
    ra, rb = pca_rgb([a, b])
    assert ra.shape == (4, 6, 3) and rb.shape == (6, 4, 3)
    assert np.array_equal(ra[3, 5], rb[0, 0])


def test_heatmaps_pick_the_token_and_the_query():
    maps = torch.zeros(1, 2, 24, 5)  # 4x6 grid of queries, 5 tokens
    maps[0, :, 7, 3] = 1.0  # query 7 (row 1, col 1) attends to token 3
    rgb, mask = attention_heatmap(maps, (64, 96), token=3)
    assert rgb.shape == (1, 64, 96, 3) and mask.shape == (1, 64, 96)
    hot = np.unravel_index(mask[0].argmax(), mask[0].shape)
    assert 16 <= hot[0] < 32 and 16 <= hot[1] < 32  # row 1 and column 1 of the 4x6 grid, 16 px cells
    self_maps = torch.zeros(1, 1, 24, 24)
    self_maps[0, 0, 23, 0] = 1.0  # the bottom-right query attends to the top-left key
    _, mask = attention_heatmap(self_maps, (64, 96), query=(0.99, 0.99))
    assert mask[0, :8, :8].min() > 0.9 and mask[0, 40:, 40:].max() < 0.1  # the top-left cell, bilinear-upscaled
    with pytest.raises(ValueError, match="outside"):
        attention_heatmap(maps, (64, 96), token=5)
    with pytest.raises(ValueError, match="exactly one"):
        attention_heatmap(maps, (64, 96))
    assert grid_for(24, 64, 96) == (4, 6) and grid_for(4096, 512, 512) == (64, 64)

"""The latent cache: a rerun skips the VAE with features bit-identical to an uncached run; keys follow the pixels,
the VAE's weights and dtype; damaged entries are recomputed and replaced; writes are atomic."""
from __future__ import annotations

import copy
import errno
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import VaeCalls, tiny_feature_model
from diffusion_feature.engine import latent_cache as latent_cache_module
from diffusion_feature.engine.extraction import extract, extract_timesteps
from diffusion_feature.engine.latent_cache import LatentCache

LAYERS = ["mid-repeat1-res-out", "up-level2-repeat1-vit-block0-self-k", "up-level3-repeat2-res-out"]
SIZE = "64x64"


@pytest.fixture(scope="module")
def sd15():
    return tiny_feature_model("sd15")


@pytest.fixture(scope="module")
def images():
    """Two non-square photos-like images (so center-crop and stretch give other pixels)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (80, 112, 3), dtype=np.uint8)) for _ in range(2)]


def _run(model, images, cache=None, **kw):
    kw = {"t": 50, "seed": 3, "size": SIZE, **kw}
    with VaeCalls(model) as calls:
        feats = extract(model, images, "a cat", LAYERS, latent_cache=cache, **kw)
    return feats, calls.n


def _equal(a, b) -> bool:
    return all(torch.equal(a.tensors[k], b.tensors[k]) for k in LAYERS)


def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix != ".safetensors"]


@pytest.mark.parametrize("vae_sample", [True, False])
def test_a_rerun_skips_the_vae_with_identical_features(sd15, images, tmp_path, vae_sample):
    cache = LatentCache(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # created on the first write
    cold, n_cold = _run(sd15, images, cache, vae_sample=vae_sample)
    assert (n_cold, cache.hits, cache.misses) == (1, 0, 2)
    assert len(_entries(tmp_path / "cache")) == 2 and _leftovers(tmp_path / "cache") == []
    warm, n_warm = _run(sd15, images, cache, vae_sample=vae_sample)
    assert (n_warm, cache.hits, cache.misses, cache.corrupt) == (0, 2, 2, 0)
    plain, n_plain = _run(sd15, images, vae_sample=vae_sample)
    assert n_plain == 1
    assert _equal(cold, plain) and _equal(warm, plain)
    # the posterior serves any seed and the other vae_sample setting: still no VAE, still identical
    for kw in ({"seed": 11}, {"vae_sample": not vae_sample}, {"t": 300, "seed": 5}):
        reused, n = _run(sd15, images, cache, **{"vae_sample": vae_sample, **kw})
        assert n == 0
        assert _equal(reused, _run(sd15, images, **{"vae_sample": vae_sample, **kw})[0])
    assert not _equal(_run(sd15, images, cache, seed=11)[0], plain)  # the seed does change the draw


def test_several_timesteps_use_the_cache_too(sd15, images, tmp_path):
    cache = LatentCache(tmp_path)
    _run(sd15, images, cache)
    with VaeCalls(sd15) as calls:
        passes = extract_timesteps(sd15, images, "a cat", LAYERS, [10, 500], seed=3, size=SIZE, latent_cache=cache)
    assert calls.n == 0
    for f in passes:
        assert _equal(f, _run(sd15, images, t=f.meta["t"])[0])


def test_other_pixels_vae_weights_or_dtype_miss(sd15, images, tmp_path):
    cache = LatentCache(tmp_path)
    _run(sd15, images, cache, resize="stretch")
    assert _run(sd15, images, cache, resize="stretch")[1] == 0
    for kw in ({"resize": "center-crop"}, {"size": "64x128"}):  # other resize, other size: other pixels
        before = cache.misses
        feats, n = _run(sd15, images, cache, **kw)
        assert n == 1 and cache.misses == before + 2
        assert _equal(feats, _run(sd15, images, **kw)[0])
    other = copy.deepcopy(sd15)
    with torch.no_grad():
        other.vae.encoder.conv_in.bias.add_(0.01)
    feats, n = _run(other, images, cache, resize="stretch")
    assert n == 1 and _equal(feats, _run(other, images, resize="stretch")[0])
    # the same VAE object modified in place is seen too (the weights' hash is not kept stale)
    assert _run(other, images, cache, resize="stretch")[1] == 0
    with torch.no_grad():
        other.vae.decoder.conv_out.bias.add_(0.01)  # even a part the encoder does not use: its weights changed
    assert _run(other, images, cache, resize="stretch")[1] == 1
    wide = copy.deepcopy(sd15)
    wide.vae.to(torch.float64)
    feats, n = _run(wide, images, cache, resize="stretch")
    assert n == 1 and _equal(feats, _run(wide, images, resize="stretch")[0])
    assert _run(wide, images, cache, resize="stretch")[1] == 0


def test_the_image_content_is_the_key_and_a_partly_cached_batch_is_encoded_whole(sd15, images, tmp_path):
    cache = LatentCache(tmp_path)
    _run(sd15, images[:1], cache)
    # the same image by another path: as a file, and as a ComfyUI IMAGE tensor
    images[0].save(tmp_path / "copy.png")
    assert _run(sd15, [tmp_path / "copy.png"], cache)[1] == 0
    tensor = torch.from_numpy(np.asarray(images[0], dtype=np.float32) / 255.0)[None]
    assert _run(sd15, tensor, cache)[1] == 0
    # one of two images cached: the whole batch is encoded, as without the cache, and the other entry written
    feats, n = _run(sd15, images, cache)
    assert n == 1 and _equal(feats, _run(sd15, images)[0])
    assert len(_entries(tmp_path)) == 2 and _run(sd15, images, cache)[1] == 0


def _damage(kind: str, path: Path, other: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif kind == "flipped value":  # still a valid safetensors file: only the hash of the values tells
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    elif kind == "another entry":  # a sound entry of another image under this key
        path.write_bytes(other.read_bytes())
    elif kind == "a folder":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "flipped value", "another entry", "a folder"])
def test_a_damaged_entry_is_recomputed_and_replaced(sd15, images, tmp_path, kind):
    cache = LatentCache(tmp_path)
    plain = _run(sd15, images)[0]
    _run(sd15, images, cache)
    first, second = _entries(tmp_path)
    _damage(kind, first, second)
    unwritable = pytest.warns(RuntimeWarning, match="could not store") if kind == "a folder" else nullcontext()
    with unwritable:
        feats, n = _run(sd15, images, cache)
    assert n == 1 and cache.corrupt == 1 and _equal(feats, plain)
    if kind == "a folder":  # cannot be replaced by a file: left as it is, the features still right
        assert first.is_dir() and cache.write_errors == 1
        return
    assert _leftovers(tmp_path) == [] and cache.write_errors == 0
    feats, n = _run(sd15, images, cache)  # replaced by a sound entry: a hit again
    assert n == 0 and cache.corrupt == 1 and _equal(feats, plain)


def test_a_failed_write_leaves_no_entry_and_the_features_right(sd15, images, tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(latent_cache_module.os, "replace", full_disk)
    with pytest.warns(RuntimeWarning, match=r"latent cache .* could not store an entry \(OSError: .*No space left"):
        feats, n = _run(sd15, images, cache)
    assert n == 1 and cache.write_errors == 2 and _equal(feats, _run(sd15, images)[0])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no entry, no temporary file
    monkeypatch.undo()
    assert _run(sd15, images, cache)[1] == 1 and len(_entries(tmp_path)) == 2  # the next run writes them


def test_writes_are_atomic_temporary_file_then_replace(sd15, images, tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst), Path(src).stat().st_size))
        assert not Path(dst).exists()  # the final name appears only complete, by this rename
        real(src, dst)

    monkeypatch.setattr(latent_cache_module.os, "replace", spy)
    cache = LatentCache(tmp_path)
    _run(sd15, images, cache)
    assert len(seen) == 2
    for src, dst, size in seen:
        assert src.parent == dst.parent and src.name.startswith(".df-") and not src.exists()
        assert dst.stat().st_size == size


def test_a_file_as_the_cache_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"latent cache '.*file' is a file: give a folder"):
        LatentCache(tmp_path / "file")

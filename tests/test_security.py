"""Untrusted files and widget values (issue 17): nothing read from an uploaded file or typed into a widget can make
the pack read or write outside its folder, leak a file's content, or allocate what a file's metadata asks for."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusion_feature import NODE_CLASS_MAPPINGS
from diffusion_feature.layer_catalog import LayerIdError, resolve_layers, resolve_taps
from diffusion_feature.layer_catalog import resolver
from diffusion_feature.nodes import comfy_env, routes
from diffusion_feature.engine import tokenizers
from diffusion_feature.engine.features_io import (MAX_IMAGE_SIDE, FeatureFileError, Features, load_features,
                                                  save_features, size_meta, write_atomic)
from diffusion_feature.engine.memory_guard import FeatureMemoryError
from diffusion_feature.engine.output_paths import OutputPathError, resolve_prefix

N = {k: v() for k, v in NODE_CLASS_MAPPINGS.items()}
LAYER = "up-level1-repeat1-res-out"
MAP = "up-level2-repeat1-vit-block0-cross-map"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A server's layout: output and input folders inside, and an 'outside' folder that must stay untouched."""
    out, inp, outside = tmp_path / "output", tmp_path / "input", tmp_path / "outside"
    for d in (out, inp, outside):
        d.mkdir()
    monkeypatch.setenv("DF_OUTPUT_DIR", str(out))
    monkeypatch.setenv("DF_INPUT_DIR", str(inp))
    return out, inp, outside


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _upload_safetensors(out: Path, tensors: dict, meta: dict | None = None, name="up.safetensors") -> str:
    save_file(tensors, str(out / name), {k: json.dumps(v) for k, v in (meta or {}).items()})
    return name


# ---- 1: writing outside the output folder ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["../../../outside/evil", "OUTSIDE_ABS", "up-level1/../../../outside/x"])
@pytest.mark.parametrize("layout", ["per-layer", "per-sample"])
def test_an_uploaded_file_whose_keys_are_paths_is_refused_and_writes_nothing(dirs, key, layout):
    out, _, outside = dirs
    key = str(outside / "evil") if key == "OUTSIDE_ABS" else key
    name = _upload_safetensors(out, {key: torch.ones(2, 2, 2)})
    with pytest.raises(FeatureFileError, match="not a layer id of the grammar"):
        N["DFLoadFeatures"].load(name)
    # features built in Python with such keys: the save refuses before the first file is written
    feats = Features({LAYER: torch.ones(1, 2, 2, 2), key: torch.ones(1, 2, 2, 2)}, {"size": [16, 16]})
    with pytest.raises(FeatureFileError, match="not a layer id"):
        N["DFSaveFeatures"].save(feats, "sub/x", "npy", layout)
    assert _files(outside) == set() and _files(out) == {name}
    assert not (out.parent / "evil").exists() and not list(out.parent.parent.glob("evil*"))


def test_a_save_checks_every_file_before_writing_the_first(dirs):
    out, _, _ = dirs
    long_layer = Features({LAYER: torch.ones(2, 1, 2, 2)}, {"size": [16, 16]})
    # the second sample's name is too long for the filesystem: nothing of the first is written either
    with pytest.raises(ValueError, match="longer than the 255 bytes"):
        save_features(long_layer, out, ["ok", "n" * 252], fmt="npy", layout="per-layer")
    assert _files(out) == set()


# ---- 2: reading outside the output folder ----------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("layers", ["../../outside/secret"]), ("layers", ["ABS"]),
                                         ("name", "../../outside/secret"), ("name", "ABS"), ("name", "a/b")])
@pytest.mark.parametrize("meta_name", ["meta.json", "x.json"])
def test_metadata_that_names_files_outside_is_refused_and_nothing_is_read(dirs, field, value, meta_name):
    out, _, outside = dirs
    secret = np.full((3, 2, 2), 7.0, dtype=np.float32)
    np.save(outside / "secret.npy", secret)
    (out / "s").mkdir()
    value = str(outside / "secret") if value == "ABS" else value
    value = [str(outside / "secret")] if value == ["ABS"] else value
    meta = {"name": "s", "layers": [LAYER], "size": [16, 16], field: value}
    (out / "s" / meta_name).write_text(json.dumps(meta))
    with pytest.raises(FeatureFileError) as e:
        N["DFLoadFeatures"].load(f"s/{meta_name}")
    assert str(outside) not in str(e.value) and "secret" not in str(e.value)


def test_npy_beside_the_metadata_still_loads_and_a_linked_file_out_is_refused(dirs):
    out, _, outside = dirs
    feats = Features({LAYER: torch.randn(1, 3, 2, 2)}, {"size": [16, 16]})
    save_features(feats, out, ["a"], fmt="npy", layout="per-sample")
    back = N["DFLoadFeatures"].load("a/meta.json")[0]
    assert torch.equal(back.tensors[LAYER], feats.tensors[LAYER])
    np.save(outside / "secret.npy", np.zeros((3, 2, 2), np.float32))
    os.unlink(out / "a" / f"{LAYER}.npy")
    os.symlink(outside / "secret.npy", out / "a" / f"{LAYER}.npy")
    with pytest.raises(FeatureFileError, match="leads outside its folder"):
        N["DFLoadFeatures"].load("a/meta.json")


def test_a_crafted_npy_header_is_checked_against_the_file_size_before_allocation(dirs):
    out, _, _ = dirs
    (out / "a").mkdir()
    (out / "a" / "meta.json").write_text(json.dumps({"name": "a", "layers": [LAYER]}))
    header = {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000, 1000)}  # 40 TB claimed, 0 given
    with open(out / "a" / f"{LAYER}.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
    with pytest.raises(FeatureFileError, match="does not match the file's size"):
        N["DFLoadFeatures"].load("a/meta.json")
    with open(out / "a" / f"{LAYER}.npy", "wb") as fh:  # an object array: a pickle inside an .npy
        np.save(fh, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FeatureFileError, match="holds Python objects"):
        N["DFLoadFeatures"].load("a/meta.json")


# ---- 3: layer files ----------------------------------------------------------------------------------------------
@pytest.fixture
def restricted(dirs):
    resolver.restrict_layer_files(comfy_env.layer_file)
    yield dirs
    resolver.restrict_layer_files(None)


def test_layer_files_come_from_the_input_folder_only_and_never_answer_about_other_paths(restricted, sd15):
    out, inp, outside = restricted
    (outside / "real.json").write_text(json.dumps({"SECRET_KEY_1": True}))
    answers = {}
    for spec in (str(outside / "real.json"), str(outside / "fake.json"), "../outside/real.json",
                 "../outside/fake.json"):
        with pytest.raises(LayerIdError) as e:
            N["DFAttachHooks"].attach(sd15, spec, "none")
        answers[spec] = str(e.value).replace("real", "X").replace("fake", "X")
        assert "SECRET_KEY_1" not in str(e.value)
    # an existing and an absent file outside get the same answer: no way to probe the disk
    assert answers[str(outside / "real.json")] == answers[str(outside / "fake.json")]
    assert answers["../outside/real.json"] == answers["../outside/fake.json"]
    assert "absolute path" in answers[str(outside / "real.json")]
    with pytest.raises(LayerIdError, match="not in ComfyUI's input folder"):
        N["DFAttachHooks"].attach(sd15, "missing.json", "none")


def test_a_layer_file_in_the_input_folder_works_and_its_content_never_reaches_an_error(restricted, sd15):
    _, inp, _ = restricted
    (inp / "good.json").write_text(json.dumps({LAYER: True, "unet-out": False, "mid-repeat0-res-out": True}))
    (hooked,) = N["DFAttachHooks"].attach(sd15, "good.json", "none")
    assert hooked.layers == [LAYER, "mid-repeat0-res-out"]
    (inp / "foreign.json").write_text(json.dumps(["mid-repeat0-res-out", "PRIVATE password=hunter2"]))
    with pytest.raises(LayerIdError, match="entry 2 of layer file 'foreign.json' is not a layer id") as e:
        N["DFAttachHooks"].attach(sd15, "foreign.json", "none")
    assert "hunter2" not in str(e.value)
    (inp / "deep.json").write_text(json.dumps(["down-level7-repeat0-res-out"]))  # grammar-valid, not this model's
    with pytest.raises(LayerIdError, match="entry 1 of layer file 'deep.json' is not a layer id of") as e:
        resolve_taps("deep.json", sd15.denoiser, "sd15")
    assert "level7" not in str(e.value)
    (inp / "huge.json").write_text(" " * (resolver.MAX_LAYER_FILE_BYTES + 1))
    with pytest.raises(LayerIdError, match="larger than"):
        resolve_layers("huge.json", "sd15")


def test_library_use_reads_layer_files_anywhere(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps([LAYER]))
    assert resolve_layers(str(f), "sd15") == [LAYER]


def test_de_duplication_is_linear_in_the_number_of_ids():
    class Counting(str):
        comparisons = 0

        def __eq__(self, other):
            Counting.comparisons += 1
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    ids = [Counting(LAYER if i % 2 else "mid-repeat0-res-out") for i in range(20000)]
    assert resolve_layers(ids, "sd15") == ["mid-repeat0-res-out", LAYER]
    assert Counting.comparisons < 3 * len(ids)  # a list-membership de-duplication makes ~len(ids)**2 / 2 here


# ---- 5: sizes from metadata --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [[40000, 40000], [0, 5], [5], "big", [2.5, 3], [True, 4]])
def test_sizes_in_metadata_are_bounded_when_loaded(dirs, size):
    out, _, _ = dirs
    name = _upload_safetensors(out, {LAYER: torch.ones(4, 2, 2)}, {"layers": [LAYER], "input_size": size})
    with pytest.raises(FeatureFileError, match=f"two integers in 1..{MAX_IMAGE_SIDE}"):
        N["DFLoadFeatures"].load(name)


def test_visualization_refuses_output_that_cannot_fit_before_drawing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    feats = Features({LAYER: torch.randn(8, 4, 3, 3, generator=g),
                      MAP: torch.softmax(torch.randn(8, 2, 9, 5, generator=g), -1)},
                     size_meta(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE, "input_"))
    from diffusion_feature.engine import extraction

    monkeypatch.setattr(extraction, "_free_bytes", lambda device: 2**30)
    with pytest.raises(FeatureMemoryError, match="drawing 8 images of 16384x16384 would need 36.00 GiB on cpu"):
        N["DFFeaturePCA"].pca(feats, LAYER, True)
    with pytest.raises(FeatureMemoryError, match="would need"):
        N["DFAttentionMap"].show(feats, MAP, 1, 0.5, 0.5)
    small = Features(feats.tensors, size_meta(24, 24, "input_"))
    (image,) = N["DFFeaturePCA"].pca(small, LAYER, True)
    assert image.shape == (8, 24, 24, 3)
    with pytest.raises(ValueError, match="'input_height' must be an integer in 1..16384"):  # from Python: bounded too
        N["DFFeaturePCA"].pca(Features(feats.tensors, size_meta(40000, 40000, "input_")), LAYER, True)


# ---- 7: the smaller ones -----------------------------------------------------------------------------------------
def test_a_long_prefix_that_makes_legal_names_saves(dirs):
    out, _, _ = dirs
    feats = Features({LAYER: torch.ones(1, 2, 2, 2)}, {"size": [16, 16]})
    prefix = "p" * 232  # + "_00001_" + ".safetensors" = 251 bytes: legal
    result = N["DFSaveFeatures"].save(feats, prefix)
    (entry,) = result["ui"]["features"]
    assert len(entry["filename"]) == 251 and torch.equal(load_features(out / entry["filename"]).tensors[LAYER],
                                                         feats.tensors[LAYER])
    with pytest.raises(OutputPathError, match="longer than the 255 bytes"):
        N["DFSaveFeatures"].save(feats, "p" * 250)
    with pytest.raises(OutputPathError, match="folders deep"):
        resolve_prefix("a/" * 1500 + "x", out)
    assert _files(out) == {entry["filename"]}


def test_write_atomic_uses_a_short_temporary_name(tmp_path):
    seen = []
    write_atomic(tmp_path / ("n" * 255), lambda p: (seen.append(Path(p).name), Path(p).write_text("x")))
    assert len(seen[0]) < 24 and (tmp_path / ("n" * 255)).read_text() == "x"
    assert _files(tmp_path) == {"n" * 255}


def test_bad_metadata_is_a_features_file_error(dirs):
    out, _, _ = dirs
    save_file({LAYER: torch.ones(2, 2, 2)}, str(out / "bad.safetensors"), {"layers": "[not json"})
    with pytest.raises(FeatureFileError, match="metadata is not valid JSON"):
        N["DFLoadFeatures"].load("bad.safetensors")
    (out / "m").mkdir()
    (out / "m" / "meta.json").write_text(json.dumps({"layers": [LAYER]}))
    with pytest.raises(FeatureFileError, match="'name' must be a text name"):
        N["DFLoadFeatures"].load("m/meta.json")
    (out / "m" / "meta.json").write_text("{broken")
    with pytest.raises(FeatureFileError, match="not readable JSON"):
        N["DFLoadFeatures"].load("m/meta.json")


def test_family_route_answers_a_file_inside_a_model_folder_with_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "diffusers"
    (root / "model").mkdir(parents=True)
    (root / "model" / "model_index.json").write_text("{}")
    monkeypatch.setenv("DF_DIFFUSERS_DIR", str(root))
    with pytest.raises(ValueError, match="is not a diffusers model folder"):
        routes.family_payload("diffusers", "model/model_index.json")
    with pytest.raises(ValueError, match="is not a diffusers model folder: it has no unet"):
        routes.family_payload("diffusers", "model")


def test_the_bundled_tokenizer_leaves_no_folder_in_the_temp_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tokenizers._cached_clip_tokenizer.cache_clear()
    try:
        tok = tokenizers.clip_tokenizer()
        assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizers.clip_tokenizer() is not tok
        assert list(tmp_path.iterdir()) == []
    finally:
        tokenizers._cached_clip_tokenizer.cache_clear()

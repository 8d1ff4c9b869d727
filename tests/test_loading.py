"""Loading offline: diffusers folders, single-file checkpoints in the original layout, family detection, and
every bad file giving its own clear error."""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from diffusion_feature.engine.checkpoint_files import CheckpointError, read_key_shapes
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.loading import _check_family, detect_family, load_model, load_single_file
from ldm_export import sd15_single_file_state

IDS = ["down-level1-repeat0-vit-block0-self-k", "mid-repeat1-res-out", "up-level2-repeat1-vit-block0-cross-map",
       "unet-out"]


@pytest.fixture(scope="module")
def diffusers_folder(sd15_folder):
    return sd15_folder


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_sd15):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"
    m = tiny_sd15
    save_file(sd15_single_file_state(m.denoiser, m.vae, m.text_encoders[0]), str(path))
    return path


def _image():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(64, 96, 3, generator=g) * 255).to(torch.uint8).numpy())


def _features(model):
    return extract(model, [_image()], "a photo of a cat", IDS, t=300, seed=4, size=(64, 96)).tensors


def test_diffusers_folder_loads_offline_with_same_features(monkeypatch, diffusers_folder, tiny_sd15):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(diffusers_folder)
    assert loaded.family == "sd15"
    want, got = _features(tiny_sd15), _features(loaded)
    for k in IDS:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_loading_says_nothing_about_accelerate(diffusers_folder):
    """accelerate is a dependency: without it diffusers logged 'accelerate was not found' twice per load (the UNet
    and the VAE). A failure here means the environment lacks it: pip install accelerate."""
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_log = logging.getLogger("diffusers")  # its own handler; records do not reach the root logger
    diffusers_log.addHandler(handler)
    try:
        load_model(diffusers_folder)
    finally:
        diffusers_log.removeHandler(handler)
    assert not [m for m in messages if "accelerate" in m]


def test_single_file_equals_the_folder_it_came_from(monkeypatch, diffusers_folder, single_file, tiny_sd15):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert detect_family(read_key_shapes(single_file)) == "sd15"
    loaded = load_single_file(single_file, config_dir=diffusers_folder)
    want, got = _features(tiny_sd15), _features(loaded)
    for k in IDS:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_config_sidecar_beside_a_checkpoint(tmp_path, diffusers_folder, single_file, tiny_sd15):
    ckpt = tmp_path / "custom.safetensors"
    shutil.copy(single_file, ckpt)
    with pytest.raises(CheckpointError, match=r"does not fit the sd15 architecture.*custom.config/"):
        load_model(ckpt)  # tiny weights against the real SD1.5 configs
    shutil.copytree(diffusers_folder, tmp_path / "custom.config")
    loaded = load_model(ckpt)  # no config_dir given: the sidecar describes the architecture
    torch.testing.assert_close(_features(loaded)["unet-out"], _features(tiny_sd15)["unet-out"], atol=1e-5, rtol=1e-5)


def test_pickle_checkpoint_goes_through_weights_only(tmp_path, diffusers_folder, single_file, tiny_sd15):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(single_file))}, ckpt)
    loaded = load_single_file(ckpt, config_dir=diffusers_folder)
    torch.testing.assert_close(_features(loaded)["unet-out"], _features(tiny_sd15)["unet-out"], atol=1e-5, rtol=1e-5)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        load_model(evil)
    assert "must never run" not in capsys.readouterr().out


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(corrupt)
    other = tmp_path / "model.txt"
    other.write_text("hi")
    with pytest.raises(CheckpointError, match="expected a diffusers folder"):
        load_model(other)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_model(empty_dir)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"weight": torch.zeros(2)}, str(unrelated))
    with pytest.raises(CheckpointError, match="looks like no known diffusion checkpoint"):
        load_model(unrelated)


def test_family_detection_from_keys():
    sd15 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    sd21 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    sdxl = dict(sd15, **{"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)})
    assert detect_family(sd15) == "sd15" and detect_family(sd21) == "sd21" and detect_family(sdxl) == "sdxl"
    assert detect_family({"x_embedder.proj.weight": (1152, 4, 2, 2)}) == "pixart-sigma"
    assert "diffusers UNet" in detect_family({"conv_in.weight": (1,), "down_blocks.0.x": (1,)})
    assert _check_family("sdxl", "playground-v2", "f") == "playground-v2"  # the same architecture
    with pytest.raises(CheckpointError, match="given as sdxl but looks like sd15; pass family='sd15'"):
        _check_family("sd15", "sdxl", "f")
    with pytest.raises(ValueError, match="unknown family"):
        _check_family("sd15", "sd4", "f")

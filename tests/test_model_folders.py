"""Model folders as ComfyUI walks them: directory links are followed, names never leave the folder."""
from __future__ import annotations

import json
import os

import pytest

from diffusion_feature.nodes import comfy_env


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """models/{diffusers,checkpoints} whose content partly lives on 'another drive', reached through links."""
    models, drive = tmp_path / "models", tmp_path / "other-drive"
    for kind in ("diffusers", "checkpoints"):
        (models / kind).mkdir(parents=True)
        monkeypatch.setenv(f"DF_{kind.upper()}_DIR", str(models / kind))
    (models / "diffusers" / "local").mkdir()
    (models / "diffusers" / "local" / "model_index.json").write_text(json.dumps({}))
    (drive / "sdxl" / "tiny").mkdir(parents=True)
    (drive / "sdxl" / "tiny" / "model_index.json").write_text(json.dumps({}))
    (drive / "ckpts").mkdir()
    (drive / "ckpts" / "far.safetensors").write_bytes(b"x")
    (drive / "ckpts" / "loop").symlink_to(drive / "ckpts", target_is_directory=True)  # a link cycle
    (models / "diffusers" / "linked").symlink_to(drive / "sdxl", target_is_directory=True)
    (models / "checkpoints" / "drive").symlink_to(drive / "ckpts", target_is_directory=True)
    (models / "checkpoints" / "near.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")  # beside the model folders, not in them
    return models


def test_linked_folders_are_listed(folders):
    assert comfy_env.model_names("diffusers") == ["linked/tiny", "local"]
    names = comfy_env.model_names("checkpoints")
    assert "drive/far.safetensors" in names and "near.safetensors" in names
    assert all(n.count("loop") <= 1 for n in names)  # the cycle is walked once, not forever


def test_linked_folders_resolve_inside_the_model_folder(folders):
    path = comfy_env.model_path("diffusers", "linked/tiny")
    assert path == folders / "diffusers" / "linked" / "tiny" and (path / "model_index.json").is_file()
    assert os.path.realpath(path) != str(path)  # reached through the link, which leads out of the model root
    assert comfy_env.model_path("checkpoints", "drive/far.safetensors").is_file()


@pytest.mark.parametrize("name", ["../secret.safetensors", "drive/../../secret.safetensors", "linked/../../..",
                                  "..\\secret.safetensors", "ABSOLUTE"])
def test_names_leaving_the_model_folder_are_refused(folders, name):
    if name == "ABSOLUTE":
        name = str(folders.parent / "secret.safetensors")
    kind = "diffusers" if name.startswith("linked") else "checkpoints"
    with pytest.raises(ValueError, match=r"without '\.\.'.*near\.safetensors|without '\.\.'.*linked/tiny"):
        comfy_env.model_path(kind, name)


def test_a_missing_name_is_an_error_naming_the_folder(folders):
    with pytest.raises(ValueError, match="'nope' is not in the diffusers folder"):
        comfy_env.model_path("diffusers", "nope")

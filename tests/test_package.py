"""The package as ComfyUI and pip see it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_imports_without_comfyui():
    code = ("import sys, diffusion_feature as d; "
            "assert isinstance(d.NODE_CLASS_MAPPINGS, dict) and d.WEB_DIRECTORY == './web'; "
            "bad = [m for m in ('comfy', 'folder_paths', 'server', 'execution') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_distribution_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "diffusion-feature-nodes"
    assert project["requires-python"] == ">=3.10"
    deps = " ".join(project["dependencies"])
    for name in ("torch", "diffusers", "transformers", "safetensors", "numpy", "scikit-learn", "pillow"):
        assert name in deps
    assert "xformers" not in deps and project["optional-dependencies"]["xformers"] == ["xformers"]
    assert "test" in project["optional-dependencies"]
    assert meta["tool"]["setuptools"]["package-dir"] == {"diffusion_feature": "."}
    assert "comfy" in meta["tool"]
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert not [r for r in requirements if r.strip().lower().startswith("torch")]  # ComfyUI brings its own torch


def test_accelerate_is_a_dependency_in_both_lists():
    """diffusers loads weights faster with accelerate, and without it warns once per component of every load."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    pinned = [d for d in deps if d.startswith("accelerate>=")]
    assert pinned and pinned == [r for r in requirements if r.startswith("accelerate>=")]


def test_comfy_registry_metadata_declares_versions_and_an_icon_of_our_own():
    import xml.etree.ElementTree as ET

    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["requires-comfyui"] == ">=0.0.1"
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    prefix = repo.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = ROOT / comfy["Icon"][len(prefix):]
    root = ET.parse(icon).getroot()  # the file is in the repository and is well-formed SVG
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox") == "0 0 256 256"
    readme = (ROOT / "README.md").read_text()
    assert "v0.3.64" in readme and "2024-03" in readme and "1.58.1" in readme


def test_every_module_of_the_pack_is_importable_under_one_name_only():
    """The engine lives in engine/ and nowhere else: no module is also registered under a second name (such as
    diffusion_feature.nodes.extraction for a layout no release had), so a monkeypatch reaches the one module."""
    import importlib

    importlib.import_module("diffusion_feature.nodes")  # the node faces and everything they import
    names: dict[int, list[str]] = {}
    for name, module in list(sys.modules.items()):
        if name == "diffusion_feature" or name.startswith("diffusion_feature."):
            names.setdefault(id(module), []).append(name)
    assert [sorted(n) for n in names.values() if len(n) > 1] == []
    with pytest.raises(ModuleNotFoundError, match="diffusion_feature.nodes.extraction"):
        importlib.import_module("diffusion_feature.nodes.extraction")

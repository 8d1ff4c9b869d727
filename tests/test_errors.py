"""How the pack's errors present themselves (layer_catalog/errors.py): user input echoed at a bounded length, and
exception classes under their public module names even when the pack is imported as ComfyUI imports it."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

from diffusion_feature.layer_catalog.errors import ECHO_LIMIT, echo

ROOT = Path(__file__).resolve().parents[1]
HUGE = 100_000


def test_echo_keeps_short_values_and_cuts_long_ones_saying_their_length():
    assert echo("up-level1-repeat1-res-out") == "'up-level1-repeat1-res-out'"
    assert echo(12) == "12" and echo([1, 2]) == "[1, 2]"
    long = echo("a" * HUGE)
    assert long == repr("a" * ECHO_LIMIT) + f"... ({HUGE} characters)"
    assert echo(list(range(HUGE))).endswith(" characters)") and len(echo(list(range(HUGE)))) < ECHO_LIMIT + 40


def _places(tmp_path):
    """Every kind of place that quotes a user's value in an error: (what, call raising ValueError)."""
    from diffusion_feature.engine.dataset.output_folder import check_prompts
    from diffusion_feature.engine.loading import random_family
    from diffusion_feature.engine.model import parse_device
    from diffusion_feature.engine.output_paths import resolve_prefix
    from diffusion_feature.engine.samplers import parse_capture_steps
    from diffusion_feature.engine.schedule import parse_timesteps
    from diffusion_feature.layer_catalog import get_family, parse_id, preset_ids, resolve_layers
    from diffusion_feature.nodes import comfy_env

    big = "x" * HUGE
    record = {"image": "a.png", "status": "done", "settings": "d", "prompt": "a cat"}
    return {
        "layer id": lambda: resolve_layers(big, "sd15"),
        "layer id syntax": lambda: parse_id(big),
        "layer file": lambda: resolve_layers(str(tmp_path / (big[:200] + ".json")), "sd15"),
        "capture steps": lambda: parse_capture_steps(f"0, {big}", 10),
        "timesteps": lambda: parse_timesteps(f"50, {big}"),
        "preset": lambda: preset_ids("sd15", big),
        "family": lambda: get_family(big),
        "prompt": lambda: check_prompts(tmp_path, [record], {"a.png": big}, "d"),
        "filename prefix": lambda: resolve_prefix(big, tmp_path),
        "model name": lambda: comfy_env.model_path("checkpoints", big),
        "layer file name": lambda: comfy_env.layer_file(big + ".json"),
        "device": lambda: parse_device(big),
        "random model": lambda: random_family("random:" + big),
    }


@pytest.mark.parametrize("place", ["layer id", "layer id syntax", "layer file", "capture steps", "timesteps",
                                   "preset", "family", "prompt", "filename prefix", "model name",
                                   "layer file name", "device", "random model"])
def test_errors_quote_user_input_at_a_bounded_length(tmp_path, monkeypatch, place):
    monkeypatch.setenv("DF_CHECKPOINTS_DIR", str(tmp_path))
    monkeypatch.setenv("DF_INPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError) as e:
        _places(tmp_path)[place]()
    message = str(e.value)
    assert len(message) < 1000, (place, len(message), message[:300])
    assert "characters)" in message or "bytes" in message, message


def _own_modules() -> list[str]:
    """Every module of the pack (its packages' .py files), as dotted names below the package."""
    names = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in ("layer_catalog", "engine", "native", "nodes"):
            continue
        names.append(".".join(rel.with_suffix("").parts).removesuffix(".__init__"))
    return sorted(names)


def test_exception_classes_keep_their_public_module_under_comfyuis_import(tmp_path):
    """ComfyUI imports the pack under its folder's path (custom_nodes/diffusion_feature -> a module named by that
    path); every exception class of every module still names its module as users import it, so ComfyUI's
    exception_type reads e.g. diffusion_feature.native.capture.NoCaptureError."""
    name = str(tmp_path / "custom_nodes" / "diffusion_feature").replace(".", "_x_")  # as ComfyUI names it
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    try:
        spec.loader.exec_module(pack)
        found = {}
        for sub in _own_modules():
            module = importlib.import_module(f"{name}.{sub}")
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, BaseException) and \
                        value.__module__ not in ("builtins",) and not value.__name__.startswith("_"):
                    found[value.__qualname__] = value
        ours = {k: v for k, v in found.items() if "diffusion_feature" in v.__module__}  # not torch's, PIL's, ...
        assert len(ours) >= 19, sorted(ours)
        for qualname, cls in ours.items():
            assert cls.__module__.startswith("diffusion_feature."), (qualname, cls.__module__)
            public = importlib.import_module(cls.__module__)  # the library's own import of that module
            assert getattr(public, qualname).__module__ == cls.__module__
        assert found["NoCaptureError"].__module__ == "diffusion_feature.native.capture"
        assert found["LayerIdError"].__module__ == "diffusion_feature.layer_catalog.resolver"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]

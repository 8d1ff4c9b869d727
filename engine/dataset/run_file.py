"""The settings a run was made with, in OUT/df_index/run.json, written atomically once when the run starts.

--resume continues only a run of the same settings: every field that changes the features (model, family, dtype,
layers, t, seed, prompts, size, resize, format, layout, ensemble, feature resize and dtype, VAE sampling, denoise
settings, LoRAs, ControlNets, hints) must match, compared field by field so the refusal names each difference.
What does not change the features may differ: device, batch size, the number of processes, the latent cache,
--stop-on-error, and the input itself (images added since are simply done, images removed are left as they are).

The settings' digest goes into every index record, so a record is trusted only for the settings it was made with.
Beside the settings, the run file keeps the run's naming root (the absolute folder its outputs' names start from,
sources.py): fixed by the first run, so names never change when the input grows. It is no setting (the digest
leaves it out); run files of older versions have none (output_folder.naming_root recovers it from the index).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...layer_catalog.errors import DiffusionFeatureError, echo
from ..features_io import write_atomic
from .naming import INDEX_DIR

TOOL = "diffusion_feature extract"
VERSION = 1
RUN_FILE = "run.json"


class ResumeError(DiffusionFeatureError, ValueError):
    """An output folder a run cannot write into or continue; the message names the folder and what to do."""


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_path(out: Path) -> Path:
    return Path(out) / INDEX_DIR / RUN_FILE


def _load(out: Path) -> dict | None:
    """The run file's content (None when the folder holds none); ResumeError when it is not ours or unreadable."""
    path = run_path(out)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ResumeError(f"{path} is not a readable run file of `{TOOL}`; choose another --output") from None
    if not isinstance(data, dict) or data.get("tool") != TOOL or not isinstance(data.get("settings"), dict):
        raise ResumeError(f"{path} was not written by `{TOOL}`; choose another --output")
    if data.get("version") != VERSION:
        raise ResumeError(f"{path} is from index version {echo(data.get('version'))}; this version reads {VERSION}: "
                          "choose another --output")
    return data


def read(out: Path) -> dict | None:
    """The run file's settings (None when the folder holds none); ResumeError when it is not ours or unreadable."""
    data = _load(out)
    return None if data is None else data["settings"]


def recorded_root(out: Path) -> str | None:
    """The naming root the run file keeps (None: no run file, or one of a version that kept none)."""
    data = _load(out)
    root = None if data is None else data.get("naming_root")
    return root if isinstance(root, str) and root else None


def write(out: Path, settings: dict, naming_root: str | None = None) -> Path:
    text = json.dumps({"tool": TOOL, "version": VERSION, "settings": settings, "digest": digest(settings),
                       "naming_root": naming_root}, indent=1, sort_keys=True)
    return write_atomic(run_path(out), lambda p: Path(p).write_text(text, encoding="utf-8"))


def differences(old: dict, new: dict, keys=None) -> list[str]:
    """'t: [50] there, [25, 50] now' for each compared field that differs."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now" for k in keys
            if old.get(k) != new.get(k)]


def refuse(out: Path, diff: list[str]) -> None:
    raise ResumeError(f"--resume: {out} was made with other settings ({'; '.join(diff)}); resume with the same "
                      "settings or choose another --output")


def check_same(out: Path, old: dict, new: dict, keys=None) -> None:
    diff = differences(old, new, keys)
    if diff:
        refuse(out, diff)

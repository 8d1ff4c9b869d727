"""Saving features and loading them back.

Formats and layouts:
- safetensors (default): one file per image, `<name>.safetensors`, holding every requested layer (C, H, W) and the
  metadata (family, t, seed, size, prompt, layer ids).
- npy, for the reference project's layouts: `per-layer` (<layer>/<name>.npy), `per-sample` (<name>/<layer>.npy),
  or `aggregate` (<name>.npy: every spatial layer resized to the largest grid and concatenated on channels; maps
  are not spatial and are left out). Metadata goes beside them as JSON.

Every file is written to a temporary name in the target folder and then linked into place, which fails rather than
replaces when the name exists: nothing is overwritten silently, and a crash leaves no half-written file.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMATS = ("safetensors", "npy")
LAYOUTS = ("per-sample", "per-layer", "aggregate")
_META_KEYS = ("family", "t", "seed", "size", "input_size", "prompt", "layers", "name", "step", "ensemble",
              "aggregate_slices", "timestep", "branch", "image", "scheduler", "steps", "cfg", "denoise",
              "denoise_from", "denoise_steps", "controlnets")
_ROW_KEYS = ("step", "timestep", "branch", "image")  # per-row labels of features captured during generation


class FeatureFileError(ValueError):
    """A features file that cannot be read; the message names it."""


@dataclass
class Features:
    """Ordered layer id -> tensor (B, ...) plus what produced them."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    @classmethod
    def empty(cls, size, **meta) -> "Features":
        """No layers captured (a run without capture steps or without attached layers), for nodes that must
        still return DF_FEATURES."""
        return cls({}, {"size": list(size), "rows": [], **meta})


def is_map(layer_id: str) -> bool:
    return layer_id.endswith("-map")


def safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".")
    if not name:
        raise ValueError("a sample name is empty after removing unsafe characters")
    return name


def write_atomic(final: Path, write) -> Path:
    """write(tmp_path) then link it to `final`; FileExistsError if `final` exists. No partial file ever remains."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        os.link(tmp, final)  # atomic, and unlike rename it refuses to replace an existing file
    except FileExistsError:
        raise FileExistsError(f"{final} already exists; features are never overwritten (choose another name or "
                              "folder)") from None
    finally:
        os.unlink(tmp)
    return final


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to the temporary name
        np.save(fh, array, allow_pickle=False)


def aggregate(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Spatial layers (B, C, H, W) resized (bilinear) to the largest grid and concatenated on channels.

    Returns the tensor and each layer's channel slice [start, stop)."""
    spatial = {k: v for k, v in tensors.items() if not is_map(k)}
    if not spatial:
        raise ValueError("the aggregate layout needs at least one spatial layer (attention maps are not spatial)")
    h, w = max((v.shape[-2:] for v in spatial.values()), key=lambda s: s[0] * s[1])
    parts, slices, start = [], {}, 0
    for k, v in spatial.items():
        v = v.float()
        if tuple(v.shape[-2:]) != (h, w):
            v = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(v)
        slices[k] = [start, start + v.shape[1]]
        start += v.shape[1]
    return torch.cat(parts, dim=1), slices


def row_label(features: Features, i: int) -> str:
    """'step005_cond' for row i of features captured during generation ('' for extracted features)."""
    rows = features.meta.get("rows")
    if not rows:
        return ""
    return f"step{rows[i]['step']:03d}_{rows[i]['branch']}"


def _meta_for(features: Features, name: str, extra: dict | None = None, row: int | None = None) -> dict:
    meta = {k: v for k, v in features.meta.items() if k in _META_KEYS}
    if row is not None and features.meta.get("rows"):  # a generation row: its own step, timestep, branch, image
        meta.update({k: features.meta["rows"][row][k] for k in _ROW_KEYS if k in features.meta["rows"][row]})
    meta["layers"] = list(features.tensors)
    meta["name"] = name
    meta.update(extra or {})
    return meta


def save_features(features: Features, out_dir, names: list[str], fmt: str = "safetensors",
                  layout: str = "per-sample") -> list[Path]:
    """Write one entry per sample; `names[i]` names sample i. Returns the paths written (data files first)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if len(names) != features.batch:
        raise ValueError(f"{len(names)} names for {features.batch} samples")
    out = Path(out_dir)
    names = [safe_name(n) for n in names]
    written: list[Path] = []
    agg, slices = aggregate(features.tensors) if layout == "aggregate" else (None, None)
    for i, name in enumerate(names):
        sample = {k: v.contiguous() for k, v in features.sample(i).items()}
        if fmt == "safetensors" and layout != "aggregate":
            meta = {k: json.dumps(v) for k, v in _meta_for(features, name, row=i).items()}
            written.append(write_atomic(out / f"{name}.safetensors",
                                         lambda p: save_file({k: v.cpu() for k, v in sample.items()}, p, meta)))
            continue
        if fmt == "safetensors":  # aggregate as one tensor per file
            meta = {k: json.dumps(v) for k, v in _meta_for(features, name, {"aggregate_slices": slices},
                                                           row=i).items()}
            data = {"aggregate": agg[i].contiguous().cpu()}
            written.append(write_atomic(out / f"{name}.safetensors", lambda p: save_file(data, p, meta)))
            continue
        if layout == "aggregate":
            targets = {out / f"{name}.npy": agg[i]}
            meta_path, extra = out / f"{name}.json", {"aggregate_slices": slices}
        elif layout == "per-layer":
            targets = {out / k / f"{name}.npy": v for k, v in sample.items()}
            meta_path, extra = out / f"{name}.json", None
        else:
            targets = {out / name / f"{k}.npy": v for k, v in sample.items()}
            meta_path, extra = out / name / "meta.json", None
        for path, tensor in targets.items():
            array = tensor.detach().cpu()
            array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
            written.append(write_atomic(path, lambda p, a=array: _save_npy(p, a)))
        meta_text = json.dumps(_meta_for(features, name, extra, row=i), indent=1)
        written.append(write_atomic(meta_path, lambda p: Path(p).write_text(meta_text)))
    return written


def load_features(path) -> Features:
    """Load one saved sample: a .safetensors file, or a sample's .npy metadata (.json / meta.json) written by
    `save_features`. Tensors come back batched (1, ...)."""
    p = Path(path)
    if not p.exists():
        raise FeatureFileError(f"features file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            tensors = load_file(str(p))
            with safe_open(str(p), "pt") as f:
                raw = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise FeatureFileError(f"{str(p)!r} is not a valid safetensors file ({e})") from None
        meta = {k: json.loads(v) for k, v in raw.items() if k in _META_KEYS}
        order = meta.get("layers") or list(tensors)
        if "aggregate" in tensors:
            return Features({"aggregate": tensors["aggregate"][None]}, meta)
        return Features({k: tensors[k][None] for k in order}, meta)
    if p.is_dir():
        p = p / "meta.json"
    if p.suffix != ".json":
        raise FeatureFileError(f"{str(p)!r}: give a .safetensors file or the .json written beside .npy features")
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureFileError(f"{str(p)!r} is not a features metadata file ({e})") from None
    name = meta["name"]
    if "aggregate_slices" in meta:
        return Features({"aggregate": torch.from_numpy(np.load(p.parent / f"{name}.npy"))[None]}, meta)
    if p.name == "meta.json":
        files = {k: p.parent / f"{k}.npy" for k in meta["layers"]}
    else:
        files = {k: p.parent / k / f"{name}.npy" for k in meta["layers"]}
    return Features({k: torch.from_numpy(np.load(f, allow_pickle=False))[None] for k, f in files.items()}, meta)

"""Saving features and loading them back.

Formats and layouts:
- safetensors (default): one file per image, `<name>.safetensors`, holding every requested layer (C, H, W) and the
  metadata (family, t, seed, height and width, prompt, layer ids).
- npy, for the reference project's layouts: `per-layer` (<layer>/<name>.npy), `per-sample` (<name>/<layer>.npy),
  or `aggregate` (<name>.npy: every spatial layer resized to the largest grid and concatenated on channels; maps
  and text-token features are not spatial and are left out). Metadata goes beside them as JSON.

Every file is written inside a temporary folder of ours in the target folder (`.df-XXXXXXXX.tmp/`), fsync'd, and
then linked into place, which fails rather than replaces when the name exists: nothing is overwritten silently, a
crash leaves no half-written file under a final name, and whatever a writer makes on its own (safetensors writes
through its own `.tmpXXXXXX` file) lies inside that folder, so a killed write leaves one thing to clean: the folder.
Files get the mode the umask gives a new file (0666 & ~umask), as ComfyUI's own saves do.

Files to load may come from anyone who can upload to a ComfyUI server, so nothing read from them names a file or
sizes an allocation unchecked: tensor keys and layer lists must be layer ids of the grammar, sample names plain
names, the .npy files must lie beside their metadata, and image sizes are bounded (see safe_paths).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..layer_catalog.errors import DiffusionFeatureError, echo
from ..layer_catalog.grammar import LayerIdSyntaxError, format_id, parse_id
from .safe_paths import UnsafePathError, check_inside, check_length, component

FORMATS = ("safetensors", "npy")
LAYOUTS = ("per-sample", "per-layer", "aggregate")
_META_KEYS = ("family", "t", "seed", "height", "width", "input_height", "input_width", "prompt", "layers", "name",
              "step", "ensemble", "aggregate_slices", "timestep", "branch", "image", "scheduler", "steps", "cfg",
              "denoise", "denoise_from", "denoise_steps", "controlnets", "sigma", "cond_index", "shift", "mu",
              "guidance",  # the last three: a flow family's (Flux) resolution shift and guidance input
              "transform", "massive_channels",  # DiTF's transform (the ditf preset) and the channels it zeroed
              "tokens")  # a diffusion transformer's token ranges: text, image, reference images (with their grids)
# Sizes are named keys: `height`, `width` (the image the model saw) and `input_height`, `input_width` (the image as
# given). Earlier files held one [height, width] pair, easily read as the CLI's WxH; they are still read.
_LEGACY_SIZE_KEYS = {"size": "", "input_size": "input_"}
# per-row labels of features captured during generation (DFGenerate, DFCollectFeatures)
_ROW_KEYS = ("step", "timestep", "sigma", "branch", "image", "cond_index", "tokens")
AGGREGATE = "aggregate"  # the one tensor key that is not a layer id: the aggregate layout's concatenation
MAX_IMAGE_SIDE = 16384  # ComfyUI's MAX_RESOLUTION: no node of it makes a larger image, so no saved size is larger


class FeatureFileError(DiffusionFeatureError, ValueError):
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
        return cls({}, {**size_meta(*size), "rows": [], **meta})


def is_map(layer_id: str) -> bool:
    return layer_id.endswith("-map")


def is_text(layer_id: str) -> bool:
    """A diffusion transformer's text-token feature (vit-block{B}-txt-...): (C, T) per sample, no image grid."""
    return "-txt-" in layer_id


def is_spatial(layer_id: str) -> bool:
    """A feature on the image grid, (C, h, w) per sample: neither an attention map nor text tokens."""
    return not is_map(layer_id) and not is_text(layer_id)


def safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".")
    if not name:
        raise ValueError("a sample name is empty after removing unsafe characters")
    return name


def check_feature_key(key) -> str:
    """A tensor key that may name a file or folder: exactly a layer id of the grammar, or 'aggregate'."""
    if key == AGGREGATE:
        return key
    try:
        if isinstance(key, str) and format_id(parse_id(key)) == key:
            return check_length(key, "a layer id")
    except LayerIdSyntaxError:
        pass
    raise FeatureFileError("these features hold a tensor key that is not a layer id of the grammar; keys name "
                           "files, so only layer ids (and 'aggregate') are accepted")


def size_meta(height: int, width: int, prefix: str = "") -> dict:
    """An image size as metadata: {prefix}height and {prefix}width, prefix "" for the image the model saw and
    "input_" for the image as it was given."""
    return {f"{prefix}height": int(height), f"{prefix}width": int(width)}


def _check_side(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGE_SIDE:
        raise FeatureFileError(f"the metadata's {key!r} must be an integer in 1..{MAX_IMAGE_SIDE}")
    return value


def image_size(meta: dict, prefix: str = "") -> tuple[int, int] | None:
    """(height, width) recorded by size_meta under `prefix`, each checked to lie in 1..MAX_IMAGE_SIDE (metadata may
    come from an uploaded file); None when the metadata records none."""
    keys = (f"{prefix}height", f"{prefix}width")
    if not all(k in meta for k in keys):
        return None
    return _check_side(meta[keys[0]], keys[0]), _check_side(meta[keys[1]], keys[1])


def check_image_size(value, key: str) -> list[int]:
    """A legacy (height, width) pair from metadata: two integers in 1..MAX_IMAGE_SIDE."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in value)):
        raise FeatureFileError(f"the metadata's {echo(key)} must be [height, width], two integers in 1.."
                               f"{MAX_IMAGE_SIDE}")
    return list(value)


TEMP_PREFIX, TEMP_SUFFIX = ".df-", ".tmp"  # write_atomic's temporary folders (older versions: files) are named so


def fsync_folder(folder) -> None:
    """Make a link or rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only writable handles
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, write) -> Path:
    """write(tmp_path) then link it to `final`; FileExistsError if `final` exists. No partial file ever remains
    under a final name; the data reaches the disk (fsync of the file, then of its folder) before this returns.
    tmp_path lies in a temporary folder of ours, which is removed however this ends (see the module docstring)."""
    check_length(final.name, f"the file {final.name[:32]}...")
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=final.parent)
    tmp = os.path.join(folder, "file")  # short and fixed: any final name the filesystem allows can be written
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that renamed its own file over tmp (safetensors: 0600)
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.link(tmp, final)  # atomic, and unlike rename it refuses to replace an existing file
        fsync_folder(final.parent)
    except FileExistsError:
        raise FileExistsError(f"{final} already exists; features are never overwritten (choose another name or "
                              "folder)") from None
    except OSError as e:  # a full disk, a read-only folder: the same error, naming the file it was for
        raise OSError(e.errno, e.strerror or str(e), str(final)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # what is left (a full disk cannot refuse it) --resume removes
    return final


def _save_safetensors(tensors: dict, path, metadata: dict) -> None:
    """safetensors' save_file, its write errors raised as the OSError they are (a full disk is an OSError in every
    format: the dataset run stops on it with its own exit status instead of a traceback)."""
    try:
        save_file(tensors, path, metadata)
    except SafetensorError as e:
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None:
            raise OSError(errno.EIO, f"safetensors could not write the file ({e})") from None
        raise OSError(int(m.group(1)), os.strerror(int(m.group(1)))) from None


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to the temporary name
        np.save(fh, array, allow_pickle=False)


def check_format(fmt: str, layout: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {echo(fmt)}; valid formats: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {echo(layout)}; valid layouts: {', '.join(LAYOUTS)}")


def check_layout_layers(layout: str, layer_ids) -> None:
    """A layout that concatenates spatial layers (aggregate) needs at least one among `layer_ids`: checked before
    any work where the layers are known early (DFCaptureLayers, before its sampler runs)."""
    if layout == "aggregate" and not any(is_spatial(k) for k in layer_ids):
        raise ValueError("the aggregate layout needs at least one spatial layer (attention maps and text-token "
                         "features are not spatial)")


def aggregate(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Spatial layers (B, C, H, W) resized (bilinear) to the largest grid and concatenated on channels.

    Returns the tensor and each layer's channel slice [start, stop)."""
    check_layout_layers("aggregate", tensors)
    spatial = {k: v for k, v in tensors.items() if is_spatial(k)}
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
    check_format(fmt, layout)
    if len(names) != features.batch:
        raise ValueError(f"{len(names)} names for {features.batch} samples")
    out = Path(out_dir)
    names = [safe_name(n) for n in names]
    for key in features.tensors:
        check_feature_key(key)
    agg, slices = aggregate(features.tensors) if layout == "aggregate" else (None, None)
    plan: list[tuple[Path, object]] = []  # every file of the save, checked before the first is written
    for i, name in enumerate(names):
        sample = {k: v.contiguous() for k, v in features.sample(i).items()}
        if fmt == "safetensors" and layout != "aggregate":
            meta = {k: json.dumps(v) for k, v in _meta_for(features, name, row=i).items()}
            plan.append((out / f"{name}.safetensors",
                         lambda p, s=sample, m=meta: _save_safetensors({k: v.cpu() for k, v in s.items()}, p, m)))
            continue
        if fmt == "safetensors":  # aggregate as one tensor per file
            meta = {k: json.dumps(v) for k, v in _meta_for(features, name, {"aggregate_slices": slices},
                                                           row=i).items()}
            data = {AGGREGATE: agg[i].contiguous().cpu()}
            plan.append((out / f"{name}.safetensors", lambda p, d=data, m=meta: _save_safetensors(d, p, m)))
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
            plan.append((path, lambda p, a=array: _save_npy(p, a)))
        meta_text = json.dumps(_meta_for(features, name, extra, row=i), indent=1)
        plan.append((meta_path, lambda p, t=meta_text: Path(p).write_text(t)))
    for path, _ in plan:
        check_inside(out, path, f"the file {path.name}")
        check_length(path.name, f"the file {path.name[:32]}...")
    return [write_atomic(path, write) for path, write in plan]


def _read_npy(path: Path, label: str) -> torch.Tensor:
    """One .npy array, its header checked against the file's size before anything is allocated (a crafted header
    could otherwise ask for any amount of memory); object arrays (pickles) are refused."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            data_bytes = os.fstat(fh.fileno()).st_size - fh.tell()
    except FileNotFoundError:
        raise FeatureFileError(f"{label} is missing") from None
    except (OSError, ValueError) as e:
        raise FeatureFileError(f"{label} is not a valid .npy file ({e})") from None
    if dtype.hasobject:
        raise FeatureFileError(f"{label} holds Python objects; only numeric arrays are read")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize != data_bytes:
        raise FeatureFileError(f"{label}: its header's shape {tuple(shape)} does not match the file's size")
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise FeatureFileError(f"{label} is not a valid .npy file ({e})") from None


def _checked_meta(meta, label: str) -> dict:
    """The metadata fields that name files or size allocations, validated (see the module docstring)."""
    if not isinstance(meta, dict):
        raise FeatureFileError(f"{label}: its metadata must be a JSON object")
    layers = meta.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not layers:
            raise FeatureFileError(f"{label}: the metadata's 'layers' must be a non-empty list of layer ids")
        for key in layers:
            check_feature_key(key)
    for key, prefix in _LEGACY_SIZE_KEYS.items():  # a file written before the named keys
        if key in meta:
            meta = {**size_meta(*check_image_size(meta.pop(key), key), prefix), **meta}
    for prefix in _LEGACY_SIZE_KEYS.values():
        image_size(meta, prefix)
    return meta


def load_features(path, root=None) -> Features:
    """Load one saved sample: a .safetensors file, or a sample's .npy metadata (.json / meta.json) written by
    `save_features`. Tensors come back batched (1, ...).

    root: the folder the file must lie in (ComfyUI's output folder); errors then name the file relative to it.
    The .npy files named by a metadata file must lie beside it, whatever its content says."""
    p = Path(path)
    if root is not None:
        label = repr(str(p.relative_to(root)) if p.is_relative_to(root) else p.name)
        try:
            p = check_inside(root, p, f"features file {label}")
        except UnsafePathError as e:
            raise FeatureFileError(str(e)) from None
    else:
        label = repr(str(p))
    if not p.exists():
        raise FeatureFileError(f"features file {label} does not exist")
    if p.suffix == ".safetensors":
        try:
            tensors = load_file(str(p))
            with safe_open(str(p), "pt") as f:
                raw = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise FeatureFileError(f"{label} is not a valid safetensors file ({e})") from None
        try:
            meta = {k: json.loads(v) for k, v in raw.items() if k in _META_KEYS or k in _LEGACY_SIZE_KEYS}
        except json.JSONDecodeError:
            raise FeatureFileError(f"{label}: its metadata is not valid JSON") from None
        meta = _checked_meta(meta, label)
        for key in tensors:
            check_feature_key(key)
        if AGGREGATE in tensors:
            return Features({AGGREGATE: tensors[AGGREGATE][None]}, meta)
        order = meta.get("layers") or list(tensors)
        if set(order) != set(tensors):
            raise FeatureFileError(f"{label}: the metadata's layer list does not match the tensors in the file")
        return Features({k: tensors[k][None] for k in order}, meta)
    if p.is_dir():
        p = p / "meta.json"
    if p.suffix != ".json":
        raise FeatureFileError(f"{label}: give a .safetensors file or the .json written beside .npy features")
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise FeatureFileError(f"features file {label} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise FeatureFileError(f"{label} is not a features metadata file (not readable JSON)") from None
    meta = _checked_meta(meta, label)
    try:
        name = component(meta.get("name"), "the metadata's 'name'")
    except UnsafePathError as e:
        raise FeatureFileError(f"{label}: {e} (the sample name written by DFSaveFeatures)") from None
    folder = p.parent
    if "aggregate_slices" in meta:
        files = {AGGREGATE: folder / f"{name}.npy"}
    elif not meta.get("layers"):
        raise FeatureFileError(f"{label}: the metadata has no 'layers' list")
    elif p.name == "meta.json":
        files = {k: folder / f"{k}.npy" for k in meta["layers"]}
    else:
        files = {k: folder / k / f"{name}.npy" for k in meta["layers"]}
    tensors = {}
    for key, file in files.items():
        try:
            file = check_inside(folder, file, f"the file of layer {key}")
        except UnsafePathError as e:
            raise FeatureFileError(f"{label}: {e}") from None
        tensors[key] = _read_npy(file, f"{label}'s data file for {key}")[None]
    return Features(tensors, meta)

"""The one rule for untrusted names: a path that comes from a widget, a file's content or its metadata is resolved
inside its allowed root (the output, input or a model folder) before anything is opened or created.

On a shared ComfyUI server anyone can upload files into the input and output folders, so a features file's tensor
keys, a meta.json's `name` and `layers`, and a layer file's name are all attacker-chosen. Everything here is pure
(no ComfyUI): the callers pass the root.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PureWindowsPath

from ..layer_catalog.errors import DiffusionFeatureError

NAME_MAX = 255  # bytes of one path component on every common filesystem (ext4, xfs, btrfs, NTFS, APFS)
MAX_DEPTH = 32  # subfolders below a root that a name may ask for; deeper is refused, never recursed into
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafePathError(DiffusionFeatureError, ValueError):
    """A name that would leave its root, or that no filesystem can hold. The message names the input."""


def _parts(name: str, what: str, folder: str = "its folder") -> list[str]:
    if not isinstance(name, str):
        raise UnsafePathError(f"{what} must be a text name, got a {type(name).__name__}")
    if "\x00" in name:
        raise UnsafePathError(f"{what} contains a NUL character")
    if os.path.isabs(name) or PureWindowsPath(name).is_absolute() or _DRIVE.match(name) or name.startswith("\\"):
        raise UnsafePathError(f"{what} is an absolute path; give a name relative to {folder}")
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{what} contains '..'; names must stay inside {folder}")
    if not parts:
        raise UnsafePathError(f"{what} is empty")
    if len(parts) > MAX_DEPTH:
        raise UnsafePathError(f"{what} is {len(parts)} folders deep; at most {MAX_DEPTH} are allowed")
    for p in parts:
        check_length(p, what)
    return parts


def check_length(component: str, what: str) -> str:
    """One file or folder name must fit the filesystem's limit (NAME_MAX bytes)."""
    size = len(os.fsencode(component))
    if size > NAME_MAX:
        raise UnsafePathError(f"{what}: a file or folder name of {size} bytes is longer than the {NAME_MAX} "
                              "bytes filesystems allow (use a shorter name)")
    return component


def component(name: str, what: str) -> str:
    """A single file or folder name (no separators), e.g. a sample name read from a meta.json."""
    parts = _parts(name, what)
    if len(parts) != 1 or parts[0] != name:
        raise UnsafePathError(f"{what} must be a plain name without folders")
    return name


def inside(root, name: str, what: str, folder: str = "its folder") -> Path:
    """`root / name` resolved, refused unless it stays inside `root` (links included: a name that resolves out of
    the root through a link is refused too). Nothing is created or opened."""
    parts = _parts(name, what, folder)
    base = Path(root).resolve()
    return _resolved_inside(base, base.joinpath(*parts), what, folder, " through a link")


def check_inside(root, path, what: str) -> Path:
    """An already-built path, resolved and refused unless it lies inside `root`."""
    return _resolved_inside(Path(root).resolve(), Path(path), what, "its folder")


def _resolved_inside(base: Path, path: Path, what: str, folder: str, how: str = "") -> Path:
    """`path` resolved (links followed), refused unless it is `base` (resolved) or lies below it."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a link loop
        raise UnsafePathError(f"{what} cannot be resolved inside {folder}") from None
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{what} leads outside {folder}{how}; only files inside it can be used")
    return target


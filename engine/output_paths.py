"""ComfyUI's filename_prefix rules, as a pure function: where a save node writes inside the output folder.

`a/b/name` writes `name_00001_...` in the subfolder a/b of the output folder (created as needed); the counter
continues after the highest one already there. A prefix that leaves the output folder (`../x`, `/abs`) is refused.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..layer_catalog.errors import DiffusionFeatureError, echo
from .safe_paths import UnsafePathError, check_length, inside

# The least a save appends to the prefix's last part (its counter); the full names are checked before any write.
_SUFFIX_RESERVE = len("_00001_")


class OutputPathError(DiffusionFeatureError, ValueError):
    pass


def resolve_prefix(filename_prefix: str, output_dir) -> tuple[Path, str, str]:
    """(folder, base name, subfolder relative to output_dir) for a prefix; refuses anything outside output_dir."""
    prefix = (filename_prefix or "").strip()
    if not prefix:
        raise OutputPathError("filename_prefix is empty: give a name such as 'diffusion_feature/features'")
    root = Path(output_dir).resolve()
    try:
        target = inside(root, prefix, f"filename_prefix {echo(prefix)}", "the output folder")
        if target == root:
            raise UnsafePathError(f"filename_prefix {echo(prefix)} names the output folder itself; add a file name")
        check_length(target.name + "x" * _SUFFIX_RESERVE, f"filename_prefix {echo(prefix)} with its counter and "
                                                          "extension")
    except UnsafePathError as e:
        raise OutputPathError(f"{e} (e.g. 'subfolder/name')") from None
    folder, name = target.parent, target.name
    return folder, name, str(folder.relative_to(root)) if folder != root else ""


def next_counter(folder: Path, name: str) -> int:
    """1 + the highest NNNNN of entries named `<name>_NNNNN_...` in folder (1 when there are none)."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_")
    best = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            m = pattern.match(entry.name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def sample_names(filename_prefix: str, output_dir, count: int) -> tuple[Path, list[str], str]:
    """The folder and `count` fresh sample names (name_00001_, name_00002_, ...) for a save."""
    folder, name, subfolder = resolve_prefix(filename_prefix, output_dir)
    start = next_counter(folder, name)
    return folder, [f"{name}_{start + i:05d}_" for i in range(count)], subfolder

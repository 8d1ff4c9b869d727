"""Where an image's features go: output names mirror the image's relative name, one set of files per timestep.

`city/a.png` -> `city/a` (the stem, each folder kept; each part made a safe name, so odd characters become '_');
with several timesteps every t gets its own entry, `city/a_t025`, `city/a_t050`, ... (t zero-padded to three
digits, so names sort by t). The files of an entry follow features_io's formats and layouts inside the entry's
folder (`OUT/city/`): `a.safetensors`; npy per-sample `a/<layer>.npy` + `a/meta.json`; per-layer
`<layer>/a.npy` + `a.json`; aggregate `a.npy` + `a.json`.

Knowing an entry's files before they are written lets a run refuse collisions up front (two inputs that would
write the same file, such as `a.png` and `a.jpg` side by side, both fail with the reason; the others go on),
refuse to overwrite, and on --resume clear what a killed run left of an entry it had not finished.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import PurePosixPath

from ..features_io import safe_name
from ..safe_paths import UnsafePathError, check_length

INDEX_DIR = "df_index"  # the run's own folder inside the output folder (run.json, the index parts, summary.json)


def _safe_part(part: str) -> str:
    try:
        return safe_name(part)
    except ValueError:  # nothing left of it ('...', or only characters outside [A-Za-z0-9._-] and dots)
        return "_"


def entry_stem(relative: str) -> str:
    """'city/a b.png' -> 'city/a_b': the relative name without its extension, each part a safe name (characters
    outside [A-Za-z0-9._-] become '_'), so no part can be '..' or hold a separator."""
    parts = PurePosixPath(relative).parts
    stem = PurePosixPath(parts[-1]).stem
    return PurePosixPath(*[_safe_part(p) for p in parts[:-1]], _safe_part(stem)).as_posix()


def entry_names(relative: str, timesteps: list[int]) -> list[str]:
    """One entry per timestep; the name carries t only when more than one is asked."""
    stem = entry_stem(relative)
    if len(timesteps) == 1:
        return [stem]
    return [f"{stem}_t{t:03d}" for t in timesteps]


def entry_files(entry: str, layer_ids: list[str], fmt: str, layout: str) -> list[str]:
    """Relative paths (posix) of the files save_features writes for one entry."""
    path = PurePosixPath(entry)
    folder, name = path.parent, path.name
    if fmt == "safetensors":
        return [(folder / f"{name}.safetensors").as_posix()]
    if layout == "aggregate":
        return [(folder / f"{name}.npy").as_posix(), (folder / f"{name}.json").as_posix()]
    if layout == "per-layer":
        return [(folder / k / f"{name}.npy").as_posix() for k in layer_ids] + [(folder / f"{name}.json").as_posix()]
    return [(folder / name / f"{k}.npy").as_posix() for k in layer_ids] + [(folder / name / "meta.json").as_posix()]


def planned_files(relative: str, timesteps: list[int], layer_ids: list[str], fmt: str, layout: str) -> list[str]:
    return [f for e in entry_names(relative, timesteps) for f in entry_files(e, layer_ids, fmt, layout)]


def plan(relatives: list[str], timesteps: list[int], layer_ids: list[str], fmt: str, layout: str
         ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({relative name: its files}, {relative name: why it cannot be written}) for a run's images: a name no
    filesystem can hold (a part over 255 bytes once the t and extension are added) or a clash (see clashes)."""
    planned, problems = {}, {}
    for rel in relatives:
        files = planned_files(rel, timesteps, layer_ids, fmt, layout)
        try:
            for f in files:
                for part in PurePosixPath(f).parts:
                    check_length(part, f"the output {f[:60]}")
        except UnsafePathError as e:
            problems[rel] = str(e)
            continue
        planned[rel] = files
    problems.update({k: v for k, v in clashes(planned).items() if k not in problems})
    return planned, problems


def clashes(files_by_image: dict[str, list[str]]) -> dict[str, str]:
    """{relative name: reason} for every image whose planned files another image also plans (a file of one being a
    folder of another counts), or that would write into the run's own index folder."""
    owners: dict[str, list[str]] = defaultdict(list)
    folders: dict[str, list[str]] = defaultdict(list)
    for image, files in files_by_image.items():
        for f in files:
            owners[f].append(image)
            for parent in PurePosixPath(f).parents:
                if str(parent) != ".":
                    folders[parent.as_posix()].append(image)
    problems: dict[str, str] = {}
    for image, files in files_by_image.items():
        for f in files:
            if PurePosixPath(f).parts[0] == INDEX_DIR:
                problems[image] = f"its output {f} would be inside the run's index folder {INDEX_DIR}/; rename it"
                break
            others = sorted({o for o in owners[f] + folders.get(f, []) if o != image})
            if others:
                problems[image] = (f"{image} and {others[0]} would both be written as {f}; rename one of them "
                                   "(outputs mirror the input's names without their extensions)")
                break
    return problems

"""Which files a run reads, and the relative name each keeps.

An image's relative name (`city/a.png` for `in/city/a.png`) is its identity for the whole run: its outputs mirror
it, a hint folder is looked up by it, the index is keyed by it. So it depends only on where the file lies below the
input's root, never on which other files are present (adding images to a folder and resuming renames nothing).
The root a run's first attempt named its images from is its naming root, kept in its run file: a resumed run
names every input from it (rebase), whatever root the input of the day has (a list that grew past its old common
folder, a subfolder given as --input), and refuses an input outside it.

- A folder recurses (symlinked folders are followed once; a link loop is not). Hidden entries (`.name`, e.g.
  macOS's `._a.png` resource forks, which are not images) are skipped. Only files with an image extension, in any
  case, are taken; a folder named like an image is a folder and is recursed into.
- A glob (`**` recurses) takes the image files it matches; the root is its part before the first wildcard.
- One file named without wildcards, and each line of `--input-list`, are explicit: they are taken as they are, and
  one that is missing, a folder or not an image by its extension fails with that reason (the run goes on), rather
  than being dropped silently. The list's relative paths are read against the list's own folder; the root is the
  deepest folder common to every listed file. Blank lines and lines starting with '#' are skipped, the same file
  listed twice is taken once, and the list's order is kept (so a --prompt-file can follow it line by line).
- Folders and globs come sorted by relative name: the order, and so the split across ranks, is deterministic.
"""
from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ...layer_catalog.errors import echo
from ..images import IMAGE_SUFFIXES, ImageInputError

_MAGIC = set("*?[")


@dataclass(frozen=True)
class ImageSource:
    """One input of a run: the file to read and its name relative to the input's root (posix, with extension)."""

    path: Path
    relative: str
    problem: str | None = None  # why an explicitly named entry cannot be an image (the run records it as failed)


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk(root: Path) -> list[Path]:
    """Image files below root, following symlinked folders but never one already visited (no link loops)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and is_image_name(name):
                p = Path(folder) / name
                if p.is_file():
                    found.append(p)
    return found


def _relative(path: Path, root: Path) -> str:
    return PurePosixPath(*path.relative_to(root).parts).as_posix()


def _missing(path: Path) -> str:
    """Why an entry that does not exist as a file or folder cannot be read (a broken link and a link loop are not
    missing files)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"image {echo(str(path))} is a symbolic link loop (following its links never reaches a file)"
        if os.path.islink(path):
            return f"image {echo(str(path))} is a symbolic link to {echo(os.readlink(path))}, which does not exist"
    return f"image {echo(str(path))} does not exist"


def _explicit(path: Path, root: Path) -> ImageSource:
    problem = None
    if path.is_dir():
        problem = f"{echo(str(path))} is a folder, not an image file"
    elif not path.exists():
        problem = _missing(path)
    elif not is_image_name(path.name):
        problem = (f"{echo(str(path))} is not an image file by its extension (valid: {', '.join(IMAGE_SUFFIXES)}, "
                   "in any case)")
    return ImageSource(path, _relative(path, root), problem)


def from_pattern(pattern: str) -> list[ImageSource]:
    """The images of `--input`: a folder (recursive), a glob pattern, or one file."""
    p = Path(pattern)
    if p.is_dir():
        sources = [ImageSource(f, _relative(f, p)) for f in _walk(p)]
        if not sources:
            raise ImageInputError(f"no image files match {echo(pattern)} (a folder is searched recursively for "
                                  f"{', '.join(IMAGE_SUFFIXES)} files, in any case)")
        return sorted(sources, key=lambda s: s.relative)
    parts = p.parts
    if not any(_MAGIC & set(part) for part in parts):
        if not p.exists():
            raise ImageInputError(f"no image files match {echo(pattern)}: {_missing(p).removeprefix('image ')}")
        return [_explicit(p, p.parent)]
    static = next(i for i, part in enumerate(parts) if _MAGIC & set(part))
    root = Path(*parts[:static]) if static else Path(".")
    matches = [Path(f) for f in glob.glob(pattern, recursive=True)]
    sources = [ImageSource(f, _relative(f, root)) for f in matches if f.is_file() and is_image_name(f.name)]
    if not sources:
        raise ImageInputError(f"no image files match {echo(pattern)}")
    return sorted(sources, key=lambda s: s.relative)


def from_list(list_file) -> list[ImageSource]:
    """The images of `--input-list FILE`: one path per line (see the module docstring)."""
    lf = Path(list_file)
    if not lf.is_file():
        raise ImageInputError(f"input list {echo(str(lf))} does not exist")
    try:
        lines = lf.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ImageInputError(f"input list {echo(str(lf))} is not UTF-8 text (one image path per line)") from None
    paths, seen = [], set()
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if os.path.isabs(entry) else lf.parent / entry
        path = Path(os.path.abspath(path))
        if path not in seen:
            seen.add(path)
            paths.append(path)
    if not paths:
        raise ImageInputError(f"input list {echo(str(lf))} names no files (one image path per line)")
    root = Path(os.path.commonpath([str(q.parent) for q in paths]))
    return [_explicit(q, root) for q in paths]


def collect(input_pattern: str | None = None, input_list=None) -> list[ImageSource]:
    """Every input of a run, in run order."""
    if (input_pattern is None) == (input_list is None):
        raise ValueError("give exactly one of --input (a folder, glob or file) and --input-list (a text file)")
    return from_list(input_list) if input_list is not None else from_pattern(input_pattern)


class OutsideRootError(ImageInputError):
    """An input a run cannot name: it lies outside the folder its outputs are named from."""


def root_of(sources: list[ImageSource]) -> str:
    """The absolute folder the sources' relative names start from (the path minus the relative name)."""
    roots = set()
    for s in sources:
        path = Path(os.path.abspath(s.path))
        roots.add(str(path.parents[len(PurePosixPath(s.relative).parts) - 1]))
    if len(roots) != 1:
        raise ValueError(f"the sources of a run must share one root folder, these have {len(roots)}: "
                         f"{', '.join(sorted(roots)[:3])}")
    return roots.pop()


def rebase(sources: list[ImageSource], root) -> list[ImageSource]:
    """The sources named from `root` (a run's naming root); OutsideRootError naming the first that lies outside."""
    root = Path(root)
    rebased = []
    for s in sources:
        path = Path(os.path.abspath(s.path))
        if root not in path.parents:
            raise OutsideRootError(
                f"{echo(str(s.path))} lies outside {echo(str(root))}, the folder this run names its outputs from (fixed "
                "by its first run: outputs mirror paths below it); give inputs below it, or start a new run in "
                "another --output")
        rebased.append(ImageSource(s.path, _relative(path, root), s.problem))
    return rebased

"""The run's index: one JSON record per image, appended as each image finishes, consistent after any kill.

Each process (rank) appends to its own part, OUT/df_index/part-<rank>.jsonl, so processes never write the same
file. A record is one line written by a single write() on a file opened with O_APPEND, then fsync'd: a kill leaves
either the whole line or, at worst, a trailing piece without its newline. Readers ignore such a piece (and any line
that is not a JSON object); before a process appends to a part again it truncates the piece away, so a new record
never joins an old fragment.

A record is written only after every file of its image is on the disk (each file written in a temporary folder,
fsync'd and linked, then its folder fsync'd: features_io.write_atomic). Each output is recorded with its size,
mtime_ns and sha256, so an image is complete exactly when some `done` record of the current settings names files
that all exist with that content. Checking it (completion) costs a stat per file, and a re-hash only for a file
of the recorded size whose mtime is not the recorded one (copied, touched, rewritten in place), or for every file
with verify=True (--verify: damage that kept the size and mtime, such as bit rot). Records of older versions carry
no hash: their files are trusted by size, as those versions did. Anything else (no record, a failure, a file
missing, damaged) is done again on --resume, after clearing what a killed run left of it. `failed` records keep
the reason. Records of earlier attempts stay: the index is the run's history; an image's latest done record is
checked first.

Records: {"image": relative name, "source": path read, "status": "done"|"failed", "outputs": [{"path", "bytes",
"mtime_ns", "sha256"}], "t": [...], "seed", "prompt", "settings": digest, "rank", "seconds", "time"} ("error"
instead of outputs when failed). The writer is not thread-safe; the runner serialises its appends.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..features_io import TEMP_PREFIX, TEMP_SUFFIX, fsync_folder
from .naming import INDEX_DIR

PART_GLOB = "part-*.jsonl"
STOP_FILE = "stop-requested"
# safetensors' own temporary file (Rust's tempfile: '.tmp' + 6 characters), which versions before write_atomic's
# temporary folders left beside the outputs when killed
_WRITER_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def index_dir(out) -> Path:
    return Path(out) / INDEX_DIR


def part_path(out, rank: int) -> Path:
    return index_dir(out) / f"part-{rank:05d}.jsonl"


def truncate_fragment(path: Path) -> None:
    """Drop a trailing piece without newline (a record a kill cut short), so the next append starts a line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as fh:
        keep = 0
        block = 1 << 16
        pos = size
        while pos > 0:  # the last newline, read backwards in blocks
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        if keep != size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())


class IndexWriter:
    """Appends this process's records to its part (see the module docstring)."""

    def __init__(self, out, rank: int):
        self.path = part_path(out, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_fragment(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
        fsync_folder(self.path.parent)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a short write (a full disk) must not leave a fragment a later record joins
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - written)
            raise OSError(28, f"could not append a record to {self.path} (the disk may be full)")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_records(out) -> list[dict]:
    """Every whole record of every part, in file order (parts in rank order)."""
    records = []
    for part in sorted(index_dir(out).glob(PART_GLOB)):
        try:
            data = part.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.split(b"\n")[:-1]:  # the piece after the last newline is not a whole record
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("image"), str):
                records.append(record)
    return records


def file_sha256(path) -> str:
    """The file's sha256, read in 1 MiB blocks (outputs may be hundreds of MiB: attention maps)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_entry(path: Path, out: Path) -> dict:
    """What a record keeps of one output: its path in the run's folder, size, mtime_ns and content hash."""
    st = path.stat()
    return {"path": path.relative_to(out).as_posix(), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": file_sha256(path)}


def _damage(out: Path, record: dict, verify: bool) -> str | None:
    """None when every output of a done record is as recorded, else what is wrong with the first that is not."""
    outputs = record.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return "its record names no outputs"
    for item in outputs:
        try:
            path, size = out / item["path"], item["bytes"]
            st = path.stat()
        except FileNotFoundError:
            return f"{item['path']} is missing"
        except (OSError, KeyError, TypeError):
            return "its record is not readable"
        if st.st_size != size:
            return f"{item['path']} has {st.st_size} bytes, its record {size}"
        digest = item.get("sha256")
        if digest is None:  # a record of an older version: sizes are all it can check
            continue
        if verify or st.st_mtime_ns != item.get("mtime_ns"):
            try:
                same = file_sha256(path) == digest
            except OSError as e:
                return f"{item['path']} cannot be read ({e.__class__.__name__}: {e})"
            if not same:
                return f"{item['path']} does not match its recorded sha256 (changed since it was written)"
    return None


@dataclass
class Completion:
    """Which images of a run are complete, and what the check found on the way."""

    done: dict = field(default_factory=dict)      # relative name -> the done record whose outputs are intact
    damaged: list = field(default_factory=list)   # [relative name, why] for done images whose outputs changed
    unhashed: int = 0                             # complete images whose record (older version) has no hashes


def completion(out, settings_digest: str, records=None, images=None, verify: bool = False) -> Completion:
    """The complete images under these settings (of `images` only, when given: a process checks its own share).
    An image's done records are tried latest first; the first intact one makes it complete. An image with done
    records of which none is intact is damaged: its outputs changed since, and the run does it again."""
    out = Path(out)
    candidates: dict[str, list[dict]] = {}
    for record in read_records(out) if records is None else records:
        if (record.get("status") == "done" and record.get("settings") == settings_digest
                and (images is None or record["image"] in images)):
            candidates.setdefault(record["image"], []).append(record)
    result = Completion()
    for image, found in candidates.items():
        reason = None
        for record in reversed(found):  # parts are read in rank order: 'latest' within a part, which suffices
            problem = _damage(out, record, verify)
            if problem is None:
                result.done[image] = record
                if not all(isinstance(o, dict) and "sha256" in o for o in record["outputs"]):
                    result.unhashed += 1
                break
            reason = reason or problem
        else:
            result.damaged.append([image, reason])
    return result


def done_record(image: str, source, outputs: list[Path], out: Path, *, settings: str, t: list[int], seed: int,
                prompt: str, rank: int, seconds: float) -> dict:
    return {"image": image, "source": os.path.abspath(source), "status": "done", "settings": settings, "t": list(t),
            "seed": seed, "prompt": prompt, "rank": rank, "seconds": round(seconds, 4), "time": now(),
            "outputs": [output_entry(p, out) for p in outputs]}


def failed_record(image: str, source, error: str, *, settings: str, rank: int) -> dict:
    return {"image": image, "source": os.path.abspath(source), "status": "failed", "settings": settings, "error": error,
            "rank": rank, "time": now()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def remove_temporaries(out) -> list[Path]:
    """Delete what killed writes left anywhere in the output folder: write_atomic's temporary folders (and the
    temporary files of older versions, .df-*.tmp) and the safetensors writer's own .tmpXXXXXX files, which older
    versions left beside the outputs. A run calls this before any of its processes writes."""
    removed = []
    for folder, dirs, files in os.walk(out):
        for name in [d for d in dirs if d.startswith(TEMP_PREFIX) and d.endswith(TEMP_SUFFIX)]:
            dirs.remove(name)
            shutil.rmtree(Path(folder) / name)
            removed.append(Path(folder) / name)
        for name in files:
            if (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)) or _WRITER_TEMP.fullmatch(name):
                path = Path(folder) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_leftovers(out: Path, planned: list[str]) -> list[Path]:
    """Delete the planned files of an image that is about to be done again (a killed or failed attempt's files,
    never recorded as complete), and folders they leave empty."""
    removed = []
    for rel in planned:
        path = out / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    for rel in planned:
        folder = (out / rel).parent
        while folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return removed


def stop_path(out) -> Path:
    return index_dir(out) / STOP_FILE


def request_stop(out, reason: str) -> None:
    """Ask every process of the run to stop before its next batch (a full disk, --stop-on-error, Ctrl-C)."""
    try:
        path = stop_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reason + "\n", encoding="utf-8")
    except OSError:  # a full disk may refuse even this; the process that saw it stops anyway
        pass


def stop_requested(out) -> bool:
    return stop_path(out).exists()


def clear_stop(out) -> None:
    stop_path(out).unlink(missing_ok=True)

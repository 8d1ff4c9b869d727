"""The run's index: one JSON record per image, appended as each image finishes, consistent after any kill.

Each process (rank) appends to its own part, OUT/df_index/part-<rank>.jsonl, so processes never write the same
file. A record is one line written by a single write() on a file opened with O_APPEND, then fsync'd: a kill leaves
either the whole line or, at worst, a trailing piece without its newline. Readers ignore such a piece (and any line
that is not a JSON object); before a process appends to a part again it truncates the piece away, so a new record
never joins an old fragment.

A record is written only after every file of its image is in place (each file itself written to a temporary name and
linked, see features_io.write_atomic). So an image is complete exactly when some `done` record of the current
settings names files that all exist with the recorded sizes; anything else (no record, a failure, a file missing
or of another size) is done again on --resume, after clearing what a killed run left of it. `failed` records keep
the reason. Records of earlier attempts stay: the index is the run's history, and the completeness rule does not
depend on their order.

Records: {"image": relative name, "source": path read, "status": "done"|"failed", "outputs": [{"path", "bytes"}],
"t": [...], "seed", "prompt", "settings": digest, "rank", "seconds", "time"} ("error" instead of outputs when failed). The writer is not thread-safe; the
runner serialises its appends.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .naming import INDEX_DIR

PART_GLOB = "part-*.jsonl"
STOP_FILE = "stop-requested"
TEMP_PREFIX, TEMP_SUFFIX = ".df-", ".tmp"  # features_io.write_atomic's temporary names


def index_dir(out) -> Path:
    return Path(out) / INDEX_DIR


def part_path(out, rank: int) -> Path:
    return index_dir(out) / f"part-{rank:05d}.jsonl"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_dir(self.path.parent)

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


def _outputs_present(out: Path, record: dict) -> bool:
    outputs = record.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return False
    for item in outputs:
        try:
            if (out / item["path"]).stat().st_size != item["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def completed(out, settings_digest: str, records=None) -> dict[str, dict]:
    """{relative image name: its done record} for the images whose outputs are complete under these settings."""
    out = Path(out)
    done: dict[str, dict] = {}
    for record in read_records(out) if records is None else records:
        if (record.get("status") == "done" and record.get("settings") == settings_digest
                and record["image"] not in done and _outputs_present(out, record)):
            done[record["image"]] = record
    return done


def done_record(image: str, source, outputs: list[Path], out: Path, *, settings: str, t: list[int], seed: int,
                prompt: str, rank: int, seconds: float) -> dict:
    return {"image": image, "source": os.path.abspath(source), "status": "done", "settings": settings, "t": list(t),
            "seed": seed, "prompt": prompt, "rank": rank, "seconds": round(seconds, 4), "time": now(),
            "outputs": [{"path": p.relative_to(out).as_posix(), "bytes": p.stat().st_size} for p in outputs]}


def failed_record(image: str, source, error: str, *, settings: str, rank: int) -> dict:
    return {"image": image, "source": os.path.abspath(source), "status": "failed", "settings": settings, "error": error,
            "rank": rank, "time": now()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def remove_temporaries(out) -> list[Path]:
    """Delete the temporary files (.df-*.tmp) a killed write left anywhere in the output folder. Only
    write_atomic makes names of that form, and a run calls this before any of its processes writes."""
    removed = []
    for folder, _dirs, files in os.walk(out):
        for name in files:
            if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
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

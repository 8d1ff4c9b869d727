"""Extraction over a list of image files, the plain loop: group by size, batch, extract, save.

The CLI's `extract` runs dataset/runner.py instead, which adds what a dataset needs (bad files skipped, an index,
resume, several timesteps, ControlNet hints, several processes); this loop stays for library users and the demo,
and as the baseline bench/bench_folder.py measures the runner against.

Images whose resized sizes differ cannot share a batch (their latents differ), so files are grouped by the size the
resize policy gives them; within a group they go in batches of `batch_size`. Names come from the file names.
Before any model work, the output names are checked: a run never overwrites earlier features.

The model is the bottleneck, so nothing else waits for it: the next batch's images are decoded by a worker thread
while the current batch runs, and features are written by another while the next batch runs. Only one batch waits
for its write at a time, so memory holds at most two batches' features whatever the disk's speed; each batch is
checked against the memory guard before its forward (see extraction.extract).
"""
from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ..layer_catalog.errors import echo
from .extraction import extract
from .features_io import safe_name, save_features
from .prompts import encode_prompt
from .images import ImageInputError, check_size, open_image, target_size
from .lora import lora_applied


def find_images(pattern: str) -> list[Path]:
    """Image files of a folder (recursive), a glob pattern (recursive with **) or one file, in sorted order; only
    files with an image extension (any case) are taken from a folder or glob (see dataset.sources)."""
    from .dataset.sources import from_pattern

    found = from_pattern(pattern)
    bad = next((s.problem for s in found if s.problem), None)
    if bad:
        raise ImageInputError(bad)
    return [s.path for s in found]


def names_from_files(files: list[Path]) -> list[str]:
    """File stems; when two files share a stem, their parent folders are prefixed until names are unique."""
    names = [f.stem for f in files]
    depth = 1
    while len(set(names)) != len(names) and depth < 8:
        names = ["_".join([*f.parent.parts[-depth:], f.stem]) for f in files]
        depth += 1
    if len(set(names)) != len(names):
        raise ImageInputError("several input files map to the same output name; rename them")
    return [safe_name(n) for n in names]


def existing_outputs(out_dir: Path, names: list[str]) -> list[Path]:
    """Files or folders already in out_dir that a run with these sample names could collide with."""
    if not out_dir.exists():
        return []
    wanted = set(names)
    hits = []
    for entry in out_dir.rglob("*"):
        stem = entry.name.split(".")[0]
        if stem in wanted and entry.parent == out_dir or (entry.suffix == ".npy" and stem in wanted):
            hits.append(entry)
    return hits


def plan_batches(files: list[Path], native: int, resize: str, size, batch_size: int) -> list[list[int]]:
    """Indices of files per batch: same target size within a batch, at most batch_size each, in file order."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        if size is not None or resize != "keep-aspect":
            key = ("fixed",)
        else:
            try:
                with Image.open(f) as im:
                    w, h = im.size
            except (OSError, Image.DecompressionBombError) as e:
                raise ImageInputError(f"{echo(str(f))} is not a readable image ({e})") from None
            check_size(w, h, str(f))
            key = target_size(w, h, native, resize)
        groups[key].append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


def extract_folder(model, files: list[Path], prompts: list[str], layers, out_dir, *, t: int, seed: int,
                   batch_size: int = 1, fmt: str = "safetensors", layout: str = "per-sample",
                   resize: str = "keep-aspect", size=None, target_side: int | None = None, progress=None,
                   **extract_kw) -> list[Path]:
    """Extract and save features for every file; prompts[i] belongs to files[i]. Returns the files written."""
    out_dir = Path(out_dir)
    names = names_from_files(files)
    clash = existing_outputs(out_dir, names)
    if clash:
        raise FileExistsError(f"{out_dir} already holds features for {len(clash)} of these images (e.g. "
                              f"{clash[0]}); features are never overwritten: choose another --output")
    batches = plan_batches(files, target_side or model.native_size, resize, size, batch_size)
    written: list[Path] = []
    encoded: dict[str, object] = {}  # a prompt is encoded once per run, not once per batch

    def conditioning(batch):
        texts = {prompts[i] for i in batch}
        if len(texts) != 1:
            return [prompts[i] for i in batch]
        text = texts.pop()
        if text not in encoded:
            encoded[text] = encode_prompt(model, text)
        return encoded[text]

    # LoRAs are merged once for the whole folder (each extract's own merge is then a no-op)
    with lora_applied(model), ThreadPoolExecutor(1, thread_name_prefix="df-decode") as decoder, \
            ThreadPoolExecutor(1, thread_name_prefix="df-save") as saver:
        decode = lambda batch: [open_image(files[i]) for i in batch]  # noqa: E731
        upcoming = decoder.submit(decode, batches[0]) if batches else None
        pending = []
        for k, batch in enumerate(batches):
            images = upcoming.result()
            if k + 1 < len(batches):
                upcoming = decoder.submit(decode, batches[k + 1])
            features = extract(model, images, conditioning(batch), layers, t, seed, resize=resize, size=size,
                               target_side=target_side, **extract_kw)
            pending.append(saver.submit(save_features, features, out_dir, [names[i] for i in batch], fmt, layout))
            del features
            # At most one batch waits to be written while the next is extracted: a writer slower than the model
            # would otherwise keep every batch's features in memory. A failed write surfaces now, not at the end.
            while pending and (pending[0].done() or len(pending) > 1):
                written += pending.pop(0).result()
            if progress is not None:
                progress(len(batch))
        for job in pending:
            written += job.result()
    return written

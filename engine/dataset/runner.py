"""A dataset run: every image of a folder (glob, list) extracted at every t, saved and recorded; nothing stops it but
a write that fails, Ctrl-C, or --stop-on-error.

Data flows one way: sources -> (skip what the index says is complete) -> plan batches -> decode (a worker thread,
one batch ahead) -> extract every t in one pass -> save + record (another thread, at most one batch behind) ->
summary. An image that cannot be used (unreadable, missing, a hint missing, too big for memory, its output name
taken by another image) is recorded as failed with its reason and the run goes on; its batch-mates are done without
it. A write that fails (OSError, e.g. a full disk) stops the run: that image's files are removed, the index keeps
every record written so far, and --resume completes the rest.

Exit status (DatasetResult.status, the CLI's exit code): 0 every image written or already complete; 1 some images
failed (every other one written; with --stop-on-error the run stopped at the first failure); 3 the run stopped
because an output could not be written (any write error of any format: a full disk, a read-only folder), or
another process of the run died; 130 interrupted (Ctrl-C, or SIGTERM: a launcher stopping the survivors of a
process that died). The CLI exits 2 when it refuses before starting. summary.json is written whatever the status:
by the first process when the group ends together, else by each surviving process, which adds its own counts to
those already there for the same attempt (under a lock on the index folder).
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ...layer_catalog.errors import echo
from ...layer_catalog.resolver import names_preset
from ..dit_transforms import DITF, kept_request
from ..features_io import Features, check_format, save_features, size_meta
from ..images import ImageInputError, open_image, prepare, target_size
from ..memory_guard import FeatureMemoryError
from . import index, naming, output_folder, run_file
from .distributed import GroupLost, Ranks, Terminated, sigterm_as_interrupt
from .progress import Progress, RunStats, merge, summary_line
from .run_file import ResumeError
from .sources import ImageSource, rebase, root_of

EXIT_OK, EXIT_FAILED, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 3, 130
SUMMARY_FILE = "summary.json"
STOP_ON_ERROR = "--stop-on-error"


@dataclass(frozen=True)
class CannyHints:
    """Hints computed per image: canny edges of the image as the model sees it (thresholds on OpenCV's scale)."""

    low: int = 100
    high: int = 200


@dataclass
class DatasetResult:
    status: int              # see the module docstring
    stats: RunStats          # summed over every process
    seconds: float
    summary: str             # the summary line


@dataclass
class _Job:
    """Everything one process needs for its share (the same on every process but `rank`)."""

    out: Path
    layer_ids: list          # the ids the files hold
    timesteps: list
    seed: int
    fmt: str
    layout: str
    resize: str
    size: tuple | None       # (height, width), or None for the resize policy
    target_side: int | None
    native: int              # the side keep-aspect aims at
    batch_size: int
    extract_kw: dict         # ensemble, feature_resize, dtype, vae_sample, denoise_from, denoise_steps, shift, ...
    controlnets: list
    hint: object             # None, CannyHints or a hints.HintFolder
    latent_cache: object
    stop_on_error: bool
    digest: str
    rank: int
    planned: dict = field(default_factory=dict)   # relative name -> the files it writes
    request: list | None = None  # what each extraction is asked, when not layer_ids: "ditf" and the ids


class _Records:
    """The index writer shared by the main thread (failures) and the writer thread (done records)."""

    def __init__(self, out, rank: int):
        self._writer = index.IndexWriter(out, rank)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        with self._lock:
            self._writer.append(record)

    def close(self) -> None:
        self._writer.close()


# ---- one process's share -------------------------------------------------------------------------------------
def _plan_batches(items: list, job: _Job, fail) -> list[list]:
    """Items per batch: the same target size within a batch (their latents must stack), at most batch_size each,
    in run order. With batch size 1 or a fixed size nothing is read here; otherwise each header is (an unreadable
    one fails its image now, with open_image's reason)."""
    if job.batch_size == 1 or job.size is not None or job.resize != "keep-aspect":
        return [items[i:i + job.batch_size] for i in range(0, len(items), job.batch_size)]
    from PIL import Image

    groups: dict[tuple, list] = defaultdict(list)
    for item in items:
        try:
            with Image.open(item[0].path) as im:
                key = target_size(im.width, im.height, job.native, job.resize)
        except (OSError, ValueError, Image.DecompressionBombError):
            try:
                open_image(item[0].path)
                reason = f"{echo(str(item[0].path))} is not a readable image"
            except ImageInputError as e:
                reason = str(e)
            fail(item, reason)
            continue
        groups[key].append(item)
    return [g[i:i + job.batch_size] for g in groups.values() for i in range(0, len(g), job.batch_size)]


def _hint_for(job: _Job, source: ImageSource, image):
    if job.hint is None:
        return None
    if isinstance(job.hint, CannyHints):
        from ..hints import canny_hint

        wh = (job.size[1], job.size[0]) if job.size else None
        return canny_hint(prepare(image, job.native, job.resize, wh), job.hint.low, job.hint.high)
    return job.hint.hint_for(source.relative)


def _decode(batch: list, job: _Job):
    """(items that decoded, their images, their hints, [(item, reason)] for those that did not)."""
    good, images, hints, bad = [], [], [], []
    for item in batch:
        try:
            image = open_image(item[0].path)
            hint = _hint_for(job, item[0], image)
        except ValueError as e:  # ImageInputError, or a hint name the hint folder refuses (safe_paths)
            bad.append((item, str(e)))
            continue
        good.append(item)
        images.append(image)
        hints.append(hint)
    return good, images, hints, bad


def _pixel_size(image, job: _Job) -> tuple[int, int]:
    """(height, width) the model sees for this image."""
    if job.size is not None:
        return tuple(job.size)
    w, h = target_size(image.width, image.height, job.native, job.resize)
    return h, w


def _save_item(job: _Job, records: _Records, item, row: int, features: list, image, seconds: float) -> int:
    """Every t's files of one image, then its record. A write that fails removes what this call wrote of the image
    (never a file that was there before it) and raises. Returns the number of files."""
    source, prompt = item
    planned = job.planned[source.relative]
    before = {f for f in planned if (job.out / f).exists()}  # empty: leftovers were cleared before the loop
    written: list[Path] = []
    try:
        for name, feats in zip(naming.entry_names(source.relative, job.timesteps), features):
            meta = dict(feats.meta, prompt=[prompt], **size_meta(image.height, image.width, "input_"))
            one = Features({k: v[row:row + 1] for k, v in feats.tensors.items()}, meta)
            entry = PurePosixPath(name)
            written += save_features(one, job.out / entry.parent, [entry.name], job.fmt, job.layout)
        records.append(index.done_record(source.relative, source.path, written, job.out, settings=job.digest,
                                         t=job.timesteps, seed=job.seed, prompt=prompt, rank=job.rank,
                                         seconds=seconds))
    except BaseException:
        index.remove_leftovers(job.out, [f for f in planned if f not in before])
        raise
    return len(written)


def _save_batch(job: _Job, records: _Records, items, features, images, seconds) -> tuple[int, int]:
    files = 0
    for row, (item, image) in enumerate(zip(items, images)):
        files += _save_item(job, records, item, row, features, image, seconds / len(items))
    return len(items), files


def _conditioning(model, job: _Job, prompts: list[str], hints: list, hw, encoded: dict):
    from ..prompts import encode_prompt

    if len(set(prompts)) == 1:
        if prompts[0] not in encoded:  # a prompt is encoded once per run, not once per batch
            encoded[prompts[0]] = encode_prompt(model, prompts[0])
        cond = encoded[prompts[0]]
    else:
        cond = encode_prompt(model, prompts)
    if job.controlnets:
        from ..hints import attach_hints

        cond = attach_hints(cond, job.controlnets, hints, hw,
                            resize="center-crop" if job.resize == "center-crop" else "stretch")
    return cond


def _stop_reason(out) -> str:
    try:
        text = index.stop_path(out).read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return f"another process stopped the run ({text})" if text else "another process stopped the run"


class _Share:
    """One process's part of a run (items not yet complete), counted into `stats`."""

    def __init__(self, model, job: _Job, stats: RunStats, show_progress: bool, world: int):
        self.model, self.job, self.stats = model, job, stats
        self.show_progress, self.world = show_progress, world
        self.records: _Records | None = None
        self.bar: Progress | None = None
        self.pending: list = []  # futures of batches handed to the writer thread

    def fail(self, item, reason: str) -> None:
        source = item[0]
        try:
            self.records.append(index.failed_record(source.relative, source.path, reason,
                                                    settings=self.job.digest, rank=self.job.rank))
        except OSError as e:  # the index itself cannot grow (a full disk): stop as for any write that fails
            if not self.stats.stopped:
                self.stop(f"the index could not be written ({e.__class__.__name__}: {e})")
        self.stats.failures.append([source.relative, os.path.abspath(source.path), reason])
        self.bar.advance(1, failed=1)
        if self.job.stop_on_error and not self.stats.stopped:
            self.stop(f"{STOP_ON_ERROR}: {source.relative} failed")

    def stop(self, reason: str) -> None:
        self.stats.stopped = reason
        index.request_stop(self.job.out, reason)  # the other processes stop before their next batch

    def run(self, items: list) -> None:
        self.records = _Records(self.job.out, self.job.rank)
        self.bar = Progress(len(items), self.job.rank, self.world, self.stats.skipped, enabled=self.show_progress)
        try:
            todo = []
            for item in items:
                if item[0].problem:
                    self.fail(item, item[0].problem)
                    if self.stats.stopped:
                        return
                else:
                    todo.append(item)
            for item in todo:  # what a killed attempt left of an image it did not finish
                index.remove_leftovers(self.job.out, self.job.planned[item[0].relative])
            batches = _plan_batches(todo, self.job, self.fail)
            if batches and not self.stats.stopped:
                self._loop(batches)
        finally:
            self.bar.close()
            self.records.close()
        if self.job.latent_cache is not None:
            self.stats.cache = {k: getattr(self.job.latent_cache, k, 0)
                                for k in ("hits", "misses", "corrupt", "write_errors")}

    def _collect(self, block: bool) -> None:
        """Results of finished writes. At most one batch waits for its write while the next is extracted: a writer
        slower than the model would otherwise keep every batch's features in memory."""
        while self.pending and (block or self.pending[0].done() or len(self.pending) > 1):
            future = self.pending.pop(0)
            try:
                images, files = future.result()
            except OSError as e:
                if not self.stats.stopped or self.stats.stopped.startswith("another process"):
                    self.stop(f"an output could not be written ({e.__class__.__name__}: {e})")
                continue
            self.stats.written += images
            self.stats.files += files

    def _loop(self, batches: list) -> None:
        from ..extraction import extract_timesteps
        from ..lora import lora_applied

        job, stats = self.job, self.stats
        encoded: dict = {}
        # LoRAs are merged once for the whole run (each extraction's own merge is then a no-op)
        with lora_applied(self.model), ThreadPoolExecutor(1, thread_name_prefix="df-decode") as decoder, \
                ThreadPoolExecutor(1, thread_name_prefix="df-save") as saver:
            try:
                upcoming = decoder.submit(_decode, batches[0], job)
                for k in range(len(batches)):
                    good, images, hints, bad = upcoming.result()
                    if k + 1 < len(batches):
                        upcoming = decoder.submit(_decode, batches[k + 1], job)
                    for item, reason in bad:
                        self.fail(item, reason)
                    self._collect(block=False)
                    if not stats.stopped and index.stop_requested(job.out):
                        stats.stopped = _stop_reason(job.out)
                    if stats.stopped:
                        break
                    if not good:
                        continue
                    start = time.perf_counter()
                    try:
                        cond = _conditioning(self.model, job, [p for _, p in good], hints,
                                             _pixel_size(images[0], job), encoded)
                        features = extract_timesteps(self.model, images, cond, job.request or job.layer_ids,
                                                     job.timesteps, job.seed, latent_cache=job.latent_cache,
                                                     resize=job.resize, size=job.size, target_side=job.target_side,
                                                     **job.extract_kw)
                    except (ImageInputError, FeatureMemoryError) as e:  # this batch's images cannot be done
                        for item in good:
                            self.fail(item, str(e))
                        if stats.stopped:
                            break
                        continue
                    seconds = time.perf_counter() - start
                    self.pending.append(saver.submit(_save_batch, job, self.records, good, features, images,
                                                     seconds))
                    del features
                    self.bar.advance(len(good))
                    self._collect(block=False)
            except KeyboardInterrupt as e:
                _interrupted(stats, job.out, e)
            finally:
                try:  # whatever ended the loop, writes already handed over finish (or fail cleanly) first
                    self._collect(block=True)
                except KeyboardInterrupt:  # a second Ctrl-C while the last write finishes
                    stats.interrupted = True


def _interrupted(stats: RunStats, out, e: KeyboardInterrupt) -> None:
    stats.interrupted = True
    index.request_stop(out, "interrupted (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)")


# ---- the whole run -------------------------------------------------------------------------------------------
def status_of(total: RunStats) -> int:
    if total.interrupted or (total.stopped and "interrupted" in total.stopped):
        return EXIT_INTERRUPTED
    if total.stopped and STOP_ON_ERROR not in total.stopped and "interrupted" not in total.stopped:
        return EXIT_STOPPED
    return EXIT_FAILED if total.failures else EXIT_OK


@contextmanager
def _summary_lock(out: Path):
    """Surviving processes add their counts to summary.json one at a time (flock on the index folder, POSIX)."""
    try:
        import fcntl
        fd = os.open(index.index_dir(out), os.O_RDONLY)
    except (ImportError, OSError):  # Windows, or no index folder: one process writes anyway
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_summary_ranks(path: Path, attempt: str) -> tuple[dict[int, RunStats], float]:
    """The per-process counts summary.json holds for this attempt ({} for another attempt's or none)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("attempt") != attempt:
            return {}, 0.0
        by_rank = {}
        for rank, counts in old["ranks"].items():
            rank = int(rank)
            failures = [[f["image"], f["source"], f["error"]] for f in old["failures"] if f.get("rank") == rank]
            damaged = [[d["image"], d["reason"]] for d in old["damaged"] if d.get("rank") == rank]
            by_rank[rank] = RunStats(**counts, failures=failures, damaged=damaged)
        return by_rank, float(old.get("seconds", 0.0))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}, 0.0


def _write_summary(out: Path, attempt: str, mine: dict[int, RunStats], seconds: float,
                   processes: int) -> tuple[RunStats, int]:
    """summary.json with the counts of `mine` ({rank: stats}) and those of other processes already in it for the
    same attempt. Returns the merged counts and how many processes they cover."""
    path = index.index_dir(out) / SUMMARY_FILE
    with _summary_lock(out):
        by_rank, earlier = _read_summary_ranks(path, attempt)
        by_rank.update(mine)
        ranks = sorted(by_rank)
        total = merge([by_rank[r] for r in ranks])
        seconds = max(seconds, earlier)
        lists = ("failures", "damaged")
        text = json.dumps({
            "status": status_of(total), "written": total.written, "files": total.files, "skipped": total.skipped,
            "failed": total.failed,
            "failures": [{"image": i, "source": s, "error": e, "rank": r} for r in ranks
                         for i, s, e in by_rank[r].failures],
            "damaged": [{"image": i, "reason": why, "rank": r} for r in ranks for i, why in by_rank[r].damaged],
            "unhashed": total.unhashed, "stopped": total.stopped, "interrupted": total.interrupted,
            "seconds": round(seconds, 3), "processes": processes, "reported": ranks,
            "latent_cache": total.cache or None, "time": index.now(), "attempt": attempt,
            "ranks": {str(r): {k: v for k, v in asdict(by_rank[r]).items() if k not in lists} for r in ranks}},
            indent=1)
        tmp = path.with_name(f"{index.TEMP_PREFIX}summary-{os.getpid()}{index.TEMP_SUFFIX}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)  # the latest attempt's summary replaces the previous one's
        except OSError:  # a full disk: the index is what counts, and the summary line still reaches the terminal
            tmp.unlink(missing_ok=True)
    return total, len(ranks)


def _flush_print(line: str) -> None:
    print(line, flush=True)


def extract_dataset(model, sources: list[ImageSource], out, layers, timesteps, seed: int = 0, *, prompts=None,
                    batch_size: int = 1, fmt: str = "safetensors", layout: str = "per-sample",
                    resize: str = "keep-aspect", size=None, target_side: int | None = None, ensemble: int = 1,
                    feature_resize: int = 1, dtype=None, vae_sample: bool = True, denoise_from: int | None = None,
                    denoise_steps: int = 1, controlnets=(), hint=None, latent_cache=None, resume: bool = False,
                    shift=None, guidance: float | None = None,
                    verify: bool = False, stop_on_error: bool = False, ranks: Ranks | None = None,
                    progress: bool = True, log=_flush_print) -> DatasetResult:
    """Extract every source at every t into `out`, with an index, resumable: the library face of the CLI's
    `extract`.

    sources: from sources.collect. prompts: one string for all, or a list with one per source. size: (height,
    width) or None. controlnets: [(ControlNet, strength)], with hint=CannyHints(low, high) or a hints.HintFolder.
    latent_cache: a latent_cache.LatentCache or None. shift / guidance: a flow family's (extraction.extract).
    verify (with resume): re-hash every output of the images done before, not only those whose size or mtime
    changed (index.py). ranks: distributed.from_env() under torchrun (default: one process). Refusals (other settings, a folder not ours, outputs that exist without
    resume, an input outside the run's naming root) raise before anything is written; everything after is counted
    in the result (see the module docstring for `status`). log: where the summary line and the failures go (the
    first process only, or each survivor when processes are gone; None: nowhere)."""
    from ...layer_catalog import resolve_taps
    from ..schedule import check_timesteps

    ranks = ranks or Ranks()
    out = Path(out)
    start = time.perf_counter()
    timesteps = check_timesteps(timesteps)
    check_format(fmt, layout)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if verify and not resume:
        raise ValueError("verify checks the outputs of a run being resumed: give it with resume (--resume --verify)")
    if denoise_from is not None and denoise_from <= max(timesteps):
        raise ValueError(f"denoise_from ({denoise_from}) must be above every t ({', '.join(map(str, timesteps))}): "
                         "it is the timestep the guided denoising starts from before capturing")
    if controlnets and hint is None:
        raise ValueError("ControlNets need hints: give --hint canny (hint=CannyHints()) or --hint DIR, a folder of "
                         "hint images named like the inputs")
    if hint is not None and not controlnets:
        raise ValueError("hints are given but no ControlNet to use them (--controlnet FILE[:STRENGTH])")
    if controlnets:
        from ..controlnet import check_compatible

        for controlnet, _strength in controlnets:  # another family's ControlNet: refused before anything runs
            check_compatible(controlnet, model)
    if isinstance(prompts, (list, tuple)):
        if len(prompts) != len(sources):
            raise ValueError(f"{len(prompts)} prompts for {len(sources)} images: give one prompt or one per image")
        prompt_list = list(prompts)
    else:
        prompt_list = [prompts or ""] * len(sources)
    layer_ids = [tap.id for tap in resolve_taps(layers, model.denoiser, model.family)]
    request = kept_request(layer_ids, names_preset(layers, DITF))  # the ids, still asking for DiTF's feature
    settings = {**output_folder.request_settings(
        timesteps=timesteps, seed=seed, size=size, resize=resize, fmt=fmt, layout=layout, ensemble=ensemble,
        feature_resize=feature_resize, feature_dtype=dtype, vae_sample=vae_sample, denoise_from=denoise_from,
        denoise_steps=denoise_steps, target_side=target_side, hint=hint, shift=shift, guidance=guidance),
        **output_folder.model_settings(model, request, controlnets)}
    digest = run_file.digest(settings)

    current_root = root_of(sources) if sources else None
    error, root, attempt = None, current_root, None
    if ranks.main:
        attempt = uuid.uuid4().hex  # marks this attempt's summary.json, so survivors add to it and not to an older
        try:
            root = output_folder.naming_root(out, current_root) if sources else None
            named = rebase(sources, root) if sources else []  # an input outside the naming root is refused here
            output_folder.prepare(out, settings, resume, naming.plan([s.relative for s in named], timesteps,
                                                                     layer_ids, fmt, layout)[0], root)
        except (ValueError, FileExistsError) as e:
            error = (type(e).__name__, str(e))
        except OSError as e:  # the run file could not be written (a full disk, a read-only folder)
            error = ("OSError", f"cannot start a run in {out}: {e.__class__.__name__}: {e}")
    # every process refuses together, with the first one's reason, and names its inputs from the same root
    error, root, attempt = ranks.broadcast((error, root, attempt))
    if error:
        raise (FileExistsError if error[0] == "FileExistsError" else ResumeError)(error[1])
    if sources:
        sources = rebase(sources, root)
    planned, problems = naming.plan([s.relative for s in sources], timesteps, layer_ids, fmt, layout)
    records = index.read_records(out)
    output_folder.check_prompts(out, records, {s.relative: p for s, p in zip(sources, prompt_list)}, digest)
    mine = ranks.share(list(zip(sources, prompt_list)))
    check = index.completion(out, digest, records, images={s.relative for s, _ in mine}, verify=verify)

    job = _Job(out=out, layer_ids=layer_ids, timesteps=timesteps, seed=seed, fmt=fmt, layout=layout, resize=resize,
               size=tuple(size) if size else None, target_side=target_side, native=target_side or model.native_size,
               batch_size=batch_size, extract_kw=dict(ensemble=ensemble, feature_resize=feature_resize, dtype=dtype,
                                                      vae_sample=vae_sample, denoise_from=denoise_from,
                                                      denoise_steps=denoise_steps, shift=shift, guidance=guidance),
               controlnets=list(controlnets), hint=hint, latent_cache=latent_cache, stop_on_error=stop_on_error,
               digest=digest, rank=ranks.rank, planned=planned, request=request)
    stats = RunStats(damaged=check.damaged, unhashed=check.unhashed)
    items = []
    for source, prompt in mine:
        if source.relative in check.done:
            stats.skipped += 1
        elif source.problem is None and source.relative in problems:
            items.append((ImageSource(source.path, source.relative, problems[source.relative]), prompt))
        else:
            items.append((source, prompt))
    lost = False  # another process is gone: the group can no longer gather the counts or meet at a barrier
    with sigterm_as_interrupt(keep_ignoring=ranks.world > 1) as sigterm:
        try:
            try:
                ranks.barrier()  # every process has read the index before any appends to it
                _Share(model, job, stats, progress, ranks.world).run(items)
            finally:  # from here on a SIGTERM must not cut the summary short (one that comes sooner is caught below)
                sigterm.armed = False
        except KeyboardInterrupt as e:
            _interrupted(stats, out, e)
        except GroupLost as e:
            lost = True
            stats.stopped = str(e)
            index.request_stop(out, stats.stopped)
        except OSError as e:  # the index part or a leftover could not be written or removed: stop, as for a full disk
            stats.stopped = f"the output folder could not be written ({e.__class__.__name__}: {e})"
            index.request_stop(out, stats.stopped)
        return _finish(out, ranks, stats, lost, attempt, start, log)


def _finish(out: Path, ranks: Ranks, stats: RunStats, lost: bool, attempt: str, start: float, log) -> DatasetResult:
    """Counts of every process gathered (or, when this one was interrupted or another is gone, this one's added to
    summary.json alone), the summary written and logged, and the group's last barrier."""
    # An interrupted process does not wait for the others (they may be gone too); the launcher ends the group.
    if not (stats.interrupted or lost):
        try:
            everyone = dict(enumerate(ranks.gather(stats)))
        except GroupLost as e:
            lost = True
            stats.stopped = stats.stopped or str(e)
    alone = stats.interrupted or lost
    if alone:
        everyone = {ranks.rank: stats}
    seconds = time.perf_counter() - start
    total, reported = merge([everyone[r] for r in sorted(everyone)]), len(everyone)
    if ranks.main or alone:
        total, reported = _write_summary(out, attempt, everyone, seconds, ranks.world)
    status = status_of(total)
    line = summary_line(total, seconds, out, ranks.world, reported)
    if (ranks.main or alone) and log is not None:
        log(line)
        for image, reason in total.damaged:
            log(f"  done again: {image}: {reason}")
        for image, _source, reason in total.failures:
            log(f"  failed: {image}: {reason}")
    if not alone:
        # A launcher ends every process when one exits non-zero: nobody leaves before the summary is written.
        try:
            ranks.barrier()
        except GroupLost:
            pass
    return DatasetResult(status, total, seconds, line)

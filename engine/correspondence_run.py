"""The correspondence benchmark: PCK@alpha of keypoint transfer on SPair-71k, PF-PASCAL or PF-WILLOW.

Every image of the pairs is extracted once by a dataset run (engine/dataset/runner.py) into OUT/features/, with its
index, latent cache and resume; then each pair's source keypoints are matched into the target
(engine/correspondence.py) and the result appended to OUT/df_index/ as one record per pair (distances of every
keypoint and the pair's two threshold bases), so a killed run resumes where it stopped and PCK at any alpha is
computed from the records. OUT/correspondence.json keeps the settings of the matching (written once);
OUT/results.json the table of the last attempt: per category, the mean over categories and over all keypoints.

PCK: a keypoint is correct when its match lies within alpha x max(width, height) of the target image (per image)
or alpha x the larger side of the target's box (per box). A category's PCK counts its keypoints over all its
pairs; `mean` averages the categories, `all` counts every keypoint once.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..layer_catalog.errors import echo
from .correspondence import describe, match_points
from .dataset import index
from .dataset.run_file import ResumeError
from .dataset.sources import ImageSource
from .features_io import load_features, write_atomic
from .pair_datasets import KeypointPair

TOOL = "diffusion_feature correspondence"
SETTINGS_FILE = "correspondence.json"
RESULTS_FILE = "results.json"
FEATURES = "features"


@dataclass
class BenchmarkResult:
    status: int  # 0: every pair scored; 1: some pairs could not be (their images failed; see `failed`)
    results: dict
    failed: list = field(default_factory=list)  # [pair name, reason]


def _sources(pairs: list[KeypointPair], root: Path) -> tuple[list[ImageSource], list[str]]:
    """Every image once, named relative to the dataset folder, with its prompt's category (its first pair's)."""
    seen: dict[Path, str] = {}
    for pair in pairs:
        for path in (pair.source, pair.target):
            seen.setdefault(path, pair.category)
    sources = [ImageSource(p, p.relative_to(root).as_posix()) for p in seen]
    return sources, list(seen.values())


def _settings(pairs_meta: dict, window: int, temperature: float) -> dict:
    """What a pair's record depends on (a limit only chooses pairs: a resume may score more or fewer)."""
    return {"tool": TOOL, **{k: v for k, v in pairs_meta.items() if k != "limit"}, "window": window,
            "temperature": temperature}


def _check_settings(out: Path, settings: dict, resume: bool) -> None:
    """Written once when the run starts; a resume with other matching settings is refused, naming them."""
    path = out / SETTINGS_FILE
    if path.exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a correspondence run; resume it with --resume or choose "
                                  "another --output")
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ResumeError(f"{path} is not readable; choose another --output") from None
        diff = [f"{k}: {json.dumps(old.get(k))} there, {json.dumps(settings.get(k))} now"
                for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            raise ResumeError(f"--resume: {out} was made with other settings ({'; '.join(diff)}); resume with the "
                              "same settings or choose another --output")
        return
    text = json.dumps(settings, indent=1, sort_keys=True)
    write_atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def pair_record(pair: KeypointPair, predicted: torch.Tensor, target_size: tuple[int, int]) -> dict:
    """A scored pair: each keypoint's distance (pixels of the target) and the two threshold bases."""
    truth = torch.tensor(pair.target_points, dtype=torch.float32)
    distances = (predicted.float().cpu() - truth).norm(dim=-1)
    x1, y1, x2, y2 = pair.target_box
    return {"image": pair.name, "category": pair.category, "distances": [round(d, 4) for d in distances.tolist()],
            "image_base": float(max(target_size)), "box_base": float(max(x2 - x1, y2 - y1)),
            "predicted": [[round(v, 2) for v in p] for p in predicted.tolist()]}


def pck_table(records: list[dict], alphas) -> dict:
    """PCK per category, their mean and over all keypoints, per image and per box, for each alpha."""
    def score(rows):
        out = {"pairs": len(rows), "points": sum(len(r["distances"]) for r in rows)}
        for alpha in alphas:
            for kind in ("image", "box"):
                hits = sum(d <= alpha * r[f"{kind}_base"] for r in rows for d in r["distances"])
                out[f"pck@{alpha:g}_{kind}"] = 100.0 * hits / out["points"] if out["points"] else math.nan
        return out

    categories = sorted({r["category"] for r in records})
    per = {c: score([r for r in records if r["category"] == c]) for c in categories}
    keys = [k for k in score([]) if k.startswith("pck@")]
    mean = {k: sum(per[c][k] for c in categories) / len(categories) if categories else math.nan for k in keys}
    return {"categories": per, "mean": mean, "all": score(records)}


def format_table(table: dict) -> str:
    keys = list(table["mean"])
    width = max([len("mean (categories)")] + [len(c) for c in table["categories"]])
    lines = [f"{'category':<{width}}  {'pairs':>6}  {'points':>7}  " + "  ".join(f"{k:>16}" for k in keys)]
    for name, row in table["categories"].items():
        lines.append(f"{name:<{width}}  {row['pairs']:>6}  {row['points']:>7}  "
                     + "  ".join(f"{row[k]:>16.2f}" for k in keys))
    lines.append(f"{'mean (categories)':<{width}}  {'':>6}  {'':>7}  "
                 + "  ".join(f"{table['mean'][k]:>16.2f}" for k in keys))
    row = table["all"]
    lines.append(f"{'all keypoints':<{width}}  {row['pairs']:>6}  {row['points']:>7}  "
                 + "  ".join(f"{row[k]:>16.2f}" for k in keys))
    return "\n".join(lines)


class _Descriptors:
    """The last few images' descriptors (pairs of one category share images), loaded from their feature files."""

    def __init__(self, files: dict[str, Path], device, size: int = 8):
        self.files, self.device, self.size = files, device, size
        self.cache: OrderedDict = OrderedDict()

    def __call__(self, relative: str):
        if relative not in self.cache:
            feats = load_features(self.files[relative])
            feats.tensors = {k: v.to(self.device) for k, v in feats.tensors.items()}
            self.cache[relative] = describe(feats)
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(relative)
        return self.cache[relative]


def run_benchmark(model, pairs: list[KeypointPair], root, out, layers, t: int, seed: int = 0, *, alphas=(0.1,),
                  window: int = 0, temperature: float = 0.02, prompt_template: str = "a photo of a {category}",
                  dataset: dict | None = None, resume: bool = False, log=print, **extract_kw) -> BenchmarkResult:
    """Score `pairs` (pair_datasets.read_pairs of the dataset folder `root`) with features of `layers` at t.

    extract_kw go to the dataset run (size, resize, target_side, ensemble, dtype, batch_size, latent_cache, ...).
    dataset: what to record of the dataset (layout, split, folder). Refusals (an output folder of another run or
    other settings without/with resume) raise before anything is extracted."""
    from .dataset.runner import extract_dataset

    root, out = Path(root).resolve(), Path(out)
    pairs = [KeypointPair(p.name, p.category, p.source.resolve(), p.target.resolve(), p.source_points,
                          p.target_points, p.target_box) for p in pairs]
    sources, categories = _sources(pairs, root)
    try:
        prompts = [prompt_template.format(category=c) for c in categories]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--prompt-template {echo(prompt_template)} cannot be filled: it may use {{category}} only "
                         f"({type(e).__name__}: {e})") from None
    _check_settings(out, _settings(dataset or {}, window, temperature), resume)
    extracted = extract_dataset(model, sources, out / FEATURES, layers, [t], seed, prompts=prompts, resume=resume,
                                log=log, **extract_kw)
    if extracted.status in (3, 130):  # stopped: what is extracted stays for --resume
        return BenchmarkResult(extracted.status, {}, [])
    files = {r["image"]: out / FEATURES / r["outputs"][0]["path"]
             for r in index.read_records(out / FEATURES) if r.get("status") == "done"}
    done = {r["image"]: r for r in index.read_records(out)}
    device = next(model.denoiser.parameters()).device
    descriptors = _Descriptors(files, device)  # a file holds exactly the run's layers
    failed = []
    writer = index.IndexWriter(out, 0)
    try:
        for pair in pairs:
            if pair.name in done:
                continue
            src, trg = (p.relative_to(root).as_posix() for p in (pair.source, pair.target))
            missing = [name for name in (src, trg) if name not in files]
            if missing:
                failed.append([pair.name, f"no features of {', '.join(missing)} (see {FEATURES}/df_index)"])
                continue
            da, db = descriptors(src), descriptors(trg)
            points = torch.tensor(pair.source_points).clamp_min(0)
            points = torch.minimum(points, torch.tensor([float(da.width), float(da.height)]))
            matched = match_points(da, db, points, window=window, temperature=temperature)
            record = pair_record(pair, matched.points[0], (db.width, db.height))
            writer.append(record)
            done[pair.name] = record
    finally:
        writer.close()
    records = [done[p.name] for p in pairs if p.name in done]
    meta = {"model": getattr(model, "source", None), "family": model.family, "layers": _layer_ids(model, layers),
            "t": t, "seed": seed, "ensemble": extract_kw.get("ensemble", 1), "size": extract_kw.get("size"),
            "resize": extract_kw.get("resize", "keep-aspect"), "target_side": extract_kw.get("target_side"),
            "prompt_template": prompt_template, "window": window, "temperature": temperature,
            "alphas": list(alphas), **(dataset or {})}
    results = {**meta, **pck_table(records, alphas), "pairs_scored": len(records), "pairs_failed": failed}
    _replace(out / RESULTS_FILE, json.dumps(results, indent=1, default=str))
    if log is not None:
        log(format_table(pck_table(records, alphas)))
        for name, reason in failed:
            log(f"  not scored: {name}: {reason}")
    return BenchmarkResult(1 if failed or extracted.status else 0, results, failed)


def _layer_ids(model, layers) -> list[str]:
    from ..layer_catalog import resolve_taps

    return [tap.id for tap in resolve_taps(layers, model.denoiser, model.family)]


def _replace(path: Path, text: str) -> None:
    """The run's own summary, replaced by each attempt (a temporary file renamed over it)."""
    tmp = path.with_name(f"{index.TEMP_PREFIX}{path.stem}-{os.getpid()}{index.TEMP_SUFFIX}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

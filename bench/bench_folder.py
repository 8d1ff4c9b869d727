"""Folder throughput of a dataset run (index, resume checks, bad-file handling) against the plain folder loop.

    python bench/bench_folder.py                                  # CPU: sd15 at 256 px, 6 images, 3 rounds
    python bench/bench_folder.py --size 512 --images 4 --rounds 2 --json bench/results_folder_512.json
    python bench/bench_folder.py --device cuda --dtype float16 --size 512 --images 32

Both variants run in this one process on the same model (the real SD1.5 architecture with random weights: timing
does not depend on the values) and the same JPEG files, alternated (plain, dataset, plain, dataset, ...) after one
warm-up each, each into a fresh output folder; medians are compared.

- plain: the loop a user would write with the library (`plain_loop` below): per image, open it, extract, save
  its features; the prompt encoded once, nothing in worker threads.
- dataset: engine/dataset/runner.extract_dataset, what `extract` runs now: the run file, the planned names and
  their collision check, the index read and each output's completeness check, decoding one batch ahead and
  writing one batch behind in worker threads, and one index record per image appended with fsync.

The target is dataset >= 0.95 x plain in images per second. On a shared machine wall-clock rounds differ by tens of
percent, so three estimates are reported: the ratio of the medians, the median of each round's ratio (a round's two
runs are adjacent and see about the same load) and the ratio of the fastest runs; the process's CPU time (every
thread) is reported beside the wall clock. For scale, the machinery's own costs are timed apart: one index record
appended with fsync, and a --resume over the finished folder (every image already complete: the index read and
every output stat'ed), per image.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _images(folder: Path, n: int, size: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / "in" / ("a" if i % 2 else "b") / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size * 3 // 4, size, 3), dtype=np.uint8)).save(path, quality=90)
        files.append(path)
    return sorted(files)


def plain_loop(model, files: list[Path], prompt: str, layers, out: Path, side: int) -> None:
    """The baseline: load, extract, save, one image after the other."""
    from diffusion_feature.engine.extraction import extract
    from diffusion_feature.engine.features_io import save_features
    from diffusion_feature.engine.images import open_image
    from diffusion_feature.engine.prompts import encode_prompt

    cond = encode_prompt(model, prompt)
    for path in files:
        features = extract(model, [open_image(path)], cond, layers, 50, 0, target_side=side)
        save_features(features, out, [path.stem])


def _record_append_seconds(folder: Path, n: int = 200) -> float:
    """Seconds to append one index record with fsync, the median of n."""
    from diffusion_feature.engine.dataset import index

    writer = index.IndexWriter(folder, 0)
    record = {"image": "city/img000.jpg", "source": str(folder / "in" / "city" / "img000.jpg"), "status": "done",
              "outputs": [{"path": "city/img000.safetensors", "bytes": 123456}], "t": [50], "seed": 0,
              "prompt": "a photo", "settings": "0123456789abcdef", "rank": 0, "seconds": 1.0, "time": "now"}
    times = []
    try:
        for _ in range(n):
            start = time.perf_counter()
            writer.append(record)
            times.append(time.perf_counter() - start)
    finally:
        writer.close()
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--size", type=int, default=256, help="images keep their aspect at about size x size pixels")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each variant, after one warm-up each")
    p.add_argument("--layers", default="practical")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusion_feature.engine.dataset.runner import extract_dataset
    from diffusion_feature.engine.dataset.sources import from_pattern
    from diffusion_feature.engine.loading import build_random

    model = build_random("sd15", args.dtype, args.device)
    work = Path(tempfile.mkdtemp(prefix="df-bench-folder-"))
    try:
        files = _images(work, args.images, args.size)
        sources = from_pattern(str(work / "in"))
        assert [s.path for s in sources] == files
        count = {"n": 0}

        def sync():
            if str(args.device).startswith("cuda"):
                torch.cuda.synchronize()

        def plain():
            count["n"] += 1
            plain_loop(model, files, "a photo", args.layers, work / f"plain{count['n']}", args.size)

        def dataset():
            count["n"] += 1
            result = extract_dataset(model, sources, work / f"dataset{count['n']}", args.layers, [50], 0,
                                     prompts="a photo", target_side=args.size, progress=False, log=None)
            assert result.status == 0 and result.stats.written == len(files), result.summary

        variants = {"plain": plain, "dataset": dataset}
        seconds: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        for name, fn in variants.items():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync()
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        finished = work / f"dataset{count['n']}"
        start = time.perf_counter()
        again = extract_dataset(model, sources, finished, args.layers, [50], 0, prompts="a photo",
                                target_side=args.size, resume=True, progress=False, log=None)
        resume_s = time.perf_counter() - start
        assert again.stats.skipped == len(files) and again.stats.written == 0
        append_s = _record_append_seconds(work / "records")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in seconds.items()}
    per_round = [p / d for p, d in zip(seconds["plain"], seconds["dataset"])]
    result = {
        "device": args.device, "dtype": args.dtype, "size": args.size, "images": args.images, "rounds": args.rounds,
        "layers": args.layers, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "seconds": seconds, "cpu_seconds": cpu, "median_s": med,
        "images_per_s": {k: args.images / v for k, v in med.items()},
        "dataset_vs_plain": med["plain"] / med["dataset"],
        "dataset_vs_plain_per_round": per_round,
        "dataset_vs_plain_median_of_rounds": statistics.median(per_round),
        "dataset_vs_plain_fastest": min(seconds["plain"]) / min(seconds["dataset"]),
        "dataset_vs_plain_cpu": statistics.median(cpu["plain"]) / statistics.median(cpu["dataset"]),
        "record_append_fsync_s": append_s,
        "resume_check_s_per_image": resume_s / args.images,
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"sd15 @{args.size}, {args.images} images, {args.device} {args.dtype}, {args.rounds} rounds: plain "
          f"{result['images_per_s']['plain']:.3f} img/s, dataset {result['images_per_s']['dataset']:.3f} img/s "
          f"(medians). dataset / plain (target >= 0.95): {result['dataset_vs_plain']:.3f} ratio of medians, "
          f"{result['dataset_vs_plain_median_of_rounds']:.3f} median of the rounds' ratios, "
          f"{result['dataset_vs_plain_fastest']:.3f} fastest runs, {result['dataset_vs_plain_cpu']:.3f} CPU time. "
          f"Per image: {append_s * 1000:.2f} ms to append its record (fsync), "
          f"{result['resume_check_s_per_image'] * 1000:.2f} ms to find it complete on --resume")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

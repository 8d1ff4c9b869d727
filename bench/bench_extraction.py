"""Extraction benchmarks, measured side by side in one process and reported as ratios.

    python bench/bench_extraction.py                       # CPU defaults: sd15 at 256 and 512, sdxl at 512
    python bench/bench_extraction.py --device cuda --dtype float16 --configs sd15@512,sdxl@1024 --batch 1,8

Full-size architectures with random weights (timing does not depend on the values). Each comparison alternates its
variants, repeats them, and reports medians; CUDA timings use CUDA events. It prints a table and writes JSON.

1. capture overhead: extraction hooks (practical preset, no early exit) vs a bare forward; also the real extraction
   (with early exit) vs the bare forward.
2. early exit: a down-level-only request vs a full forward.
3. attention maps: one self-map rebuilt from that module's q and k (every attention keeps its fused kernel), vs the
   reference's approach (every attention module swapped to diffusers' classic explicit-softmax AttnProcessor), vs
   the same extraction without maps.
4. memory: peak extra memory of an extraction over a bare forward, against the bytes of the features requested
   (CUDA: allocator peaks; CPU: peak RSS (VmHWM, reset after the model is built) of a fresh process per variant,
   with freed buffers returned to the OS at once so the peak follows live tensors; see LIVE_HEAP).
5. folder throughput: the CLI's dataset run (decode, VAE, denoiser, save, index) vs a bare loop (VAE + bare
   forward on pre-decoded images), images per second.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from diffusion_feature.layer_catalog import (FeatureCapture, dummy_inputs, get_family,  # noqa: E402
                                             meta_denoiser, preset_ids, resolve_taps)

DOWN_ONLY = {"sd15": "down-level1-repeat1-res-out", "sdxl": "down-level1-repeat1-res-out"}
ONE_MAP = {"sd15": "up-level3-repeat0-vit-block0-self-map", "sdxl": "up-level1-repeat0-vit-block0-self-map"}


def random_denoiser(family: str, device, dtype) -> torch.nn.Module:
    """The full architecture with random weights, built without the slow default initialisation."""
    model = meta_denoiser(family).to_empty(device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, b in model.named_buffers():
            b.copy_(torch.zeros_like(b))
    return model.to(dtype).eval()


class Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def alternate(variants: dict, repeats: int, timer: Timer) -> dict[str, float]:
    """Median seconds of each variant, run in turns (A B C A B C ...) after one warm-up each."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(timer(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def swap_all_processors(model):
    """The reference's way: when any map is asked for, every attention module's processor is replaced by diffusers'
    classic AttnProcessor with store calls added (explicit baddbmm scores, an out-of-place softmax, bmm). Here every
    module gets diffusers' own AttnProcessor and the asked map is still read by our q/k hooks (one extra q k^T on
    one module, against the reference's stores on every module: a wash)."""
    from diffusers.models.attention_processor import AttnProcessor

    originals = []
    for module in model.modules():
        if hasattr(module, "set_processor"):
            originals.append((module, module.processor))
            module.set_processor(AttnProcessor())
    return originals


def restore(originals):
    for module, processor in originals:
        module.set_processor(processor)


def bench_config(family: str, size: int, batch: int, device, dtype, repeats: int) -> dict:
    model = random_denoiser(family, device, dtype)
    inputs = dummy_inputs(model, size, size, batch=batch, text_tokens=get_family(family).text_tokens,
                          device=device, dtype=dtype, generator=torch.Generator().manual_seed(0))
    timer = Timer(device)
    practical = resolve_taps(preset_ids(family, "practical"), model, family)

    def bare():
        with torch.no_grad():
            model(**inputs)

    def capture(taps, early):
        def run():
            with torch.no_grad(), FeatureCapture(model, taps, early_exit=early) as cap:
                cap.run(**inputs)
        return run

    fam = "sdxl" if family in ("sdxl", "playground-v2") else "sd15"
    down = resolve_taps([DOWN_ONLY[fam]], model, family)
    with_map = resolve_taps(preset_ids(family, "practical") + [ONE_MAP[fam]], model, family)

    def swap_all():
        originals = swap_all_processors(model)
        try:
            capture(with_map, True)()
        finally:
            restore(originals)

    t = alternate({"bare": bare, "hooks": capture(practical, False), "extract": capture(practical, True),
                   "down_only": capture(down, True), "one_map": capture(with_map, True),
                   "swap_all": swap_all},
                  repeats, timer)
    row = {"family": family, "size": size, "batch": batch, "device": str(device), "dtype": str(dtype).split(".")[-1],
           "seconds": t,
           "capture_overhead": t["hooks"] / t["bare"] - 1, "extract_vs_bare": t["extract"] / t["bare"],
           "early_exit_ratio": t["down_only"] / t["bare"], "one_map_vs_no_map": t["one_map"] / t["extract"],
           "swap_all_vs_one_map": t["swap_all"] / t["one_map"],
           "images_per_s_bare": batch / t["bare"], "images_per_s_extract": batch / t["extract"]}
    if torch.device(device).type == "cuda":
        row["memory"] = cuda_memory(model, inputs, with_map)
    del model
    return row


def cuda_memory(model, inputs, taps) -> dict:
    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        bare = peak(lambda: model(**inputs))
        holder = {}

        def run():
            with FeatureCapture(model, taps, early_exit=True) as cap:
                cap.run(**inputs)
            holder["f"] = cap.features

        extract = peak(run)
    feature_bytes = sum(v.numel() * v.element_size() for v in holder["f"].values())
    return {"bare_peak": bare, "extract_peak": extract, "extra": extract - bare, "feature_bytes": feature_bytes,
            "extra_over_features": (extract - bare) / feature_bytes}


# ---- CPU memory: one fresh process per variant, peak RSS --------------------------------------------------------
MEMORY_CHILD = r"""
import gc, sys, json, torch
sys.path.insert(0, {bench!r})
from bench_extraction import random_denoiser, resolve_taps, preset_ids, ONE_MAP, FeatureCapture, dummy_inputs
family, size, variant = {family!r}, {size}, {variant!r}
torch.set_num_threads(2)
model = random_denoiser(family, "cpu", torch.float32)
inputs = dummy_inputs(model, size, size, batch=1, text_tokens=77, generator=torch.Generator().manual_seed(0))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: building the model peaked
base = status("VmRSS:")
features = {{}}
with torch.no_grad():
    if variant == "bare":
        model(**inputs)
    else:
        fam = "sdxl" if family in ("sdxl", "playground-v2") else "sd15"
        taps = resolve_taps(preset_ids(family, "practical") + [ONE_MAP[fam]], model, family)
        with FeatureCapture(model, taps, early_exit=True) as cap:
            cap.run(**inputs)
        features = cap.features
peak = status("VmHWM:")
print(json.dumps({{"base": base, "peak": peak, "feature_bytes": sum(v.numel() * v.element_size() for v in features.values())}}))
"""


# glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the heap, so RSS also counts memory that is
# free but not returned: tens of MiB that depend on the order of allocations, not on what is alive. With the
# threshold at 64 KiB every tensor buffer is its own mapping, returned when freed, and the peak RSS follows the
# live tensors as CUDA's allocator statistics do. `heap="default"` measures with glibc's defaults instead.
LIVE_HEAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def cpu_memory(family: str, size: int, heap: str = "live") -> dict:
    import os

    env = dict(os.environ, **(LIVE_HEAP if heap == "live" else {}))
    out = {}
    for variant in ("bare", "extract"):
        code = MEMORY_CHILD.format(bench=str(Path(__file__).parent), family=family, size=size, variant=variant)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    bare = out["bare"]["peak"] - out["bare"]["base"]
    extract = out["extract"]["peak"] - out["extract"]["base"]
    feature_bytes = out["extract"]["feature_bytes"]
    return {"family": family, "size": size, "heap": heap, "bare_peak": bare, "extract_peak": extract,
            "extra": extract - bare, "feature_bytes": feature_bytes,
            "extra_over_features": (extract - bare) / feature_bytes}


# ---- folder throughput ------------------------------------------------------------------------------------------
def folder_throughput(size: int, n_images: int, device, dtype, repeats: int) -> dict:
    import numpy as np
    from PIL import Image

    from diffusion_feature.engine.dataset.runner import extract_dataset
    from diffusion_feature.engine.dataset.sources import from_pattern
    from diffusion_feature.engine.extraction import encode_latents
    from diffusion_feature.engine.images import prepare, to_tensor
    from diffusion_feature.engine.loading import build_random

    model = build_random("sd15", dtype, device)
    folder = Path(tempfile.mkdtemp(prefix="df-bench-"))
    rng = np.random.default_rng(0)
    files = []
    for i in range(n_images):
        path = folder / "in" / f"img{i:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size * 3 // 4, size, 3), dtype=np.uint8)).save(path, quality=90)
        files.append(path)
    decoded = [prepare(Image.open(f).convert("RGB"), size) for f in files]
    from diffusion_feature.engine.prompts import encode_prompt

    cond = encode_prompt(model, "a photo")
    layers = preset_ids("sd15", "practical")
    text = cond.for_batch(1, model.device, model.dtype)

    def bare_loop():
        with torch.no_grad():
            for im in decoded:
                x0 = encode_latents(model.vae, to_tensor([im]), 0)
                model.denoiser(x0.to(model.dtype), torch.tensor([50], device=model.device), **text)

    runs = {"n": 0}
    sources = from_pattern(str(folder / "in"))

    def cli_loop():
        runs["n"] += 1
        result = extract_dataset(model, sources, folder / f"out{runs['n']}", layers, [50], 0, prompts="a photo",
                                 target_side=size, progress=False, log=None)
        assert result.status == 0, result.summary

    t = alternate({"bare_loop": bare_loop, "cli": cli_loop}, repeats, Timer(device))
    return {"size": size, "images": n_images, "seconds": t, "images_per_s_bare": n_images / t["bare_loop"],
            "images_per_s_cli": n_images / t["cli"], "cli_vs_bare": t["bare_loop"] / t["cli"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--configs", default="sd15@256,sd15@512,sdxl@512", help="family@size, comma separated")
    p.add_argument("--batch", default="1", help="batch sizes, comma separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--folder-images", type=int, default=6, help="images for the folder throughput (0: skip)")
    p.add_argument("--folder-size", type=int, default=256)
    p.add_argument("--memory", action="store_true", help="also measure CPU peak memory (one process per variant)")
    p.add_argument("--heap", default="live", choices=["live", "default"],
                   help="CPU memory: 'live' returns freed buffers to the OS at once so peak RSS follows live tensors "
                        "(default); 'default' keeps glibc's heap, which also counts freed blocks it retains")
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    result = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "configs": [], "memory": []}
    if torch.device(args.device).type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for config in args.configs.split(","):
        family, size = config.split("@")
        for batch in (int(b) for b in args.batch.split(",")):
            row = bench_config(family, int(size), batch, args.device, dtype, args.repeats)
            result["configs"].append(row)
            print(f"{family}@{size} b{batch}: bare {row['seconds']['bare']:.3f}s | capture overhead "
                  f"{row['capture_overhead']:+.1%} | extract/bare {row['extract_vs_bare']:.2f} | down-only/full "
                  f"{row['early_exit_ratio']:.2f} | one map/no map {row['one_map_vs_no_map']:.2f} | swap-all/one "
                  f"map {row['swap_all_vs_one_map']:.2f}", flush=True)
            if "memory" in row:
                m = row["memory"]
                print(f"    memory: extra {m['extra'] / 2**20:.0f} MiB for {m['feature_bytes'] / 2**20:.0f} MiB of "
                      f"features ({m['extra_over_features']:.2f}x)", flush=True)
        if args.memory and torch.device(args.device).type == "cpu":
            m = cpu_memory(family, int(size), args.heap)
            result["memory"].append(m)
            print(f"    memory: extra {m['extra'] / 2**20:.0f} MiB for {m['feature_bytes'] / 2**20:.0f} MiB of "
                  f"features ({m['extra_over_features']:.2f}x)", flush=True)
    if args.folder_images:
        f = folder_throughput(args.folder_size, args.folder_images, args.device, dtype, max(1, args.repeats - 1))
        result["folder"] = f
        print(f"folder of {f['images']} images at {f['size']}: bare loop {f['images_per_s_bare']:.2f} img/s | CLI "
              f"{f['images_per_s_cli']:.2f} img/s ({f['cli_vs_bare']:.0%} of bare)", flush=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

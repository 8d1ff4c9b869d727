"""Dataset-extraction benchmarks, measured side by side in one process and reported as ratios.

    python bench/bench_dataset.py                                   # CPU: sd15@512 and sdxl@512, 2 images
    python bench/bench_dataset.py --device cuda --dtype float16 --configs sd15@512,sdxl@1024 --images 8

Full-size architectures (denoiser and VAE) with random weights: timing does not depend on the values. The prompt is
a random conditioning of the family's shape, encoded once for every variant (as a folder run encodes each prompt
once), so text encoders are not built. Each repeat runs every variant in turn (A B C D A B C D ...) after one
warm-up extraction; medians are reported. Images go one at a time (batch 1, the CLI's default), at size x size.

1. several timesteps: `extract_timesteps` with 4 timesteps (the VAE encodes each image once, the denoiser runs
   per t) vs 4 separate `extract` runs, one per t (each encodes every image again).
2. latent cache: a run whose LatentCache already holds every image (a rerun with other layers, t or seeds) vs a
   cold run (empty cache: the VAE runs and the entries are written). Each run makes its own LatentCache, as each CLI
   run does, so both hash the VAE's weights once.
Also timed, to read the ratios: the VAE encoder alone (its share of a run bounds both savings).

On a CPU both the wall-clock time and the process's CPU time (time.process_time, all its threads) are recorded: on a
machine shared with other work the wall clock of one variant can double while another runs, the CPU time of a
single-threaded run (--threads 1) barely moves, so its ratios are the steadier ones. On CUDA, CUDA events.
The folder-throughput row (index and resume checks vs the plain loop) is measured by the folder runner's benchmark.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_extraction import Timer, random_denoiser  # noqa: E402

from diffusion_feature.engine.conditioning import Conditioning  # noqa: E402
from diffusion_feature.engine.extraction import extract, extract_timesteps, vae_posterior  # noqa: E402
from diffusion_feature.engine.images import prepare, to_tensor  # noqa: E402
from diffusion_feature.engine.latent_cache import LatentCache  # noqa: E402
from diffusion_feature.engine.model import FeatureModel  # noqa: E402
from diffusion_feature.layer_catalog import get_family, preset_ids  # noqa: E402

SAMPLES = ROOT.parent / "engine" / "data" / "samples"
TIMESTEPS = [25, 50, 100, 200]


def random_model(family: str, device, dtype) -> FeatureModel:
    """The family's denoiser and VAE at full size with random weights (PyTorch's default init for the VAE, whose
    GroupNorms keep activations in range), no text encoders (the conditioning is given)."""
    from diffusers import AutoencoderKL

    fam = get_family(family)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(fam.config("vae"))
    vae_dtype = torch.float32 if fam.vae_float32 else dtype  # SDXL's VAE overflows in float16, as in loading.py
    vae = vae.to(device=device, dtype=vae_dtype).eval()
    scheduler = fam.config("scheduler", "scheduler_config.json")
    return FeatureModel(family, random_denoiser(family, device, dtype), vae, [], [], scheduler,
                        source="random weights")


def random_conditioning(model: FeatureModel) -> Conditioning:
    """A prompt's conditioning of the family's shape: (1, 77, cross-attention width), SDXL's pooled embedding."""
    config = model.denoiser.config
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 77, config.cross_attention_dim, generator=g)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g)}
    return Conditioning(text, added_cond_kwargs=added, prompts=["a photo"])


def sample_images(n: int):
    from PIL import Image

    files = sorted(SAMPLES.glob("*.jpg"))
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(n)]


def bench_config(family: str, size: int, n_images: int, device, dtype, repeats: int) -> dict:
    model = random_model(family, device, dtype)
    cond = random_conditioning(model)
    layers = preset_ids(family, "practical")
    images = sample_images(n_images)
    kw = {"size": f"{size}x{size}", "resize": "stretch", "seed": 0}
    timer = Timer(device)
    work = Path(tempfile.mkdtemp(prefix="df-bench-dataset-"))
    warm_root = work / "warm"
    runs = {"n": 0}

    def separate():
        for t in TIMESTEPS:  # one run per t: every image encoded again
            for image in images:
                extract(model, [image], cond, layers, t=t, **kw)

    def one_pass():
        for image in images:
            extract_timesteps(model, [image], cond, layers, TIMESTEPS, **kw)

    def cold():
        runs["n"] += 1
        cache = LatentCache(work / f"cold{runs['n']}")
        for image in images:
            extract(model, [image], cond, layers, t=50, latent_cache=cache, **kw)
        assert cache.misses == len(images) and cache.hits == 0

    def warm():
        cache = LatentCache(warm_root)
        for image in images:
            extract(model, [image], cond, layers, t=50, latent_cache=cache, **kw)
        assert cache.hits == len(images) and cache.misses == 0

    def vae_only():
        with torch.no_grad():
            for image in images:
                vae_posterior(model.vae, to_tensor([prepare(image, size, "stretch", (size, size))]))

    try:
        filled = LatentCache(warm_root)  # the warm-up fills the warm cache
        for image in images:
            extract(model, [image], cond, layers, t=50, latent_cache=filled, **kw)
        variants = {"separate_4t": separate, "one_pass_4t": one_pass, "cold_cache": cold, "warm_cache": warm,
                    "vae_only": vae_only}
        times = {k: [] for k in variants}
        cpu_times = {k: [] for k in variants}
        for r in range(repeats):
            for name, fn in variants.items():
                cpu0 = time.process_time()
                times[name].append(timer(fn))
                cpu_times[name].append(time.process_time() - cpu0)
                print(f"  {family}@{size} repeat {r + 1}: {name} {times[name][-1]:.1f} s wall, "
                      f"{cpu_times[name][-1]:.1f} s CPU", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"family": family, "size": size, "images": n_images, "timesteps": TIMESTEPS, "layers": layers,
           "device": str(device), "dtype": str(dtype).split(".")[-1], "repeats": repeats,
           "all_seconds": times, "all_cpu_seconds": cpu_times}
    clocks = {"wall": times} if timer.cuda else {"wall": times, "cpu": cpu_times}
    for clock, samples in clocks.items():
        t = {k: statistics.median(v) for k, v in samples.items()}
        share = t["vae_only"] / t["cold_cache"]  # of one plain run over the images (the cache writes are a few kB)
        row[clock] = {"seconds": t, "one_pass_vs_separate": t["one_pass_4t"] / t["separate_4t"],
                      "warm_vs_cold": t["warm_cache"] / t["cold_cache"], "vae_share_of_a_run": share,
                      "bound_one_pass_vs_separate": _bound(share, len(TIMESTEPS)), "bound_warm_vs_cold": 1 - share}
    return row


def _bound(vae_share: float, n: int) -> float:
    """What one pass can at best give against n runs when the VAE is vae_share of a run: (v + n (1 - v)) / n."""
    return (vae_share + n * (1 - vae_share)) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--configs", default="sd15@512,sdxl@512", help="family@size, comma separated")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--json", default=str(ROOT / "results_dataset.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    result = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "threads": args.threads,
              "configs": []}
    if torch.device(args.device).type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for config in args.configs.split(","):
        family, size = config.split("@")
        row = bench_config(family, int(size), args.images, args.device, dtype, args.repeats)
        result["configs"].append(row)
        for clock in ("wall", "cpu"):
            if clock in row:
                c = row[clock]
                print(f"{family}@{size} ({clock} time): 4 t in one pass / 4 runs {c['one_pass_vs_separate']:.2f} "
                      f"(VAE share {c['vae_share_of_a_run']:.0%}: at best {c['bound_one_pass_vs_separate']:.2f}) | "
                      f"warm cache / cold {c['warm_vs_cold']:.2f} (at best {c['bound_warm_vs_cold']:.2f})",
                      flush=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")  # after each config: a partial run counts
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

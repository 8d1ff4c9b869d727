"""Native-path benchmark: what capture costs during ComfyUI's own sampling, measured in one process as ratios.

    python bench/bench_native.py                          # CPU: full-size SD1.5 UNet at 256 px, 10 steps, cfg 7
    python bench/bench_native.py --comfy 2024-03 --size 512 --steps 20

ComfyUI's model code is imported in-process from a source tree, as the native tests do (tests/native_comfy.py:
v0.3.64 from the shared tarball, 2024-03 from the prepared test ComfyUI). Variants, alternated and repeated, medians
reported:
- sampling: ComfyUI's comfy.sample.sample on the plain MODEL (the baseline), on a DFCaptureLayers clone with one
  layer captured at every step (cond branch), and with the practical preset at every 5th step (target <= 3 %);
- extraction: DFExtractNative's engine (native.extract.extract_native_latents, through ComfyUI's own model call)
  against DFExtractFeatures' (engine.extraction.extract_latents on the diffusers UNet), the practical preset at
  t=50 on the same latents (target <= 1.05x).
Random weights of the real architecture: timing does not depend on the values. Writes JSON beside the script.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

from bench_extraction import Timer, alternate  # noqa: E402

import native_comfy as nc  # noqa: E402
from diffusion_feature.engine.conditioning import Conditioning  # noqa: E402
from diffusion_feature.engine.extraction import extract_latents  # noqa: E402
from diffusion_feature.engine.loading import build_random  # noqa: E402
from diffusion_feature.native.comfy_model import capture_layers  # noqa: E402
from diffusion_feature.native.extract import extract_native_latents  # noqa: E402

SD15_FULL = dict(nc.SD15["comfy"], model_channels=320, channel_mult=[1, 2, 4, 4], context_dim=768, num_heads=8)


def sd15_patcher(ns):
    """A MODEL of ComfyUI's own SD15 model config with the full-size UNet (random weights)."""
    config = ns.supported_models.SD15(dict(SD15_FULL))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}).eval()
    cpu = torch.device("cpu")
    return ns.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def cpu_seconds(fn) -> float:
    """CPU seconds this process spent in fn: other processes on a shared machine barely move it (wall time they
    do), so small ratios such as a 3 % capture overhead stay readable."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", default="0.3.64", choices=nc.VERSIONS)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed seconds; cpu: this process's CPU seconds (steadier on a shared machine; use "
                        "with OMP_NUM_THREADS=1)")
    p.add_argument("--json", default=str(ROOT / "results_native.json"))
    args = p.parse_args(argv)
    ns = nc.use_comfy(args.comfy)
    model = sd15_patcher(ns)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    side = args.size // 8
    latent = torch.zeros(1, 4, side, side)
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))

    def sampler(m, keep=None):
        def run():
            out = ns.sample.sample(m, noise, args.steps, 7.0, "euler", "normal", positive, negative, latent,
                                   seed=0, disable_pbar=True)
            if keep is not None:  # what DFCollectFeatures does after the sampler
                keep.stacked()
            return out
        return run

    one, one_capture = capture_layers(model, "up-level1-repeat1-res-out", steps="all", branch="cond")
    practical, practical_capture = capture_layers(model, "practical", steps="every 5", branch="cond")
    variants = {
        "KSampler, plain MODEL": sampler(model),
        "KSampler, one layer every step": sampler(one, one_capture),
        "KSampler, practical preset every 5th step": sampler(practical, practical_capture),
    }
    df = build_random("sd15")
    ctx = positive[0][0]
    x0 = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))
    scale = model.model.latent_format.scale_factor
    variants["DFExtractFeatures engine (diffusers UNet)"] = lambda: extract_latents(
        df.denoiser, x0, Conditioning(ctx), "practical", 50, 0, df.alphas_cumprod, family="sd15")
    variants["DFExtractNative engine (ComfyUI MODEL)"] = lambda: extract_native_latents(
        model, [[ctx, {}]], x0 / scale, "practical", t=50, seed=0)
    times = alternate(variants, args.repeats, Timer("cpu") if args.clock == "wall" else cpu_seconds)
    base = times["KSampler, plain MODEL"]
    ratio = times["DFExtractNative engine (ComfyUI MODEL)"] / times["DFExtractFeatures engine (diffusers UNet)"]
    sampling = [k for k in times if k.startswith("KSampler")]
    result = {"comfy": args.comfy, "size": args.size, "steps": args.steps, "repeats": args.repeats, "clock": args.clock,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": times,
              "capture_overhead": {k: times[k] / base - 1.0 for k in sampling if k != "KSampler, plain MODEL"},
              "native_over_df_extraction": ratio}
    for k in sampling:
        print(f"{k:45s} {times[k]:7.2f} s  {times[k] / base - 1.0:+.1%}")
    print(f"{'DFExtractNative / DFExtractFeatures':45s} {ratio:7.3f}x")
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generation benchmark: what capture costs on top of diffusers' own pipeline, measured in one process as ratios.

    python bench/bench_generation.py                                  # CPU: sd15 at 256 px, 10 steps
    python bench/bench_generation.py --device cuda --dtype float16 --size 512 --steps 30

Variants, alternated and repeated, medians reported (CUDA timings with CUDA events):
1. pipeline: diffusers' StableDiffusionPipeline with the same components, seed and embeddings (the baseline);
2. generate, no capture: our loop with nothing attached (the target: no measurable cost over 1);
3. generate, one layer at every step (cond branch, offloaded to the CPU);
4. generate, the practical preset at every 5th step.
Full-size SD1.5 with random weights: timing does not depend on the values. Writes JSON beside the script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_extraction import Timer  # noqa: E402

from diffusion_feature.engine.generation import generate  # noqa: E402
from diffusion_feature.engine.loading import build_random  # noqa: E402
from diffusion_feature.engine.prompts import encode_prompt  # noqa: E402
from diffusion_feature.engine.samplers import make_scheduler  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "results_generation.json"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    from diffusers import StableDiffusionPipeline

    model = build_random("sd15", dtype=args.dtype, device=args.device)
    pos, neg = encode_prompt(model, "a red house by a lake"), encode_prompt(model, "blurry")
    pipe = StableDiffusionPipeline(unet=model.denoiser, vae=model.vae, text_encoder=model.text_encoders[0],
                                   tokenizer=model.tokenizers[0], scheduler=make_scheduler(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    common = dict(steps=args.steps, cfg=7.0, seed=0, width=args.size, height=args.size)
    variants = {
        "pipeline": lambda: pipe(prompt_embeds=pos.encoder_hidden_states,
                                 negative_prompt_embeds=neg.encoder_hidden_states, num_inference_steps=args.steps,
                                 guidance_scale=7.0, height=args.size, width=args.size,
                                 generator=torch.Generator().manual_seed(0), output_type="pt"),
        "generate, no capture": lambda: generate(model, pos, neg, **common),
        "generate, 1 layer every step": lambda: generate(model, pos, neg, layers=["up-level1-repeat1-res-out"],
                                                         capture_steps="all", **common),
        "generate, practical preset every 5th step": lambda: generate(model, pos, neg, layers="practical",
                                                                      capture_steps="every 5", **common),
    }
    timer = Timer(args.device)
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, fn in variants.items():
                times[k].append(timer(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["pipeline"]
    result = {"device": args.device, "dtype": args.dtype, "size": args.size, "steps": args.steps,
              "repeats": args.repeats, "when": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "seconds": med, "ratio_to_pipeline": {k: v / base for k, v in med.items()}}
    print(f"sd15 @ {args.size}px, {args.steps} steps, cfg 7, {args.device} {args.dtype}")
    for k, v in med.items():
        print(f"  {k:45s} {v:8.3f} s   x{v / base:.3f}")
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

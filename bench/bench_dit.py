"""Diffusion-transformer benchmark (Flux or Z-Image architecture): what capture costs during sampling, what early
exit saves, and (Flux) what one self-map weighs, measured in one process.

    python bench/bench_dit.py                                 # CPU: 512 px, 2 double + 4 single blocks, 4 steps
    python bench/bench_dit.py --device cuda --dtype bfloat16 --size 1024 --double 4 --single 8
    python bench/bench_dit.py --arch z-image --refiners 1 --layers 4   # Z-Image: 1 refiner pair + 4 joint layers

--arch z-image: diffusers' ZImageTransformer2DModel of Z-Image's released config (30 heads x 128 = 3840, SwiGLU
10240, QK-norm, Qwen3's 2560-wide caption) with few refiners and joint layers, sampled as ZImagePipeline calls it
(lists of per-sample latents, its timestep 1 - sigma, the velocity negated); captured: the first joint layer's image
`out`, the second's `in` and `norm-out`; early exit at the middle joint layer's input.

1. capture overhead: a flow-matching Euler loop over diffusers' FluxTransformer2DModel at Flux.1's full block width
   (24 heads x 128 = 3072, MLP 4x) but few blocks, bare vs capturing three full-width layers (a double block's
   image `out`, a single block's `in` and `norm-out`) at every step, on the run's device. Timed side by side in
   turns of bare, capture, bare again: the overhead is the median of the turns' capture / bare, shown beside the
   noise floor, the median of bare again / bare (a shared machine's slow spells hit a turn's runs alike); the bare
   runs keep the hooks attached but disabled.
2. early exit: one forward with a tap at the middle block's input (early exit) vs a full forward.
3. one Flux self-map at 1024 px: its size from the shipped catalog (heads x 4096 x 4096) and the peak memory of
   building it (the joint [text, image] scores, then the image columns), measured with a one-block model of Flux's
   24 heads (the map's size does not depend on the width).
Random weights: timing does not depend on the values. Writes JSON beside the script.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_extraction import Timer, alternate  # noqa: E402

from diffusion_feature.layer_catalog import FeatureCapture, family_shapes, taps_of  # noqa: E402
from diffusion_feature.layer_catalog.families import dummy_inputs  # noqa: E402

TEXT_TOKENS = 512  # Flux-dev's T5 length; Z-Image's longest caption (a prompt hands its own length)


def flux(double: int, single: int, heads: int = 24, head_dim: int = 128, device="cpu", dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                       attention_head_dim=head_dim, num_attention_heads=heads,
                                       joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                       axes_dims_rope=(16, 56, 56) if head_dim == 128 else (head_dim // 4,) * 2
                                       + (head_dim // 2,))
    return model.to(dtype).eval()


def sample(model, inputs: dict, steps: int, capture: FeatureCapture | None = None):
    """Flow-matching Euler from sigma 1 to 0, as a sampler calls the transformer (one call per step)."""
    x = inputs["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        kwargs = {**inputs, "hidden_states": x, "timestep": sigmas[i].expand(x.shape[0]).to(x)}
        v = (capture.run(**kwargs) if capture is not None else model(**kwargs)).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def z_image(refiners: int, layers: int, device="cpu", dtype=torch.float32):
    """Z-Image's transformer at its released width with `refiners` refiner pairs and `layers` joint layers."""
    from diffusion_feature.layer_catalog.families import get_family
    from diffusion_feature.layer_catalog.families.meta import denoiser_from_config

    torch.manual_seed(0)
    config = {**get_family("z-image").denoiser_config(), "n_refiner_layers": refiners, "n_layers": layers}
    return denoiser_from_config(config, device).to(dtype).eval()


def sample_z_image(model, inputs: dict, steps: int, capture: FeatureCapture | None = None):
    """Flow-matching Euler from sigma 1 to 0 as ZImagePipeline calls its transformer, through the family's own
    conversion (engine path: per-sample latents, timestep 1 - sigma, the negated output as the velocity)."""
    from diffusion_feature.layer_catalog.families import get_family

    fam = get_family("z-image")
    x = torch.stack(inputs["x"]).squeeze(2)
    cond = {"encoder_hidden_states": torch.stack(inputs["cap_feats"])}
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        kwargs = fam.network_inputs(model, x, float(sigmas[i]), cond, None)
        out = (capture.run(**kwargs) if capture is not None else model(**kwargs)).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * fam.network_output(out, None)
    return x


def paired(bare, capture, repeats: int, timer) -> tuple[dict, float, float]:
    """Median seconds of each, the capture's overhead as the median over repeats of capture / bare, and the noise
    floor: the same median of bare again / bare, from a second bare run in the same turn. Each turn runs bare,
    capture, bare again (every other turn reversed), after one warm-up each, so a slow spell of a shared machine
    hits a turn's runs alike; an overhead within the noise floor is no overhead this machine can show."""
    import statistics

    bare(), capture()
    times, ratios, floor = {"bare": [], "capture": [], "bare again": []}, [], []
    for i in range(repeats):
        order = [("bare", bare), ("capture", capture), ("bare again", bare)]
        got = {name: timer(fn) for name, fn in (order if i % 2 == 0 else order[::-1])}
        for name, seconds in got.items():
            times[name].append(seconds)
        ratios.append(got["capture"] / got["bare"])
        floor.append(got["bare again"] / got["bare"])
    return ({k: statistics.median(v) for k, v in times.items()}, statistics.median(ratios) - 1,
            statistics.median(floor) - 1)


def hook_share(capture: FeatureCapture, fn, device: str) -> float:
    """The share of one captured run's time spent inside the capture's own code (reading each tapped tensor and
    storing it: the copies, reshapes and dtype moves), timed around those calls: the capture's direct cost, which a
    shared machine's noise does not drown as it does the difference of two whole runs."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    spent = [0.0]

    def timed(method):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                sync()
                spent[0] += time.perf_counter() - t0
        return wrapper

    capture._read, capture._store = timed(capture._read), timed(capture._store)  # the hooks look them up per call
    try:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        total = time.perf_counter() - t0
    finally:
        del capture._read, capture._store
    return spent[0] / total


def off(capture: FeatureCapture, fn):
    """fn run with the capture's hooks attached but disabled: the bare baseline in the same alternation."""
    def run():
        capture.enabled = False
        try:
            return fn()
        finally:
            capture.enabled = True
    return run


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--arch", choices=("flux", "z-image"), default="flux")
    p.add_argument("--refiners", type=int, default=1, help="z-image: refiner pairs (noise + context)")
    p.add_argument("--layers", type=int, default=4, help="z-image: joint layers")
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="default: results_dit.json (flux), results_dit_z_image.json")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    timer = Timer(args.device)
    if args.arch == "z-image":
        if args.layers < 2:
            raise SystemExit("--layers: at least 2 joint layers (the captured layers are the first two)")
        model, run = z_image(args.refiners, args.layers, device=args.device, dtype=dtype), sample_z_image
        grid, blocks = None, args.layers  # the network shows its grid (its latents are its input)
        layers = ["vit-block0-out", "vit-block1-in", "vit-block1-norm-out"]
        arch = f"z-image architecture (width 3840, {args.refiners} refiner pairs + {args.layers} joint layers)"
    else:
        model, run = flux(args.double, args.single, device=args.device, dtype=dtype), sample
        grid, blocks = (args.size // 8, args.size // 8), args.double + args.single
        first_single = args.double
        layers = [f"vit-block{args.double - 1}-out", f"vit-block{first_single + 1}-in",
                  f"vit-block{first_single + 1}-norm-out"]
        arch = f"flux architecture (width 3072, {args.double} double + {args.single} single blocks)"
    inputs = dummy_inputs(model, args.size, args.size, text_tokens=args.text_tokens, generator=torch.Generator()
                          .manual_seed(0))

    with torch.no_grad():
        with FeatureCapture(model, taps_of(model, layers), token_grid=grid) as cap:
            times, overhead, floor = paired(off(cap, lambda: run(model, inputs, args.steps)),
                                            lambda: run(model, inputs, args.steps, cap), args.repeats, timer)
            share = hook_share(cap, lambda: run(model, inputs, args.steps, cap), args.device)
        middle = f"vit-block{blocks // 2}-in"
        with FeatureCapture(model, taps_of(model, [middle]), token_grid=grid, early_exit=True) as early:
            exits = alternate({"full forward": off(early, lambda: model(**inputs)),
                               f"early exit at {middle}": lambda: early.run(**inputs)}, args.repeats, timer)
    del model
    result = {"arch": args.arch, "device": args.device, "dtype": args.dtype, "size": args.size,
              "blocks": [args.refiners, args.layers] if args.arch == "z-image" else [args.double, args.single],
              "text_tokens": args.text_tokens, "steps": args.steps, "repeats": args.repeats, "layers": layers,
              "when": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "seconds": {**times, **exits},
              "capture_overhead": overhead, "noise_floor": floor, "time_in_capture_code": share,
              "capture_overhead_of_medians": times["capture"] / times["bare"] - 1,
              "early_exit_tap": middle, "early_exit_ratio": exits[f"early exit at {middle}"] / exits["full forward"]}
    print(f"{arch} @ {args.size}px, {args.text_tokens} text tokens, {args.steps} steps, {args.device} {args.dtype}")
    print(f"  capture overhead (3 full-width layers every step): {100 * result['capture_overhead']:+.1f} % "
          f"(bare against bare in the same turns: {100 * floor:+.1f} %); time inside the capture's own code: "
          f"{100 * share:.2f} % of the captured run")
    print(f"  early exit (tap at {middle}) / full forward: {result['early_exit_ratio']:.2f}")
    if args.arch == "flux":
        result["self_map_1024"] = flux_self_map()
    default = "results_dit.json" if args.arch == "flux" else "results_dit_z_image.json"
    Path(args.json or ROOT / default).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def flux_self_map() -> dict:
    """One self-map of Flux at 1024 px: its shape from the catalog, the peak memory of building it."""
    # 24 heads over 4096 image tokens and 512 text tokens
    shape = family_shapes("flux")["vit-block0-self-map"]
    map_bytes = 4 * shape[0] * shape[1] * shape[2]  # float32, as the maps are built here
    small = flux(1, 0, head_dim=8)
    small_inputs = dummy_inputs(small, 1024, 1024, text_tokens=TEXT_TOKENS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        small(**small_inputs)  # allocations of the bare forward first, so the peak below is the map's
        before = rss_peak_bytes()
        with FeatureCapture(small, taps_of(small, ["vit-block0-self-map"]), token_grid=(128, 128)) as cap:
            cap.run(**small_inputs)
            got = tuple(cap.features["vit-block0-self-map"].shape[1:])
        peak = rss_peak_bytes() - before

    print(f"  one self-map at 1024 px: {shape} = {map_bytes / 2**30:.2f} GiB float32; "
          f"peak memory while building it {peak / 2**30:.2f} GiB")
    return {"shape": shape, "measured_shape": list(got), "bytes_float32": map_bytes, "peak_rss_growth_bytes": peak}


if __name__ == "__main__":
    sys.exit(main())

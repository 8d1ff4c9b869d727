"""Matching throughput: pairs/s of keypoint matching (engine/correspondence.py) on features of the practical preset.

    python bench/bench_correspondence.py                       # CPU, sd15 practical at 512, 1 thread
    python bench/bench_correspondence.py --device cuda --family sdxl --size 1024

The features are random tensors of exactly the shapes the family's practical preset has at that size (read from
its layer catalog, recomputed on the meta device): matching costs the same whatever the values, so no model is
built. Extraction itself is not timed here (bench_dataset.py and bench_extraction.py measure it): a benchmark run
extracts each image once, and then matches every pair it takes part in.

Timed, medians over repeats after one warm-up:
- describe: one image's descriptors (every layer upsampled to the finest grid, normalised, concatenated);
- match 20 keypoints: one pair from two images' descriptors (what the correspondence CLI does per pair when both
  images are in its descriptor cache);
- pair from files: load both images' feature files, describe them and match (the CLI's per-pair cost on a miss);
- similarity map of one point, and mutual nearest neighbours of every cell (DFSimilarityMap, mutual_matches).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent.parent))

from diffusion_feature.engine.correspondence import describe, match_points, mutual_matches, similarity_map  # noqa: E402
from diffusion_feature.engine.features_io import Features, load_features, save_features  # noqa: E402
from diffusion_feature.layer_catalog import build_catalog, preset_ids  # noqa: E402


def practical_features(family: str, size: int, device, seed: int) -> Features:
    """Random features of the practical preset's shapes at size x size, one image."""
    shapes = {layer["id"]: layer["shape"] for layer in build_catalog(family, (size, size))["layers"]}
    g = torch.Generator().manual_seed(seed)
    tensors = {i: torch.randn(1, *shapes[i], generator=g).to(device) for i in preset_ids(family, "practical")}
    return Features(tensors, {"family": family, "width": size, "height": size, "input_width": size,
                              "input_height": size})


def timed(fn, repeats: int, device) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--keypoints", type=int, default=20)
    parser.add_argument("--output", default=str(ROOT / "results_correspondence.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    a, b = (practical_features(args.family, args.size, device, s) for s in (0, 1))
    da, db = describe(a), describe(b)
    g = torch.Generator().manual_seed(2)
    points = torch.rand(args.keypoints, 2, generator=g) * (args.size - 1)
    with tempfile.TemporaryDirectory() as tmp:
        files = save_features(Features({k: v.cpu() for k, v in a.tensors.items()}, a.meta), tmp, names=["a"])
        files += save_features(Features({k: v.cpu() for k, v in b.tensors.items()}, b.meta), tmp, names=["b"])

        def from_files():
            fa, fb = (load_features(f) for f in files)
            match_points(describe({k: v.to(device) for k, v in fa.tensors.items()}, size=(args.size, args.size)),
                         describe({k: v.to(device) for k, v in fb.tensors.items()}, size=(args.size, args.size)),
                         points)

        variants = {
            "describe": lambda: describe(a),
            f"match_{args.keypoints}_keypoints": lambda: match_points(da, db, points),
            "pair_from_files": from_files,
            "similarity_map": lambda: similarity_map(da, db, (100.0, 200.0)),
            "mutual_matches": lambda: mutual_matches(da, db),
        }
        seconds = {name: timed(fn, args.repeats, device) for name, fn in variants.items()}
    median = {name: statistics.median(v) for name, v in seconds.items()}
    result = {
        "what": "matching only, on random features of the practical preset's shapes (no model: the cost does not "
                "depend on the values); extraction is measured by bench_dataset.py / bench_extraction.py",
        "family": args.family, "size": args.size, "device": str(device), "threads": args.threads,
        "torch": torch.__version__, "layers": list(a.tensors), "descriptor": list(da.tensor.shape),
        "keypoints": args.keypoints, "repeats": args.repeats, "median_seconds": median,
        "pairs_per_second": {"descriptors_cached": 1 / median[f"match_{args.keypoints}_keypoints"],
                             "from_files": 1 / median["pair_from_files"]},
        "all_seconds": seconds,
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("descriptor", "median_seconds", "pairs_per_second")}, indent=1))


if __name__ == "__main__":
    main()

"""What the CLI commands do (argument parsing stays in cli.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..layer_catalog.errors import echo

DATA = Path(__file__).resolve().parent / "data"
SAMPLES = DATA / "samples"


def random_banner(family: str) -> str:
    """The loud label of a model of random weights on the command line."""
    import textwrap

    from .loading import random_weights_notice

    lines = textwrap.wrap(random_weights_notice(family), 74)
    return "\n".join(["!" * 78, *(f"!! {line}" for line in lines), "!" * 78])


def _load(args):
    """The model of --model (a path, or random:FAMILY; the demo's default is random:sd15), with --lora applied."""
    import warnings

    from ..layer_catalog.families import DEFAULT_FAMILY
    from .loading import RANDOM_PREFIX, RandomWeightsWarning, load_model, random_family

    spec = args.model if args.model is not None else RANDOM_PREFIX + (args.family or DEFAULT_FAMILY)
    family = random_family(spec)
    if family is not None:
        print(random_banner(family), file=sys.stderr)
    with warnings.catch_warnings():  # said by the banner above
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = load_model(spec, args.family, args.dtype, args.device, _components(getattr(args, "components", None)))
    for spec in getattr(args, "lora", None) or []:
        from .lora import load_lora, with_lora

        path, strength = _with_strength(spec, "--lora")
        model = with_lora(model, load_lora(path), strength, strength)
    return model


def _components(items):
    """--components: one diffusers folder, or NAME=FILE items (a dict by component name)."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ValueError(f"--components takes one diffusers folder or NAME=FILE items, got {echo(bad[0])}")
    return dict(item.split("=", 1) for item in items)


def _images_to_png(images: torch.Tensor, out: Path, names: list[str]) -> list[Path]:
    """ComfyUI-layout images (B, H, W, 3) in 0..1 as PNG files, atomically, never over existing files."""
    from .visualize import save_png

    paths = []
    for image, name in zip(images, names):
        rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        save_png(rgb, out / f"{name}.png")
        paths.append(out / f"{name}.png")
    return paths


def _step_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


def run_generate(args) -> int:
    from .features_io import row_label, save_features
    from .generation import generate, sampling_settings

    model = _load(args)
    steps = sampling_settings(model, args.steps, args.cfg)[0]  # the progress bar's length
    out = Path(args.output)
    stem = args.name
    height, width = (None, None)
    if args.size:
        from ..layer_catalog import parse_size

        height, width = parse_size(args.size)
    bar = _step_bar(steps, "generate")
    try:  # steps / cfg as given (None: the model's defaults, which generate records in the features' metadata)
        run = generate(model, args.prompt, args.negative, steps=args.steps, cfg=args.cfg, seed=args.seed,
                       width=width, height=height, batch=args.batch, scheduler=args.scheduler, layers=args.layers,
                       capture_steps=args.capture_steps if args.layers else "", capture_branch=args.capture_branch,
                       on_step=lambda i, n, latents, x0: bar.update(1), guidance=args.guidance)
    finally:
        bar.close()
    written = _images_to_png(run.images, out, [f"{stem}_{i:03d}" for i in range(run.images.shape[0])])
    if run.features is not None:
        names = [f"{stem}_{row_label(run.features, i)}_{r['image']:03d}"
                 for i, r in enumerate(run.features.meta["rows"])]
        written += save_features(run.features, out / "features", names)
    print(f"wrote {len(written)} files to {out}")
    return 0


def run_pnp(args) -> int:
    import json

    from .features_io import write_atomic
    from .inversion import invert
    from .pnp import translate

    model = _load(args)
    out = Path(args.output)
    stem = Path(args.image).stem
    bar = _step_bar(args.steps * 2 + args.steps, "invert + translate")
    try:
        inversion = invert(model, args.image, args.inversion_prompt, args.steps, size=args.size,
                           on_step=lambda i, n: bar.update(1))
        run = translate(model, inversion, args.prompts, cfg=args.cfg, feature_threshold=args.feature_threshold,
                        attention_threshold=args.attention_threshold, negative=args.negative,
                        negative_alpha=args.negative_alpha, negative_schedule=args.negative_schedule,
                        on_step=lambda i, n, latents: bar.update(1))
    finally:
        bar.close()
    names = [f"{stem}_{i:02d}_" + "".join(c if c.isalnum() else "_" for c in p)[:40] for i, p in
             enumerate(args.prompts)]
    written = _images_to_png(run.images, out, names)
    written += _images_to_png(inversion.reconstruction, out, [f"{stem}_reconstruction"])
    report = json.dumps({"image": str(args.image), "steps": args.steps, "prompts": args.prompts,
                         "reconstruction_error": inversion.error}, indent=1)
    written.append(write_atomic(out / f"{stem}_pnp.json", lambda p: Path(p).write_text(report)))
    print(f"reconstruction: PSNR {inversion.error['psnr']:.2f} dB; wrote {len(written)} files to {out}")
    return 0


def _prompts(args, n: int) -> list[str]:
    if args.prompt_file is None:
        return [args.prompt] * n
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {echo(str(path))} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line] or [""]
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise ValueError(f"prompt file {echo(str(path))} has {len(lines)} lines for {n} images: give one line for all "
                         "images or one per image")
    return lines


def _timesteps(text: str) -> list[int]:
    from .schedule import parse_timesteps

    try:
        return parse_timesteps(text)
    except ValueError as e:
        raise ValueError(f"--t {echo(text)}: {e} (each t must be an integer training timestep in 0..999; several are "
                         "given as 25,50,100)") from None


def _with_strength(spec: str, flag: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' -> (FILE, STRENGTH); a colon that is part of the path (C:\\...) stays in it."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    if not spec:
        raise ValueError(f"{flag} needs a file: {flag} FILE[:STRENGTH]")
    return spec, 1.0


def _hint(args):
    from .dataset.runner import CannyHints

    if args.hint is None:
        return None
    if args.hint == "canny":
        from .hints import canny_thresholds

        canny_thresholds(args.canny_low, args.canny_high)  # refused now, not at the first image
        return CannyHints(args.canny_low, args.canny_high)
    from .hints import HintFolder

    return HintFolder(args.hint)


def run_extract(args) -> int:
    """`extract`: a dataset run (engine/dataset/runner.py), one process or one of several under torchrun."""
    from ..layer_catalog import parse_size
    from .dataset import distributed, output_folder, runner, sources
    from .model import parse_dtype

    timesteps = _timesteps(args.t)
    size = parse_size(args.size) if args.size else None
    hint = _hint(args)
    if args.controlnet and hint is None:
        raise ValueError("--controlnet needs --hint canny (edges computed per image) or --hint DIR (a folder of hint "
                         "images named like the inputs)")
    if hint is not None and not args.controlnet:
        raise ValueError("--hint is given but no --controlnet FILE[:STRENGTH] to use it")
    if args.denoise_from is not None and args.denoise_from <= max(timesteps):
        raise ValueError(f"--denoise-from {args.denoise_from} must be above every --t ({args.t})")
    dtype = parse_dtype(args.feature_dtype) if args.feature_dtype else None
    from .flow import parse_shift

    common = dict(size=size, resize=args.resize, ensemble=args.ensemble, feature_resize=args.feature_resize,
                  vae_sample=not args.vae_mean, denoise_from=args.denoise_from, denoise_steps=args.denoise_steps,
                  hint=hint, shift=parse_shift(args.shift) if args.shift is not None else None,
                  guidance=args.guidance)
    request = output_folder.request_settings(timesteps=timesteps, seed=args.seed, fmt=args.format,
                                             layout=args.layout, feature_dtype=dtype, **common)
    items = sources.collect(args.input, args.input_list)
    prompts = _prompts(args, len(items))
    if args.verify and not args.resume:
        raise ValueError("--verify re-hashes the outputs of a run being resumed: give it with --resume")

    def known(old):  # the model settings these flags tell, so a refusal names their differences too
        return output_folder.known_model_settings(
            old, model=args.model, family=args.family, dtype=args.dtype, layers=args.layers,
            loras=[_with_strength(spec, "--lora") for spec in args.lora],
            controlnets=[_with_strength(spec, "--controlnet") for spec in args.controlnet])

    output_folder.precheck(args.output, request, args.resume, items, known)  # before minutes of model loading
    ranks = distributed.from_env()
    try:
        args.device = distributed.device_for(args.device, ranks)
        model = _load(args)
        controlnets = []
        if args.controlnet:
            from .controlnet import load_controlnet

            for spec in args.controlnet:
                path, strength = _with_strength(spec, "--controlnet")
                controlnets.append((load_controlnet(path, dtype=args.dtype, device=args.device), strength))
        cache = None
        if args.latent_cache:
            from .latent_cache import LatentCache

            cache = LatentCache(args.latent_cache)
        result = runner.extract_dataset(
            model, items, args.output, args.layers, timesteps, args.seed, prompts=prompts, batch_size=args.batch_size,
            fmt=args.format, layout=args.layout, dtype=dtype, controlnets=controlnets, latent_cache=cache,
            resume=args.resume, verify=args.verify, stop_on_error=args.stop_on_error, ranks=ranks, **common)
    finally:
        ranks.close()
    return result.status


def run_correspondence(args) -> int:
    """`correspondence`: the benchmark run of engine/correspondence_run.py on a dataset folder."""
    from ..layer_catalog import parse_size
    from .correspondence_run import run_benchmark
    from .model import parse_dtype
    from .pair_datasets import detect_layout, read_pairs

    try:
        alphas = [float(a) for a in args.alpha.split(",") if a.strip()]
    except ValueError:
        alphas = []
    if not alphas or not all(0 < a <= 1 for a in alphas):
        raise ValueError(f"--alpha {echo(args.alpha)}: give thresholds in (0, 1], e.g. 0.1 or 0.05,0.1,0.15")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    layout = args.layout or detect_layout(args.dataset)
    pairs = read_pairs(args.dataset, layout, args.split)[:args.limit]
    model = _load(args)
    cache = None
    if args.latent_cache:
        from .latent_cache import LatentCache

        cache = LatentCache(args.latent_cache)
    dataset = {"dataset": str(Path(args.dataset).resolve()), "layout": layout, "split": args.split,
               "limit": args.limit}
    result = run_benchmark(model, pairs, args.dataset, args.output, args.layers, args.t, args.seed, alphas=alphas,
                           window=args.window, temperature=args.temperature, prompt_template=args.prompt_template,
                           dataset=dataset, resume=args.resume, ensemble=args.ensemble,
                           size=parse_size(args.size) if args.size else None, resize=args.resize,
                           dtype=parse_dtype(args.feature_dtype) if args.feature_dtype else None,
                           batch_size=args.batch_size, latent_cache=cache)
    return result.status


def run_pca(args) -> int:
    from .features_io import image_size, is_map, load_features
    from .visualize import pca_rgb, save_png

    if is_map(args.layer):  # (heads, queries, keys) read as (C, H, W) would draw a meaningless image
        raise ValueError(f"--layer {echo(args.layer)} is an attention map (heads x queries x keys), not a spatial "
                         "feature, so pca does not draw it: show a self-map with self-attention PCA and a cross-map "
                         "as a heatmap (engine.visualize.self_attention_pca / attention_heatmap, the "
                         "DFSelfAttentionPCA / DFAttentionMap nodes); pca takes spatial layers (not -self-map or "
                         "-cross-map)")
    loaded = [load_features(f) for f in args.features]
    for path, feats in zip(args.features, loaded):
        if args.layer not in feats.tensors:
            raise ValueError(f"{path} has no layer {echo(args.layer)}; it holds: {', '.join(feats.tensors)}")
    tensors = [f.tensors[args.layer][0] for f in loaded]
    images = pca_rgb(tensors, joint=args.joint) if args.joint else [pca_rgb([x])[0] for x in tensors]
    out = Path(args.output)
    if len(images) == 1 and out.suffix.lower() == ".png":
        targets = [out]
    else:
        targets = [out / f"{Path(p).stem}_{args.layer}.png" for p in args.features]
    for rgb, target, feats in zip(images, targets, loaded):
        height, width = image_size(feats.meta) or rgb.shape[:2]
        size = (rgb.shape[1] * args.scale, rgb.shape[0] * args.scale) if args.scale else (width, height)
        save_png(rgb, target, size=size)
        print(f"wrote {target}")
    return 0


def _fresh_folder(base: Path) -> Path:
    if not base.exists() or not any(base.iterdir()):
        return base
    n = 1
    while (base.parent / f"{base.name}-{n}").exists():
        n += 1
    return base.parent / f"{base.name}-{n}"


def run_demo(args) -> int:
    """A dataset run of the bundled samples (the engine `extract` runs), then PCA images of every layer."""
    from ..layer_catalog import parse_size
    from .dataset import index, sources
    from .dataset.runner import extract_dataset
    from .features_io import image_size, load_features
    from .loading import RANDOM_SOURCE
    from .visualize import pca_rgb, save_png

    torch.manual_seed(0)
    out = _fresh_folder(Path(args.output))
    samples = sources.collect(str(SAMPLES))
    prompts = {"house": "a red house under the sun", "cat": "a black cat", "fruit": "fruit on a wooden table"}
    start = time.perf_counter()
    model = _load(args)
    print(f"model ready ({model.family}, {model.source}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    report: list[str] = []  # the run's summary and failures, shown only if something went wrong
    result = extract_dataset(model, samples, out, "practical", [50], 0, target_side=parse_size(args.side)[0],
                             prompts=[prompts.get(Path(s.relative).stem, "") for s in samples], log=report.append)
    if result.status != 0:
        print("\n".join(report), file=sys.stderr)
        return result.status
    saved = [out / o["path"] for r in index.read_records(out) if r["status"] == "done" for o in r["outputs"]]
    loaded = [load_features(p) for p in saved]
    for layer in loaded[0].tensors:
        images = pca_rgb([f.tensors[layer][0] for f in loaded], joint=True)
        for path, rgb, feats in zip(saved, images, loaded):
            height, width = image_size(feats.meta)  # PCA images are the size of the image the model saw
            save_png(rgb, out / "pca" / f"{path.stem}_{layer}.png", size=(width, height))
    print(f"wrote {len(saved)} feature files and {len(saved) * len(loaded[0].tensors)} PCA images to {out} in "
          f"{time.perf_counter() - start:.1f} s (the run's index: {index.index_dir(out).name}/)")
    if model.source == RANDOM_SOURCE:
        print("reminder: these features come from random weights (see the warning above)", file=sys.stderr)
    return 0

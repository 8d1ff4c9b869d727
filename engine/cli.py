"""Command line: `python -m diffusion_feature <command>`.

    layers   every layer id of a family with its per-sample shape
    extract  features of a folder of images, saved as safetensors or npy
    generate images from a prompt, with layers captured at chosen steps
    pnp      Plug-and-Play: invert an image and translate it to new prompts
    pca      PCA images of one layer of saved features
    correspondence  PCK of keypoint matching on SPair-71k, PF-PASCAL or PF-WILLOW
    demo     the offline demo: extraction + PCA on the bundled sample images
"""
from __future__ import annotations

import argparse
import json
import sys

from ..layer_catalog import FAMILIES, build_catalog, get_family, load_catalog, parse_size
from ..layer_catalog.families import DEFAULT_FAMILY


def _layers(args) -> int:
    fam = get_family(args.family)
    if args.size is None:
        catalog = load_catalog(args.family)
    else:
        catalog = build_catalog(args.family, parse_size(args.size))  # meta device: seconds, no weights
    layers = [{"id": layer["id"], "shape": layer["shape"]} for layer in catalog["layers"]]
    if args.json:
        json.dump(layers, sys.stdout, indent=None)
        sys.stdout.write("\n")
        return 0
    h, w = catalog["size"]
    print(f"# {fam.name}: {fam.description}; {len(layers)} layer ids; per-sample shapes at {w}x{h} (WxH)")
    print("# spatial taps: C x H x W; attention maps: heads x queries x keys")
    width = max(len(layer["id"]) for layer in layers)
    for layer in layers:
        print(f"{layer['id']:<{width}}  {' x '.join(str(d) for d in layer['shape'])}")
    return 0


def _command(name: str):
    """The `run_<name>` of commands.py, imported when the command runs (torch loads only for commands that need it)."""
    def run(args) -> int:
        from . import commands

        return getattr(commands, f"run_{name}")(args)
    return run


def _add_model_args(p, required: bool) -> None:
    import torch

    p.add_argument("--model", required=required, default=None, metavar="PATH|random:FAMILY",
                   help="a diffusers folder or a single-file checkpoint (.safetensors; .ckpt/.pt read with "
                        f"weights_only=True), or random:FAMILY (e.g. random:{DEFAULT_FAMILY}) for random weights of "
                        "the family's real architecture, to try everything without a checkpoint (its features mean "
                        "nothing)" + ("" if required else f"; default: random:{DEFAULT_FAMILY}"))
    p.add_argument("--family", choices=list(FAMILIES), default=None, help="model family (default: detected)")
    p.add_argument("--components", nargs="+", default=None, metavar="FOLDER|NAME=FILE",
                   help="for a single-file transformer (Flux, SD3): the diffusers folder of its text encoders, "
                        "tokenizers and VAE, or their files: Flux vae=ae.safetensors text_encoder=clip_l.safetensors "
                        "text_encoder_2=t5xxl.safetensors; SD3 vae=FILE text_encoder=clip_l.safetensors "
                        "text_encoder_2=clip_g.safetensors [text_encoder_3=t5xxl.safetensors]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device: cpu, cuda, cuda:N, mps "
                                                                          "(default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default float32; float16 on a GPU halves memory)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA (kohya or diffusers/peft) to the denoiser and text encoders; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusion_feature",
                                     description="Diffusion features: layer catalog and extraction.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layers", help="list every layer id of a family with its shape",
                       description="Every legal layer id of a family with its per-sample shape (from the shipped "
                                   "catalog at the family's native size, or recomputed for --size on the meta "
                                   "device, without weights).")
    p.add_argument("--family", required=True, choices=list(FAMILIES), help="model family")
    p.add_argument("--size", default=None, help="image size N or WxH in pixels (multiples of 8); "
                                                 "default: the family's native size")
    p.add_argument("--json", action="store_true", help="print a JSON list of {\"id\", \"shape\"} objects")
    p.set_defaults(func=_layers)

    p = sub.add_parser("extract", help="extract features of image files and save them",
                       description="Extract features at training timesteps t (x_t = sqrt(abar_t) x0 + "
                                   "sqrt(1 - abar_t) eps, one conditional forward) and save one entry per image and "
                                   "t, with an index of the run in OUTPUT/df_index/ (one record per image). A bad "
                                   "image is skipped with its reason and the run goes on; --resume continues a run "
                                   "that was stopped or killed. Several processes: torchrun --nproc-per-node N -m "
                                   "diffusion_feature extract ... (or accelerate launch) splits the images.",
                       epilog="exit status: 0 every image written (or already complete); 1 some images failed "
                              "(every other one written); 2 refused before starting (bad flags, other settings "
                              "than the run being resumed, outputs that exist, an input outside the run's naming "
                              "root); 3 stopped because an output could not be written (e.g. a full disk: --resume "
                              "completes it) or another process of the run died; 130 interrupted (Ctrl-C, "
                              "SIGTERM)")
    _add_model_args(p, required=True)
    p.add_argument("--layers", required=True, help="ids (comma separated), a preset (practical, legacy, full) "
                                                   "or a JSON file {\"id\": true, ...}")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a folder of images (searched recursively), a glob pattern (quote it; ** "
                                        "recurses) or one image; only files with an image extension are taken "
                                        "from a folder or glob")
    source.add_argument("--input-list", metavar="FILE", help="a text file with one image path per line (relative "
                                                              "paths are read from the file's folder)")
    p.add_argument("--output", required=True, help="output folder: features mirror the inputs' relative paths "
                                                    "(in/city/a.png -> OUTPUT/city/a.safetensors); existing "
                                                    "features are never overwritten")
    p.add_argument("--t", default="50", metavar="T[,T...]",
                   help="training timestep(s) 0..999, e.g. 50 or 25,50,100: the VAE encodes each image once and the "
                        "denoiser runs once per t; with several t, names carry it (a_t025) (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE sample and the noise (default 0)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="one prompt for every image (default: empty)")
    prompt.add_argument("--prompt-file", default=None,
                        help="a text file: one line is the prompt for every image, or one line per image in run "
                             "order (sorted relative paths; the list's order with --input-list)")
    p.add_argument("--size", default=None, help="force every image to N or WxH pixels (default: keep the aspect "
                                                "ratio at the model's native area, sides multiples of 64)")
    p.add_argument("--resize", default="keep-aspect", choices=["keep-aspect", "stretch", "center-crop"],
                   help="resize policy when --size is not given")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (same size only)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "npy"])
    p.add_argument("--layout", default="per-sample", choices=["per-sample", "per-layer", "aggregate"])
    p.add_argument("--ensemble", type=int, default=1, help="average over N noise draws (default 1)")
    p.add_argument("--shift", default=None, metavar="S|resolution",
                   help="flow families (Flux, SD3): shift sigma = t/1000 to s*sigma/(1+(s-1)*sigma), or by the "
                        "image's size as Flux's sampler does ('resolution'); default none (recorded in the metadata)")
    p.add_argument("--guidance", type=float, default=None,
                   help="flow families with a guidance embedding (Flux-dev): its input (default the family's, 3.5)")
    p.add_argument("--feature-resize", type=int, default=1, help="average-pool spatial features by this factor")
    p.add_argument("--feature-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved features (default: the model's)")
    p.add_argument("--vae-mean", action="store_true", help="use the VAE posterior mean instead of a sample")
    p.add_argument("--denoise-from", type=int, default=None, metavar="T0",
                   help="noise to T0 (> every t) instead and take --denoise-steps DDIM steps down to t before "
                        "capturing")
    p.add_argument("--denoise-steps", type=int, default=1, help="DDIM steps for --denoise-from (default 1)")
    p.add_argument("--latent-cache", default=None, metavar="DIR",
                   help="keep each image's VAE posterior in DIR (keyed by the pixels entering the VAE and the VAE's "
                        "weights), so later runs with other layers, t or seeds skip the VAE; features are "
                        "bit-identical to a run without it")
    p.add_argument("--controlnet", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="guide every forward with a ControlNet (a file or diffusers folder; strength default 1); "
                        "repeatable; needs --hint")
    p.add_argument("--hint", default=None, metavar="canny|DIR",
                   help="the ControlNets' hint per image: canny (edges of the image as the model sees it, "
                        "kornia.filters.canny) or a folder of hint images with the inputs' relative names")
    p.add_argument("--canny-low", type=float, default=100, help="canny low threshold, OpenCV's 0..255 gradient "
                                                                "scale (default 100, the content-shift recipe)")
    p.add_argument("--canny-high", type=float, default=200, help="canny high threshold (default 200)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in an existing output folder: images already complete with the same "
                        "settings are skipped, the rest done; other settings are refused")
    p.add_argument("--verify", action="store_true",
                   help="with --resume: re-hash every output done before against its recorded sha256 (default: only "
                        "those whose size or mtime changed) and do again the images whose outputs changed")
    p.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first image that fails (default: record it and go on)")
    p.set_defaults(func=_command("extract"))

    p = sub.add_parser("generate", help="generate images, capturing layers at chosen steps",
                       description="Text-to-image with diffusers' sampling loop (the same seed gives the same image "
                                   "as the diffusers pipeline), capturing --layers at --capture-steps.")
    _add_model_args(p, required=True)
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--negative", default=None, help="negative prompt (default: the family's: empty / zeros)")
    p.add_argument("--output", required=True, help="output folder: PNG images, features/ for captured layers")
    p.add_argument("--name", default="gen", help="file name stem (default gen)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model's, its diffusers pipeline's: e.g. 50 for SD1.5, 8 for "
                        "Z-Image Turbo, 4 for Flux schnell)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale, <= 1: none (default: the model's, its diffusers "
                        "pipeline's: e.g. 7.5 for SD1.5, 1 for the guidance-distilled Flux dev, which takes "
                        "--guidance)")
    p.add_argument("--guidance", type=float, default=None,
                   help="flow families with a guidance embedding (Flux-dev): its input (default the family's, 3.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default="euler", help="euler, euler_ancestral, ddim, dpmpp_2m, "
                                                         "dpmpp_2m_karras, ddpm or checkpoint")
    p.add_argument("--size", default=None, help="N or WxH pixels (default: the family's native size)")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--layers", default=None, help="layer ids, a preset or a JSON file to capture (default: none)")
    p.add_argument("--capture-steps", default="every 5", help="'all', 'last', 'every K [from S]', '0, 10-12'")
    p.add_argument("--capture-branch", default="cond", choices=["cond", "uncond", "both"])
    p.set_defaults(func=_command("generate"))

    p = sub.add_parser("pnp", help="Plug-and-Play: invert an image and translate it to new prompts",
                       description="DDIM-invert --image, report the reconstruction error, and generate it anew for "
                                   "each --prompts with the source's residual features and self-attention injected "
                                   "(Tumanyan et al., CVPR 2023).")
    _add_model_args(p, required=True)
    p.add_argument("--image", required=True, help="the image to translate")
    p.add_argument("--prompts", required=True, nargs="+", help="target prompts, one image each")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--inversion-prompt", default="", help="prompt of the inversion (default empty)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--size", default=None, help="N or WxH pixels (default: keep the aspect at the native area)")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--feature-threshold", type=float, default=0.8)
    p.add_argument("--attention-threshold", type=float, default=0.5)
    p.add_argument("--negative", default="", help="negative prompt (default: the inversion prompt)")
    p.add_argument("--negative-alpha", type=float, default=1.0, help="1: no negative prompting; lower: stronger")
    p.add_argument("--negative-schedule", default="linear", choices=["constant", "linear", "exp"])
    p.set_defaults(func=_command("pnp"))

    p = sub.add_parser("correspondence", help="PCK of keypoint matching on SPair-71k, PF-PASCAL or PF-WILLOW",
                       description="Semantic correspondence benchmark: extract every image of the pairs once (into "
                                   "OUTPUT/features, a dataset run), match each pair's source keypoints into the "
                                   "target by nearest neighbours of the features (layers upsampled to one grid and "
                                   "L2-normalised per layer) and report PCK@alpha per image and per box, per "
                                   "category, their mean and over all keypoints (a table, and OUTPUT/results.json). "
                                   "Nothing is downloaded: point --dataset at the dataset's folder.",
                       epilog="DIFT's zero-shot setting on SD2.1: --layers up-level1-upsampler-out --t 261 --ensemble "
                              "8 --size 768 --resize stretch. exit status: 0 every pair scored; 1 some pairs could "
                              "not be (their images failed); 2 refused before starting; 3 / 130 stopped or "
                              "interrupted during extraction (--resume continues)")
    _add_model_args(p, required=True)
    p.add_argument("--dataset", required=True, metavar="DIR", help="the dataset folder (SPair-71k/, PF-PASCAL/ or "
                                                                    "PF-WILLOW/ as distributed)")
    p.add_argument("--layout", default=None, choices=["spair", "pf-pascal", "pf-willow"],
                   help="the dataset's layout (default: detected from the folder)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="pairs to score (default test)")
    p.add_argument("--output", required=True, help="output folder: features/, the per-pair index, results.json")
    p.add_argument("--layers", required=True, help="ids (comma separated), a preset or a JSON file")
    p.add_argument("--t", type=int, default=261, help="training timestep 0..999 (default 261, DIFT's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE sample and the noise (default 0)")
    p.add_argument("--ensemble", type=int, default=1, help="average the features over N noise draws (DIFT: 8)")
    p.add_argument("--size", default=None, help="force every image to N or WxH pixels (default: keep the aspect "
                                                "ratio at the model's native area)")
    p.add_argument("--resize", default="keep-aspect", choices=["keep-aspect", "stretch"],
                   help="resize policy when --size is not given (keypoints stay in pixels of the original images)")
    p.add_argument("--prompt-template", default="a photo of a {category}",
                   help="each image's prompt, {category} filled in (default 'a photo of a {category}', DIFT's)")
    p.add_argument("--alpha", default="0.1", metavar="A[,A...]", help="PCK thresholds (default 0.1)")
    p.add_argument("--window", type=int, default=0, help="soft-argmax window in feature cells around the best "
                                                         "match (default 0: plain nearest neighbour)")
    p.add_argument("--temperature", type=float, default=0.02, help="soft-argmax temperature (default 0.02)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (same size only)")
    p.add_argument("--feature-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the cached features (default: the model's; float16 halves the disk used)")
    p.add_argument("--latent-cache", default=None, metavar="DIR", help="keep each image's VAE posterior in DIR")
    p.add_argument("--limit", type=int, default=None, help="score only the first N pairs (a quick look)")
    p.add_argument("--resume", action="store_true", help="continue a run in its output folder (same settings)")
    p.set_defaults(func=_command("correspondence"))

    p = sub.add_parser("pca", help="PCA images of one layer of saved features",
                       description="PCA of one spatial layer to RGB. With several files and --joint, one PCA for "
                                   "all of them, so colours compare across images.")
    p.add_argument("--features", required=True, nargs="+", help="saved .safetensors files (or npy .json)")
    p.add_argument("--layer", required=True, help="a spatial layer id present in the files")
    p.add_argument("--output", required=True, help="a .png path (one file) or a folder (several files)")
    p.add_argument("--joint", action="store_true", help="fit one PCA over all files")
    p.add_argument("--scale", type=int, default=0, help="upscale the feature grid by this factor (nearest); "
                                                       "default: the size of the image the features came from")
    p.set_defaults(func=_command("pca"))

    p = sub.add_parser("demo", help="offline demo on the bundled sample images",
                       description=f"Extract the practical preset of {DEFAULT_FAMILY} at t=50 from the bundled sample "
                                   "images, save safetensors and jointly fitted PCA images. Without --model it builds "
                                   f"random weights of the real {DEFAULT_FAMILY} architecture: the pipeline runs for "
                                   "real, but the features of random weights mean nothing.")
    _add_model_args(p, required=False)
    p.add_argument("--output", default="demo_output", help="output folder (default demo_output; a new numbered "
                                                           "folder is used when it exists)")
    p.add_argument("--side", default="256", help="images keep their aspect ratio at about side x side pixels "
                                                 "(default 256 for a quick CPU run; 512 is SD1.5's native size)")
    p.set_defaults(func=_command("demo"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: one clear sentence, no traceback
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:  # Ctrl-C before or after a run's loop (the loop itself stops cleanly, exit 130)
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0

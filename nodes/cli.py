"""Command line: `python -m diffusion_feature <command>`.

    layers --family F [--size N|WxH] [--json]   every layer id of a family with its per-sample shape
"""
from __future__ import annotations

import argparse
import json
import sys

from ..layer_catalog import FAMILIES, build_catalog, get_family, load_catalog, parse_size


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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear sentence, no traceback
        parser.exit(2, f"error: {e}\n")
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0

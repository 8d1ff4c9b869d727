"""Per-family catalogs: every layer id with its per-sample shape, and the presets.

The shipped JSON files (catalogs/<family>.json) are generated from the full-size architecture on the meta device:
no weights, no memory. `python -m diffusion_feature.layer_catalog.catalog` regenerates them; a test checks that
the shipped files equal a fresh regeneration.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .errors import echo
from .families import FAMILIES, dummy_inputs, get_family, meta_denoiser
from .grammar import DIT_REF_SUFFIXES
from .hooks import FeatureCapture
from .taps import enumerate_ids, taps_of

CATALOG_DIR = Path(__file__).resolve().parent / "catalogs"

PRESET_NAMES = ("practical", "legacy", "full")


def parse_size(size) -> tuple[int, int]:
    """A size as (height, width) from an int N (square), 'N', 'WxH', or a (height, width) pair."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    elif isinstance(size, int) or (isinstance(size, str) and size.strip().isdigit()):
        h = w = int(size)
    elif isinstance(size, str) and "x" in size.lower():
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"size {echo(size)} is not N or WxH (e.g. 512 or 768x512)") from None
    else:
        raise ValueError(f"size {echo(size)} is not N or WxH (e.g. 512 or 768x512)")
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ValueError(f"size {w}x{h} (WxH) must be positive multiples of 8 (the VAE's factor)")
    return h, w


def compute_shapes(model: torch.nn.Module, height: int, width: int, text_tokens: int = 77,
                   ids: list[str] | None = None) -> dict[str, list[int]]:
    """Ids of `model` (default: every id) with their per-sample shapes at height x width pixels, from one forward on
    the meta device."""
    was_meta = next(model.parameters()).device.type == "meta"
    if not was_meta:
        raise ValueError("compute_shapes runs on a meta-device model (use families.meta_denoiser or to('meta'))")
    ids = enumerate_ids(model) if ids is None else list(ids)
    grid = (height // 8, width // 8)  # the latent, for networks whose input does not show it
    with torch.no_grad(), FeatureCapture(model, taps_of(model, ids), token_grid=grid) as capture:
        capture.run(**dummy_inputs(model, height, width, text_tokens=text_tokens))
    return {i: list(capture.features[i].shape[1:]) for i in ids}


def build_catalog(family: str, size=None) -> dict:
    """A family's catalog computed now (at its native size, or at `size`)."""
    fam = get_family(family)
    height, width = parse_size(size if size is not None else fam.native_size)
    shapes = compute_shapes(meta_denoiser(family), height, width, fam.text_tokens)
    ids = list(shapes)
    presets = {name: list(v) for name, v in fam.presets.items()}
    presets["full"] = ids
    for name, members in presets.items():
        unknown = [m for m in members if m not in shapes]
        if unknown:  # a preset naming an id the architecture lacks is a bug in its family module
            raise AssertionError(f"preset {family}/{name} names unknown ids {unknown}")
    return {"family": family, "size": [height, width], "text_tokens": fam.text_tokens,
            "layers": [{"id": i, "shape": shapes[i]} for i in ids],
            "presets": {k: v for k, v in presets.items() if k != "full"}}


@lru_cache(maxsize=None)
def _load(family: str) -> dict:
    get_family(family)
    return json.loads((CATALOG_DIR / f"{family}.json").read_text())


def load_catalog(family: str) -> dict:
    """The shipped catalog of a family (a fresh copy; the cache stays untouched)."""
    return json.loads(json.dumps(_load(family)))


def reference_ids_note(family: str | None) -> str | None:
    """A line on the reference-image ids of a family whose models take reference images (Kontext, Edit), which no
    catalog lists (how many references a run has is the run's); None for other families."""
    fam = FAMILIES.get(family) if isinstance(family, str) else None
    if fam is None or not fam.reference_images:
        return None
    return (f"# reference images: vit-block{{B}}-ref{{I}}-{{{'|'.join(DIT_REF_SUFFIXES)}}} are block B's image ids on "
            "reference image I's tokens (I = 0 for the first), on its own grid; a run's references decide which exist")


def family_ids(family: str) -> list[str]:
    return [layer["id"] for layer in _load(family)["layers"]]


def family_shapes(family: str) -> dict[str, list[int]]:
    return {layer["id"]: layer["shape"] for layer in _load(family)["layers"]}


def preset_names(family: str) -> tuple[str, ...]:
    """The presets of a family: every family's (PRESET_NAMES) and its own (Flux's ditf)."""
    return PRESET_NAMES + tuple(p for p in _load(family)["presets"] if p not in PRESET_NAMES)


def preset_ids(family: str, preset: str) -> list[str]:
    if preset == "full":
        return family_ids(family)
    presets = _load(family)["presets"]
    if preset not in presets:
        raise ValueError(f"unknown preset {echo(preset)} for {family}; valid presets: "
                         f"{', '.join(preset_names(family))}")
    return list(presets[preset])


def _dump(catalog: dict) -> str:
    """JSON with one layer per line: readable, and diffs of a regeneration show exactly which ids changed."""
    head = {k: v for k, v in catalog.items() if k not in ("layers", "presets")}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(' "layers": [')
    lines += [f"  {json.dumps(layer)}," for layer in catalog["layers"]]
    lines[-1] = lines[-1].rstrip(",")
    lines.append(" ],")
    lines.append(' "presets": ' + json.dumps(catalog["presets"], indent=2).replace("\n", "\n ").rstrip())
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_catalogs(families=None) -> list[Path]:
    CATALOG_DIR.mkdir(exist_ok=True)
    written = []
    for family in families or FAMILIES:
        path = CATALOG_DIR / f"{family}.json"
        path.write_text(_dump(build_catalog(family)))
        written.append(path)
    _load.cache_clear()
    return written


if __name__ == "__main__":
    for p in write_catalogs():
        print(f"wrote {p} ({len(json.loads(p.read_text())['layers'])} ids)")

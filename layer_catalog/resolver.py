"""From what a user writes to a list of valid layer ids (and taps).

Accepted: one id; several ids separated by commas, spaces or new lines; a preset name (practical, legacy, full);
a path to a JSON file in the reference's format {"id": true, ...} (or a JSON list of ids); a Python list or dict
of the same. Presets and ids can be mixed ("practical, up-level0-upsampler-out"). Order is kept, duplicates dropped.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import torch

from .catalog import PRESET_NAMES, family_ids, preset_ids
from .families import FAMILIES, get_family
from .grammar import LayerIdSyntaxError, parse_id
from .taps import Tap, enumerate_ids, taps_of


class LayerIdError(ValueError):
    """An id that the family (or model) does not have. The message names the nearest valid ids."""


def nearest_ids(wrong: str, valid: list[str], n: int = 5) -> list[str]:
    """The valid ids spelled most like `wrong` (a typo, a level or repeat that the family lacks)."""
    return difflib.get_close_matches(wrong, valid, n=n, cutoff=0.0)


def _unknown_id_message(layer_id: str, valid: list[str], owner: str, family: str | None) -> str:
    others = [f for f in FAMILIES if f != family and layer_id in family_ids(f)]
    nearest = ", ".join(nearest_ids(layer_id, valid))
    if others:
        return (f"{layer_id!r} is a layer id of {', '.join(others)}, not of {owner}; "
                f"nearest {owner} ids: {nearest}")
    try:
        parse_id(layer_id)
        why = "does not exist in"
    except LayerIdSyntaxError:
        why = "is not a layer id of"
    return f"{layer_id!r} {why} {owner}; nearest valid ids: {nearest}"


def _split_spec(spec) -> list:
    """Flatten a spec into a list of items: ids, preset names, or already-parsed JSON objects."""
    if spec is None:
        raise LayerIdError("no layers given: pass ids, a preset (practical, legacy, full) or a JSON file")
    if isinstance(spec, dict):
        return [k for k, on in spec.items() if on]
    if isinstance(spec, (list, tuple)):
        items = []
        for s in spec:
            items.extend(_split_spec(s))
        return items
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith(".json")):
        return _split_spec(_read_json(Path(spec)))
    if isinstance(spec, str):
        return [s for s in re.split(r"[\s,;]+", spec) if s]
    raise LayerIdError(f"cannot read layers from a {type(spec).__name__}: pass ids, a preset or a JSON file")


def _read_json(path: Path):
    if not path.is_file():
        raise LayerIdError(f"layer file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerIdError(f"layer file {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(data, (dict, list)):
        raise LayerIdError(f"layer file {str(path)!r} must hold {{\"id\": true, ...}} or a list of ids")
    return data


def _expand(items: list, family: str | None) -> list[str]:
    out: list[str] = []
    for item in items:
        if item in PRESET_NAMES:
            if family is None:
                raise LayerIdError(f"preset {item!r} needs a known family; give the family or list the ids")
            members = preset_ids(family, item)
        else:
            members = [item]
        out.extend(m for m in members if m not in out)
    if not out:
        raise LayerIdError("the layer list is empty: pass ids, a preset (practical, legacy, full) or a JSON file")
    return out


def resolve_layers(spec, family: str) -> list[str]:
    """Valid ids of `family` for a spec; an unknown id raises LayerIdError naming the nearest valid ids."""
    get_family(family)
    ids = _expand(_split_spec(spec), family)
    valid = family_ids(family)
    valid_set = set(valid)
    for layer_id in ids:
        if layer_id not in valid_set:
            raise LayerIdError(_unknown_id_message(layer_id, valid, family, family))
    return ids


def resolve_taps(spec, model: torch.nn.Module, family: str | None = None) -> list[Tap]:
    """Taps of a loaded denoiser for a spec, checked against the model's own modules (custom depths included)."""
    valid = enumerate_ids(model)
    ids = _expand(_split_spec(spec), family)
    valid_set = set(valid)
    owner = f"this {family} model" if family else f"this {type(model).__name__}"
    for layer_id in ids:
        if layer_id not in valid_set:
            raise LayerIdError(_unknown_id_message(layer_id, valid, owner, family))
    return taps_of(model, ids)

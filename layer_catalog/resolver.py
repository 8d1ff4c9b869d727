"""From what a user writes to a list of valid layer ids (and taps).

Accepted: one id; several ids separated by commas, spaces or new lines; a preset name (practical, legacy, full, or
a family's own: flux's ditf);
a path to a JSON file in the reference's format {"id": true, ...} (or a JSON list of ids); a Python list or dict
of the same. Presets and ids can be mixed ("practical, up-level0-upsampler-out"). Order is kept, duplicates dropped.

Inside ComfyUI anyone may type a path into a widget, so the pack restricts layer files there
(`restrict_layer_files`): a file name is resolved by the host's opener (ComfyUI's input folder only), every entry
must be a layer id of the grammar, and errors name an entry by its position, never by its content.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

from .catalog import PRESET_NAMES, family_ids, preset_ids, preset_names
from .errors import DiffusionFeatureError, echo
from .families import FAMILIES, dit_layout, get_family, spoken
from .grammar import LayerIdSyntaxError, format_id, parse_id, reference_of
from .tap import Tap
from .taps import enumerate_ids, taps_of


class LayerIdError(DiffusionFeatureError, ValueError):
    """An id that the family (or model) does not have. The message names the nearest valid ids."""


MAX_LAYER_FILE_BYTES = 1 << 20  # a layer file listing every id of the largest catalog is ~25 KB
_layer_file_opener: Callable[[str], Path] | None = None


def restrict_layer_files(opener: Callable[[str], Path] | None) -> None:
    """Resolve layer file names with opener(name) -> Path (raising ValueError for a name it refuses) and keep
    their content out of error messages; None lifts the restriction (library and CLI use: the user's own files)."""
    global _layer_file_opener
    _layer_file_opener = opener


class _FileEntry(str):
    """An id read from a restricted layer file: errors name its position in the file, never its text."""

    def __new__(cls, text: str, file: str, index: int):
        entry = super().__new__(cls, text)
        entry.file, entry.index = file, index
        return entry


def nearest_ids(wrong: str, valid: list[str], n: int = 5) -> list[str]:
    """The valid ids spelled most like `wrong` (a typo, a level or repeat that the family lacks)."""
    return difflib.get_close_matches(wrong, valid, n=n, cutoff=0.0)


def _unknown_id_message(layer_id: str, valid: list[str], owner: str, family: str | None) -> str:
    if isinstance(layer_id, _FileEntry):
        return (f"entry {layer_id.index} of layer file {layer_id.file} is not a layer id of {owner} (DFShowLayers "
                "lists the model's ids)")
    nearest = ", ".join(nearest_ids(layer_id, valid))
    if family is not None and owner != family and layer_id in family_ids(family):
        # A checkpoint of another depth than the family's standard one (a shallow test UNet, a pruned model):
        # the id is right for the family, this model just does not have that module.
        return (f"{echo(layer_id)} is a {family} id that {owner} lacks (its denoiser has another depth than the "
                f"standard {family}); nearest ids of this model: {nearest}")
    holders = [f for f in FAMILIES if f != family and layer_id in preset_names(f)]
    if holders:  # a family's own preset (flux's ditf) asked of another family
        own = ", ".join(preset_names(family) if family in FAMILIES else PRESET_NAMES)
        return f"{echo(layer_id)} is a preset of {spoken(holders)} only, not of {owner} (its presets: {own})"
    others = [f for f in FAMILIES if f != family and layer_id in family_ids(f)]
    if others:
        return (f"{echo(layer_id)} is a layer id of {spoken(others)}, not of {owner}; "
                f"nearest {owner} ids: {nearest}")
    try:
        parse_id(layer_id)
        why = "does not exist in"
    except LayerIdSyntaxError:
        preset = difflib.get_close_matches(layer_id.lower(), PRESET_NAMES, n=1, cutoff=0.6)
        if preset:  # a misspelt preset ('practicle'): the nearest layer ids would only mislead
            return (f"{layer_id!r} is neither a layer id nor a preset of {owner}; did you mean the preset "
                    f"{preset[0]!r}? (presets: {', '.join(PRESET_NAMES)})")
        why = "is not a layer id of"
    return f"{echo(layer_id)} {why} {owner}; nearest valid ids: {nearest}"


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
        if _layer_file_opener is not None:
            return _read_restricted(str(spec).strip())
        return _split_spec(_read_json(Path(spec), echo(str(spec))))
    if isinstance(spec, str):
        return [s for s in re.split(r"[\s,;]+", spec) if s]
    raise LayerIdError(f"cannot read layers from a {type(spec).__name__}: pass ids, a preset or a JSON file")


def _read_json(path: Path, shown: str, detail: bool = True):
    """A layer file's JSON: {"id": true, ...} or a list. detail: the parser's message in the error (not for
    restricted files, whose content stays out of messages)."""
    if not path.is_file():
        raise LayerIdError(f"layer file {shown} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerIdError(f"layer file {shown} is not valid JSON" + (f" ({e})" if detail else "")) from None
    if not isinstance(data, (dict, list)):
        raise LayerIdError(f"layer file {shown} must hold {{\"id\": true, ...}} or a list of ids")
    return data


def _read_restricted(name: str) -> list[str]:
    """A layer file through the host's opener: only layer ids of the grammar, named in errors by position."""
    shown = echo(name)
    try:
        path = _layer_file_opener(name)
    except ValueError as e:
        raise LayerIdError(str(e)) from None
    if not path.is_file():
        raise LayerIdError(f"layer file {shown} is not in ComfyUI's input folder (upload it there)")
    if path.stat().st_size > MAX_LAYER_FILE_BYTES:
        raise LayerIdError(f"layer file {shown} is larger than {MAX_LAYER_FILE_BYTES // 1024} KiB; a layer file "
                           "lists ids only")
    data = _read_json(path, shown, detail=False)
    entries = [k for k, on in data.items() if on] if isinstance(data, dict) else data
    out = []
    for i, entry in enumerate(entries, start=1):
        if isinstance(entry, str) and entry in PRESET_NAMES:
            out.append(_FileEntry(entry, shown, i))
            continue
        try:
            if not isinstance(entry, str) or format_id(parse_id(entry)) != entry:
                raise LayerIdSyntaxError("")
        except LayerIdSyntaxError:
            raise LayerIdError(f"entry {i} of layer file {shown} is not a layer id (see the layer-id grammar in "
                               "the README, or DFShowLayers)") from None
        out.append(_FileEntry(entry, shown, i))
    return out


def _expand(items: list, family: str | None, model_ids: list[str] | None = None) -> list[str]:
    """Presets replaced by their ids, duplicates dropped, order kept. model_ids: the ids of a loaded model, which
    `full` means for it (a checkpoint of another depth than the family's standard one has its own set)."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        if item == "full" and model_ids is not None:
            members = model_ids
        elif item in PRESET_NAMES or (family in FAMILIES and item in preset_names(family)):
            if family is None:
                raise LayerIdError(f"preset {echo(item)} needs a known family; give the family or list the ids")
            members = preset_ids(family, item)
        else:
            members = [item]
        for m in members:  # a set keeps de-duplication linear: 100,000 ids take milliseconds, not minutes
            if m not in seen:
                seen.add(m)
                out.append(m)
    if not out:
        raise LayerIdError("the layer list is empty: pass ids, a preset (practical, legacy, full) or a JSON file")
    return out


def _check_ids(ids: list, valid: list[str], owner: str, family: str | None, references: bool = False) -> list[str]:
    """ids, each checked against `valid`; an unknown one raises LayerIdError naming the nearest valid ids. A
    reference-image id (`vit-block{B}-ref{I}-...`) is valid where `references` (the owner takes reference images)
    and its generated image's id is: how many references a run has is checked when the run reads them."""
    valid_set = set(valid)
    for layer_id in ids:
        if layer_id in valid_set:
            continue
        reference = reference_of(layer_id)
        if reference is not None and reference[0] in valid_set:
            if references:
                continue
            takers = [name for name, fam in FAMILIES.items() if fam.reference_images]
            raise LayerIdError(f"{echo(layer_id)} is a reference-image id, but {owner} takes no reference images "
                               f"(reference ids exist for {spoken(takers)}); its generated image's id is "
                               f"{reference[0]}")
        raise LayerIdError(_unknown_id_message(layer_id, valid, owner, family))
    return [str(i) for i in ids]  # plain strings: entries of a layer file carry their position until checked


def names_preset(spec, preset: str) -> bool:
    """Whether a layer spec names `preset` among its items: a preset that asks for more than its ids (flux's ditf
    asks for DiTF's transform of them), which resolving to ids forgets."""
    return spec is not None and any(str(item) == preset for item in _split_spec(spec))


def resolve_layers(spec, family: str) -> list[str]:
    """Valid ids of `family` for a spec; an unknown id raises LayerIdError naming the nearest valid ids."""
    fam = get_family(family)
    return _check_ids(_expand(_split_spec(spec), family), family_ids(family), family, family, fam.reference_images)


def resolve_taps(spec, model: torch.nn.Module, family: str | None = None) -> list[Tap]:
    """Taps of a loaded denoiser for a spec, checked against the model's own modules (custom depths included)."""
    valid = enumerate_ids(model)
    owner = f"this {family} model" if family else f"this {type(model).__name__}"
    layout = dit_layout(model)
    references = layout is not None and layout.takes_references
    return taps_of(model, _check_ids(_expand(_split_spec(spec), family, valid), valid, owner, family, references))

"""What a run may do with its output folder, decided before anything is written.

- A new run writes into a missing or empty folder, or one whose files none of its outputs would touch; it refuses
  a folder that already holds any of its outputs (features are never overwritten) or a run's index.
- --resume continues a folder made by `extract` with the same settings (run_file.check_same names each difference);
  it refuses a folder with files but no run file (another tool's, or an older version's). Resuming into a missing
  or empty folder starts a new run, so a script can always pass --resume.
- A resumed run names its inputs from the naming root its first run recorded (sources.rebase) and refuses an input
  outside it.
- A resumed run first clears what a killed one left: temporary files and folders, and a stop request (index.py).

The settings come in two parts: the request (flags that need no model: t, seed, size, format, ...), which the CLI
checks before loading a model, and the model part (model, family, dtype, resolved layer ids, LoRAs, ControlNets).
A refusal names every difference: before loading, those of the request and those of the model part the flags
already tell (precheck's `known`); after loading, all of them. Per-image prompts are not settings of the run but of
each record, checked image by image (check_prompts).
"""
from __future__ import annotations

import os
from pathlib import Path

from ...layer_catalog.errors import echo
from . import index, naming, run_file
from .run_file import ResumeError

MODEL_KEYS = ("model", "family", "dtype", "layers", "loras", "controlnets")


def _path_or_name(value) -> str:
    text = str(value)
    return os.path.abspath(text) if text and os.path.exists(text) else text


def hint_setting(hint):
    """How hints are made, for the run file: {"canny": [low, high]}, {"folder": path} or None."""
    if hint is None:
        return None
    if hasattr(hint, "low") and hasattr(hint, "high"):
        return {"canny": [hint.low, hint.high]}
    return {"folder": _path_or_name(getattr(hint, "root", hint))}


def request_settings(*, timesteps, seed, size, resize, fmt, layout, ensemble=1, feature_resize=1, feature_dtype=None,
                     vae_sample=True, denoise_from=None, denoise_steps=1, target_side=None, hint=None, shift=None,
                     guidance=None) -> dict:
    """The settings that do not need the model. A flow family's shift and guidance appear only when given, so a run
    started before they existed resumes."""
    flow = {k: v for k, v in (("shift", shift), ("guidance", guidance)) if v is not None}
    return {"t": list(timesteps), "seed": seed, "size": list(size) if size else None, "resize": resize,
            "target_side": target_side, "format": fmt, "layout": layout, "ensemble": ensemble,
            "feature_resize": feature_resize,
            "feature_dtype": str(feature_dtype).replace("torch.", "") if feature_dtype else None,
            "vae_sample": bool(vae_sample), "denoise_from": denoise_from,
            "denoise_steps": denoise_steps if denoise_from is not None else None, "hint": hint_setting(hint), **flow}


def model_settings(model, layer_ids, controlnets) -> dict:
    """The settings that come from the loaded model: where it came from, its family and dtype, the resolved layer
    ids (a preset and the list it stands for are the same setting, but for ditf, which also asks for DiTF's
    transform: engine/dit_transforms.kept_request), its LoRAs and the ControlNets."""
    loras = [[_path_or_name(getattr(lora, "path", "") or getattr(lora, "name", "")), float(sm), float(sc)]
             for lora, sm, sc in getattr(model, "loras", ())]
    nets = [[_path_or_name(getattr(cn, "source", "") or getattr(cn, "name", "")), float(strength)]
            for cn, strength in controlnets]
    return {"model": _path_or_name(model.source), "family": model.family,
            "dtype": str(model.dtype).replace("torch.", ""), "layers": list(layer_ids), "loras": loras,
            "controlnets": nets}


def known_model_settings(old: dict, *, model=None, family=None, dtype=None, loras=(), controlnets=(),
                         layers=None) -> dict:
    """The model settings the flags tell before the model is loaded, in model_settings' form: the model when it is
    a path, the family when given, the dtype, LoRAs and ControlNets as (path, strength), and the layer ids when
    they resolve in the family given or recorded (not `full`: a checkpoint of its own depth has its own)."""
    known = {}
    if model is not None and os.path.exists(str(model)):
        known["model"] = _path_or_name(model)
    if family is not None:
        known["family"] = family
    if dtype is not None:
        known["dtype"] = str(dtype).replace("torch.", "")
    known["loras"] = [[_path_or_name(path), float(strength), float(strength)] for path, strength in loras]
    known["controlnets"] = [[_path_or_name(path), float(strength)] for path, strength in controlnets]
    if layers is not None and "full" not in str(layers).replace(" ", "").split(","):
        from ...layer_catalog import resolve_layers
        from ...layer_catalog.resolver import names_preset
        from ..dit_transforms import DITF, kept_request

        try:
            known["layers"] = kept_request(resolve_layers(layers, family or old.get("family")),
                                           names_preset(layers, DITF))
        except (ValueError, KeyError, OSError):  # compared after loading, with the model's own ids
            pass
    return known


def _refuse_folder(out: Path, old: dict | None, resume: bool) -> None:
    """A run's folder without --resume, or a folder not ours with --resume."""
    if old is None:
        if resume and out.is_dir() and any(p.name != naming.INDEX_DIR for p in out.iterdir()):
            raise ResumeError(f"--resume: {out} holds files but no {naming.INDEX_DIR}/{run_file.RUN_FILE}, so it was "
                              "not made by `extract` (or by a version without an index); choose another --output")
    elif not resume:
        raise FileExistsError(f"{out} already holds an extraction run ({naming.INDEX_DIR}/{run_file.RUN_FILE}); "
                              "features are never overwritten: pass --resume to continue it, or choose another "
                              "--output")


def naming_root(out, current: str) -> str:
    """The folder a run names its outputs from: the one its run file recorded; for a run file of an older version,
    the one its index records show (a record's source minus its relative name); for a new run, `current`."""
    out = Path(out)
    recorded = run_file.recorded_root(out) if out.exists() else None
    if recorded is not None:
        return recorded
    for record in index.read_records(out) if out.exists() else ():
        source, parts = record.get("source"), len(Path(record["image"]).parts)
        if isinstance(source, str) and os.path.isabs(source) and len(Path(source).parts) > parts:
            return str(Path(source).parents[parts - 1])
    return current


def precheck(out, request: dict, resume: bool, sources=None, known=None) -> None:
    """The refusals that need no model: a run's folder without --resume, a folder not ours with --resume, a resume
    asking for other settings, an input outside the run's naming root (when `sources` are given).

    known(old settings) -> the model settings the flags already tell (a path, a dtype: what needs no loading):
    when the request differs, the refusal names their differences too; when only they differ, the run goes on to
    load the model and prepare names every difference."""
    out = Path(out)
    old = run_file.read(out) if out.exists() else None
    _refuse_folder(out, old, resume)
    if old is None:
        return
    diff = run_file.differences(old, request, keys=sorted(request))
    if diff:
        extra = known(old) if known is not None else {}
        diff += run_file.differences(old, extra, keys=[k for k in MODEL_KEYS if k in extra])
        run_file.refuse(out, diff)
    if sources:
        from .sources import rebase, root_of

        rebase(sources, naming_root(out, root_of(sources)))


def prepare(out, settings: dict, resume: bool, planned: dict[str, list[str]], root: str | None = None) -> None:
    """On the first process, before any process writes: refuse what must be refused, then write the run file (a
    new run, with its naming root) or clear what a killed run left (a resumed one)."""
    out = Path(out)
    old = run_file.read(out) if out.exists() else None
    _refuse_folder(out, old, resume)
    if old is not None:
        run_file.check_same(out, old, settings)  # every difference, of the request and of the model alike
        index.remove_temporaries(out)
        index.clear_stop(out)
        return
    if out.exists():
        taken = next((f for files in planned.values() for f in files if (out / f).exists()), None)
        if taken is not None:
            raise FileExistsError(f"{out} already holds features for these images (e.g. {out / taken}); features "
                                  "are never overwritten: choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write(out, settings, root)


def check_prompts(out, records: list[dict], prompts: dict[str, str], digest: str) -> None:
    """A complete image made with another prompt than it gets now is a different setting: refuse, naming it."""
    wrong = [(r["image"], r.get("prompt"), prompts[r["image"]]) for r in records
             if r.get("status") == "done" and r.get("settings") == digest and r["image"] in prompts
             and r.get("prompt") != prompts[r["image"]]]
    if wrong:
        image, there, now = wrong[0]
        more = f" (and {len(wrong) - 1} more images)" if len(wrong) > 1 else ""
        raise ResumeError(f"--resume: {out} holds {image} made with prompt {echo(there)}, this run gives it "
                          f"{echo(now)}{more}; "
                          "resume with the same prompts or choose another --output")

"""What a run may do with its output folder, decided before anything is written.

- A new run writes into a missing or empty folder, or one whose files none of its outputs would touch; it refuses
  a folder that already holds any of its outputs (features are never overwritten) or a run's index.
- --resume continues a folder made by `extract` with the same settings (run_file.check_same names each difference);
  it refuses a folder with files but no run file (another tool's, or an older version's). Resuming into a missing
  or empty folder starts a new run, so a script can always pass --resume.
- A resumed run first clears what a killed one left: temporary files and a stop request (index.py).

The settings come in two parts: the request (flags that need no model: t, seed, size, format, ...), which the CLI
checks before loading a model, and the model part (model, family, dtype, resolved layer ids, LoRAs, ControlNets).
Per-image prompts are not settings of the run but of each record, checked image by image (check_prompts).
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
                     vae_sample=True, denoise_from=None, denoise_steps=1, target_side=None, hint=None) -> dict:
    """The settings that do not need the model."""
    return {"t": list(timesteps), "seed": seed, "size": list(size) if size else None, "resize": resize,
            "target_side": target_side, "format": fmt, "layout": layout, "ensemble": ensemble,
            "feature_resize": feature_resize,
            "feature_dtype": str(feature_dtype).replace("torch.", "") if feature_dtype else None,
            "vae_sample": bool(vae_sample), "denoise_from": denoise_from,
            "denoise_steps": denoise_steps if denoise_from is not None else None, "hint": hint_setting(hint)}


def model_settings(model, layer_ids, controlnets) -> dict:
    """The settings that come from the loaded model: where it came from, its family and dtype, the resolved layer
    ids (a preset and the list it stands for are the same setting), its LoRAs and the ControlNets."""
    loras = [[_path_or_name(getattr(lora, "path", "") or getattr(lora, "name", "")), float(sm), float(sc)]
             for lora, sm, sc in getattr(model, "loras", ())]
    nets = [[_path_or_name(getattr(cn, "source", "") or getattr(cn, "name", "")), float(strength)]
            for cn, strength in controlnets]
    return {"model": _path_or_name(model.source), "family": model.family,
            "dtype": str(model.dtype).replace("torch.", ""), "layers": list(layer_ids), "loras": loras,
            "controlnets": nets}


def precheck(out, request: dict, resume: bool) -> None:
    """The refusals that need no model: a run's folder without --resume, a folder not ours with --resume, or a
    resume asking for other settings."""
    out = Path(out)
    old = run_file.read(out) if out.exists() else None
    if old is None:
        if resume and out.is_dir() and any(p.name != naming.INDEX_DIR for p in out.iterdir()):
            raise ResumeError(f"--resume: {out} holds files but no {naming.INDEX_DIR}/{run_file.RUN_FILE}, so it was "
                              "not made by `extract` (or by a version without an index); choose another --output")
        return
    if not resume:
        raise FileExistsError(f"{out} already holds an extraction run ({naming.INDEX_DIR}/{run_file.RUN_FILE}); "
                              "features are never overwritten: pass --resume to continue it, or choose another "
                              "--output")
    run_file.check_same(out, old, request, keys=sorted(request))


def prepare(out, settings: dict, resume: bool, planned: dict[str, list[str]]) -> None:
    """On the first process, before any process writes: refuse what must be refused, then write the run file (a
    new run) or clear what a killed run left (a resumed one)."""
    out = Path(out)
    precheck(out, {k: v for k, v in settings.items() if k not in MODEL_KEYS}, resume)
    old = run_file.read(out) if out.exists() else None
    if old is not None:
        run_file.check_same(out, old, settings)
        index.remove_temporaries(out)
        index.clear_stop(out)
        return
    if out.exists():
        taken = next((f for files in planned.values() for f in files if (out / f).exists()), None)
        if taken is not None:
            raise FileExistsError(f"{out} already holds features for these images (e.g. {out / taken}); features "
                                  "are never overwritten: choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write(out, settings)


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

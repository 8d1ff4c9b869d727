"""Sampler choices for generation (diffusers schedulers built from the checkpoint's own noise schedule) and the
capture-step grammar.

Every scheduler is made with `from_config(model.scheduler_config, ...)`, so the beta schedule, prediction type
(epsilon or v) and timestep spacing stay those of the checkpoint; only the solver changes. A fresh scheduler is
built for every run: its step counter and multistep history belong to that run alone.
"""
from __future__ import annotations

import re

from ..layer_catalog.errors import echo

SCHEDULERS = {
    # name: (diffusers class, config overrides)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "ddpm": ("DDPMScheduler", {}),
    "checkpoint": (None, {}),  # whatever scheduler the checkpoint ships
}
DEFAULT_SCHEDULER = "euler"


def make_scheduler(scheduler_config: dict, name: str = DEFAULT_SCHEDULER):
    """A new diffusers scheduler of kind `name` on the checkpoint's noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {echo(name)}; valid schedulers: {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    cls_name = cls_name or scheduler_config.get("_class_name") or "DDIMScheduler"
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"the checkpoint's scheduler {echo(cls_name)} is not a diffusers scheduler; pick another")
    config = dict(scheduler_config)
    # diffusers' Stable Diffusion pipelines correct two settings of old scheduler configs; so do we, so that a
    # seed gives the same image: latents are never clipped to [-1, 1], and the timestep offset is 1.
    if config.get("clip_sample", True) is not False:
        config["clip_sample"] = False
    if "steps_offset" in config and config["steps_offset"] != 1:
        config["steps_offset"] = 1
    return cls.from_config(config, **overrides)


def read_capture_steps(spec) -> tuple:
    """The form of a capture-step spec, read without knowing the run's length, so a spec no run could read is
    refused before any run: ('all',), ('last',), ('every', K, S) or ('list', items), items being step indices and
    (first, last) ranges ('none' is an empty list). Ranges that run backwards whatever the length are refused too;
    whether indices fit is for `parse_capture_steps`, once the length is known."""
    if isinstance(spec, (list, tuple)):
        for i in spec:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"capture steps {echo(spec)}: {echo(i)} is not an integer step index")
        return ("list", list(spec))
    text = str(spec or "").strip().lower()
    if text in ("", "none"):
        return ("list", [])
    if text in ("all", "last"):
        return (text,)
    every = re.fullmatch(r"every\s+(\d+)(?:\s+from\s+(-?\d+))?", text)
    if every:
        k, start = int(every.group(1)), int(every.group(2) or 0)
        if k < 1:
            raise ValueError(f"capture steps {echo(spec)}: 'every K' needs K >= 1")
        return ("every", k, start)
    items = []
    for part in text.split(","):
        part = part.strip()
        span = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
        if span:
            a, b = int(span.group(1)), int(span.group(2))
            if (a < 0) == (b < 0) and b < a:
                raise ValueError(f"capture steps {echo(spec)}: range {echo(part)} runs backwards")
            items.append((a, b))
        elif re.fullmatch(r"-?\d+", part):
            items.append(int(part))
        else:
            raise ValueError(f"capture steps {echo(spec)}: cannot read {echo(part)}; write e.g. 'all', 'last', "
                             "'every 5', '0, 10, 20' or '10-15' (indices from 0, negative from the end)")
    return ("list", items)


def parse_capture_steps(spec, steps: int) -> list[int]:
    """Step indices 0..steps-1 to capture, from a spec:

    "" or "none": no capture; "all": every step; "last": the last step; "every K" (optionally "every K from S"):
    S, S+K, ...; otherwise a comma list of indices and ranges ("0, 5, 10-12"); negative indices count from the end
    (-1 is the last step). A list/tuple of ints is accepted too. Returns sorted unique indices.
    """
    form = read_capture_steps(spec)
    if form[0] == "all":
        return list(range(steps))
    if form[0] == "last":
        return [steps - 1]
    if form[0] == "every":
        _, k, start = form
        return list(range(_index(start, steps), steps, k))
    out: set[int] = set()
    for item in form[1]:
        if isinstance(item, tuple):
            a, b = (_index(i, steps) for i in item)
            if b < a:
                raise ValueError(f"capture steps {echo(spec)}: range {item[0]}-{item[1]} runs backwards for a run "
                                 f"of {steps} steps")
            out.update(range(a, b + 1))
        else:
            out.add(_index(item, steps))
    return sorted(out)


def _index(i: int, steps: int) -> int:
    j = i + steps if i < 0 else i
    if not 0 <= j < steps:
        raise ValueError(f"capture step {i} is outside 0..{steps - 1} for a run of {steps} steps")
    return j

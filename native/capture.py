"""Capture during ComfyUI sampling: which model calls are recorded, how their rows are labelled, where tensors live.

A `NativeCapture` holds the settings (layer taps, capture steps, branch) and the captured rows. It is reached from
the tapped MODEL only through a small wrapper object that carries its registry key, so nothing large sits in
`model_options` (ComfyUI deep-copies it on every clone) and the wrapper deep-copies as itself. The registry holds
captures weakly: once the DF_CAPTURE output is gone, a stale tapped MODEL records nothing.

Per model call the wrapper reads ComfyUI's `transformer_options`: `cond_or_uncond` (0 = positive, 1 = negative,
one entry per chunk of rows), `uuids` (one per conditioning, ComfyUI >= 2024-12), `sigmas` (this call's) and
`sample_sigmas` (the run's schedule, ComfyUI >= 2024-08). Rules:
- Step: the index i of the schedule entry equal to the call's sigma; a sub-step call at a sigma between two entries
  (dpm_2, dpmpp_2s, dpmpp_sde midpoints) belongs to the step it starts from. This is right for every sampler that
  evaluates once per step, multistep ones included (uni_pc evaluates step i+1 before reporting step i). Heun-type
  samplers (heun, heunpp2) evaluate their correction exactly at sigma i+1 before step i+1's own call: that
  correction is then step i+1's row. (A sampler's step callback cannot tell the two cases apart either.) Without
  sample_sigmas (the 2024-03 ComfyUI) steps are counted by distinct decreasing sigmas, and a sigma higher than the
  last one starts a new run.
- A new sampling run (ComfyUI's OUTER_SAMPLE wrapper says when one starts, >= 2024-12; else another schedule
  tensor, or a sigma going up without a schedule) replaces the rows of the
  previous run, so a graph queued again does not pile rows up and memory stays flat over many prompts. Within a run
  the OUTER_SAMPLE wrapper marked, a schedule with the same values is the same run whatever its tensor: ComfyUI's
  MultiGPU node hands each extra device its own copy of `sample_sigmas` on every call.
- MultiGPU calls run in threads, each on its own device's copy of the network (the wrappers hook the network the
  call runs, never one found before sampling) and share one capture: a lock guards its run state and rows, hooks and
  rows in flight belong to their call, and a call whose run was replaced while it ran adds nothing.
- First call wins: per (step, branch, conditioning) only the first call's rows are kept. Extra calls made within
  a step (SAG, PAG, a heun correction at the next sigma) neither add nor shift rows. Without uuids the
  conditioning is its ordinal among the call's chunks of that branch.
- Only wanted steps and branches get hooks at all; other calls run exactly as without the taps.
- Rows are stored only when the call returns: a call that raised leaves no partial rows.
- Rows belong to the host's job (ComfyUI's prompt, see `set_host_job_id`) whose model calls made them. ComfyUI
  caches DFCaptureLayers, so a later prompt gets the same capture even when its sampler takes another MODEL:
  collecting there says the capture saw no model call in this prompt instead of serving the earlier rows.
"""
from __future__ import annotations

import copy
import itertools
import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..layer_catalog.errors import DiffusionFeatureError, echo
from ..layer_catalog.families import dit_layout, network_family
from ..layer_catalog.hooks import FeatureCapture
from ..layer_catalog.tap import Tap

BRANCHES = {"cond": (0,), "uncond": (1,), "both": (0, 1)}
BRANCH_NAMES = {0: "cond", 1: "uncond"}
WRAPPER_KEY = "diffusion_feature.capture"

_registry: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_keys = itertools.count()
_host_job_id = None  # () -> the id of the host's job running now (ComfyUI's prompt id), or None

NO_CALL = ("the capture saw no model call{where}: connect the MODEL output of DFCaptureLayers to a sampler "
           "(KSampler, SamplerCustom, ...) whose LATENT output this node receives")


class NoCaptureError(DiffusionFeatureError, RuntimeError):
    """The capture recorded nothing (its MODEL never reached a sampler, or no call matched)."""


def set_host_job_id(job_id) -> None:
    """job_id() -> the id of the host's job running now, or None (ComfyUI: its prompt id). Rows then belong to the
    job whose model calls made them: a call of another job starts a new run, and collecting in a job whose sampler
    never called the tapped MODEL is refused rather than served another job's rows. None: no jobs (library use)."""
    global _host_job_id
    _host_job_id = job_id


def _current_job():
    return _host_job_id() if _host_job_id is not None else None


def _parse_steps(spec, steps: int | None) -> list[int]:
    """The steps of a run of `steps` steps; None: only read the spec (its syntax), the run's length unknown yet."""
    from ..engine.samplers import parse_capture_steps, read_capture_steps  # the one capture-step grammar

    if steps is None:
        read_capture_steps(spec)
        return []
    return parse_capture_steps(spec, steps)


@dataclass
class Record:
    """One kept model call: a label per kept row and each tap's tensor for those rows (same order). A diffusion
    transformer's labels carry the call's token ranges ("tokens": FeatureCapture.token_ranges)."""

    labels: list[dict]
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class CallPlan:
    run: int
    step: int
    rows: torch.Tensor
    labels: list[dict]
    keys: list[tuple]


class NativeCapture:
    """Settings and rows of one capture. Create with `comfy_model.capture_layers`; read with `records`,
    `labels()` / `stacked()` after the sampler ran.

    steps: 'all', 'last', 'every K [from S]', a list ('0, 5, 10-12', negatives from the end), as DFGenerate's
    capture steps. branch: 'cond', 'uncond' or 'both'. dtype / device: where captured tensors go. ditf: the
    engine.dit_transforms.DitfRun of a request naming the ditf preset (rows hold DiTF's feature; the run's
    channels are in transform_meta).
    """

    def __init__(self, taps: list[Tap], steps="all", branch: str = "cond", *, family: str | None = None,
                 dtype: torch.dtype | None = None, device=None, ditf=None):
        if branch not in BRANCHES:
            raise ValueError(f"branch {echo(branch)} is not one of {', '.join(BRANCHES)}")
        _parse_steps(steps, None)  # a syntax error shows now; whether the steps fit, once the run's length is known
        self.taps, self.steps_spec, self.branch, self.family = list(taps), steps, branch, family
        self.dtype, self.device = dtype, device
        self.ditf, self.transform_meta = ditf, {}
        self.sizes = None  # native.memory.FeatureSizes of the taps, for the memory guard (set by capture_layers)
        self.key = register(self)
        self._lock = threading.RLock()  # MultiGPU: calls on several devices' threads share this capture
        self._run = 0  # counts runs: a call planned in a run that was replaced meanwhile adds nothing
        self.records: list[Record] = []
        self.model_calls = 0  # calls of the tapped model seen in the current run, captured or not
        self.total_steps: int | None = None
        self._pending = True  # the next call opens a new run
        self._marked = False  # the OUTER_SAMPLE wrapper opened the current run
        self._schedule: list[float] | None = None
        self._schedule_ref = None
        self._last_sigma: float | None = None
        self._step = -1
        self._wanted: set[int] | None = None
        self.steps_error: str | None = None
        self._seen: set[tuple] = set()
        self._ordinals: dict[tuple, list] = {}
        self.job = None  # the host's job whose model calls made the rows (see set_host_job_id)
        self._branches_called: set[int] = set()  # branches the run's model calls had, captured or not
        self._collected_with = None  # weakref to the LATENT samples these rows were first collected with

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.taps]

    # ---- runs and steps --------------------------------------------------------------------------------
    def _new_run(self, total: int | None) -> None:
        self._run, self._pending = self._run + 1, False
        self.records, self._seen, self._ordinals = [], set(), {}
        self.model_calls, self.total_steps, self._step = 0, total, -1
        self.steps_error, self._branches_called, self._collected_with = None, set(), None
        self.transform_meta = {}
        try:
            self._wanted = None if total is None else set(_parse_steps(self.steps_spec, total))
        except ValueError as e:  # steps the run does not have: the image still samples, collecting says why
            self.steps_error, self._wanted = str(e), set()

    def begin_run(self, marked: bool = False) -> None:
        """A sampling run starts: the next call opens a new run even when its schedule is the very tensor of the
        last run (a scheduler node's cached output, queued again). marked: ComfyUI's OUTER_SAMPLE wrapper says so;
        the run's calls are then told by their schedule's values, not its tensor."""
        with self._lock:
            self._pending, self._marked = True, marked
            self._last_sigma = None

    def _step_of(self, sigma: float, schedule: torch.Tensor | None) -> int:
        if schedule is not None:
            values = [float(v) for v in schedule.detach().flatten().cpu()]
            if self._pending or values != self._schedule or not (self._marked or self._schedule_ref() is schedule):
                self._schedule, self._schedule_ref = values, weakref.ref(schedule)
                self._new_run(max(len(values) - 1, 1))
            s = values[:-1] or [sigma]
            for i, v in enumerate(s):
                if abs(v - sigma) <= 1e-5 * max(1.0, abs(v)):
                    return i
            inside = [i for i, v in enumerate(s) if v >= sigma]
            return inside[-1] if inside else 0
        tol = 1e-5 * max(1.0, abs(sigma))
        if self._last_sigma is None or sigma > self._last_sigma + tol:
            self._new_run(None)
            self._step = 0
        elif sigma < self._last_sigma - tol:
            self._step += 1
        self._last_sigma = sigma
        if self.steps_spec == "last":  # without a schedule the last step is only known at the end: keep one
            self.records = [r for r in self.records if r.labels and r.labels[0]["step"] == self._step]
        return self._step

    def plan(self, x: torch.Tensor, sigma: torch.Tensor | float, transformer_options: dict,
             timestep_of=None) -> CallPlan | None:
        """Decide what one model call contributes: its rows to keep with their labels, or None (no hooks)."""
        sig = float(sigma.detach().flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        job = _current_job()
        if job != self.job:  # another job's sampler: its rows never join the last job's
            self.begin_run(self._marked)
            self.job = job
        schedule = transformer_options.get("sample_sigmas")
        step = self._step_of(sig, schedule if isinstance(schedule, torch.Tensor) else None)
        self.model_calls += 1
        cou = list(transformer_options.get("cond_or_uncond") or [0])
        self._branches_called.update(cou)
        if self._wanted is not None and step not in self._wanted:
            return None
        batch = x.shape[0]
        if batch % len(cou):
            cou = [cou[0]]  # rows do not split into the announced chunks: label the call as one chunk
        per = batch // len(cou)
        uuids = transformer_options.get("uuids")
        timestep = None
        rows, labels, keys = [], [], []
        for j, branch in enumerate(cou):
            if branch not in BRANCHES[self.branch]:
                continue
            if uuids is not None and len(uuids) == len(cou):
                cond = uuids[j]
            else:
                cond = ("chunk", sum(1 for b in cou[:j] if b == branch))
            key = (step, branch, cond)
            if key in self._seen or key in keys:
                continue
            known = self._ordinals.setdefault((step, branch), [])
            if cond not in known:
                known.append(cond)
            if timestep is None:
                timestep = float(timestep_of(torch.tensor([sig]))[0]) if timestep_of is not None else None
            keys.append(key)
            for image in range(per):
                rows.append(j * per + image)
                labels.append({"step": step, "timestep": timestep, "sigma": sig, "branch": BRANCH_NAMES[branch],
                               "image": image, "cond_index": known.index(cond)})
        if not rows:
            return None
        return CallPlan(self._run, step, torch.tensor(rows, dtype=torch.long), labels, keys)

    def commit(self, plan: CallPlan, hooks: FeatureCapture) -> None:
        if plan.run != self._run or not self._seen.isdisjoint(plan.keys):  # replaced meanwhile, or came second
            return
        self._seen.update(plan.keys)
        tokens = hooks.token_ranges()
        if tokens is not None:
            for label in plan.labels:
                label["tokens"] = tokens
        features = dict(hooks.features)
        if self.ditf is not None:
            features = self.ditf.finish(features, self.transform_meta)
        self.records.append(Record(plan.labels, features))

    def run_call(self, unet: torch.nn.Module, x, sigma, transformer_options: dict, call, timestep_of=None,
                 text_tokens: int | None = None):
        """One model call under the capture's rules: hooks on `unet` only while `call()` runs. text_tokens: the
        call's prompt length (for the memory plan), when the wrapper sees it."""
        with self._lock:
            plan = self.plan(x, sigma, transformer_options or {}, timestep_of)
        if plan is None:
            return call()
        if not self.records and self.sizes is not None:  # a run's first captured call: refuse what would not fit
            from .memory import check_capture

            check_capture(unet, self.sizes, x.shape, len(plan.rows), len(self._wanted) if self._wanted else 1,
                          dtype=self.dtype, device=self.device, text_tokens=text_tokens)
        taps = self.taps if self.ditf is None else self.ditf.taps
        with FeatureCapture(unet, taps, rows=plan.rows, dtype=self.dtype, device=self.device) as hooks:
            out = hooks.call(call)  # raises when a tap never fired
        with self._lock:
            self.commit(plan, hooks)
        return out

    # ---- reading ---------------------------------------------------------------------------------------
    def _final_records(self) -> list[Record]:
        if self.steps_error is not None:
            raise ValueError(f"capture steps {echo(self.steps_spec)} do not fit the sampling run: {self.steps_error}")
        if self._wanted is not None or not self.records:
            return self.records
        steps = sorted({label["step"] for r in self.records for label in r.labels})
        try:
            wanted = set(_parse_steps(self.steps_spec, steps[-1] + 1))
        except ValueError as e:
            raise ValueError(f"capture steps {echo(self.steps_spec)} do not fit the sampling run: {e}") from None
        return [r for r in self.records if r.labels and r.labels[0]["step"] in wanted]

    def check_current(self, samples=None) -> None:
        """Refuse rows another job made. ComfyUI hands a cached DFCaptureLayers' capture to every later prompt,
        also to one whose sampler took another MODEL: its rows are served only to the job whose model calls made
        them, or again with the very LATENT `samples` they were first collected with (a sampler output ComfyUI
        cached, collected once more)."""
        job = _current_job()
        if job is None:
            return
        if self.job == job:
            if torch.is_tensor(samples):
                self._collected_with = weakref.ref(samples)
            return
        if samples is not None and self._collected_with is not None and self._collected_with() is samples:
            return
        where = " in this prompt" + (" (its rows belong to an earlier prompt, whose sampler made them)"
                                     if self.records else "")
        raise NoCaptureError(NO_CALL.format(where=where))

    def labels(self) -> list[dict]:
        """One label per captured row, ordered by step, then branch (cond first), conditioning and image."""
        return [dict(lab) for _, lab, _ in self._ordered()]

    def _ordered(self):
        rows = [(r, lab, i) for r in self._final_records() for i, lab in enumerate(r.labels)]
        order = {"cond": 0, "uncond": 1}
        return sorted(rows, key=lambda t: (t[1]["step"], order[t[1]["branch"]], t[1]["cond_index"], t[1]["image"]))

    def stacked(self) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """(labels, {id: tensor with one row per label}). Raises NoCaptureError when nothing was captured."""
        rows = self._ordered()
        if not rows:
            if self.model_calls == 0:
                raise NoCaptureError(NO_CALL.format(where=""))
            if self.branch == "uncond" and 1 not in self._branches_called:
                raise NoCaptureError(f"branch 'uncond': the sampler made no negative (uncond) model call in its "
                                     f"{self.model_calls} calls; at cfg 1 ComfyUI skips the negative prompt, so "
                                     "set cfg above 1 to capture it, or capture branch 'cond'")
            raise NoCaptureError(f"the capture saw {self.model_calls} model calls but none matched capture steps "
                                 f"{echo(self.steps_spec)} and branch {echo(self.branch)}")
        feats = {}
        for tid in self.ids:
            items = [r.features[tid][i] for r, _, i in rows]
            shapes = sorted({tuple(t.shape) for t in items})
            if len(shapes) > 1:  # e.g. area conditionings run on a crop of the latent
                raise ValueError(f"{tid}: captured rows have different shapes {shapes} (area conditioning?); read "
                                 "capture.records, which keeps each call's rows apart")
            feats[tid] = torch.stack(items)
        return [dict(lab) for _, lab, _ in rows], feats


def register(capture) -> str:
    """A key for the wrappers to find `capture` by (held weakly); anything with run_call and begin_run."""
    key = f"df-capture-{next(_keys)}"
    _registry[key] = capture
    return key


def lookup(key: str):
    return _registry.get(key)


def _find_transformer_options(args, kwargs) -> dict:
    if isinstance(kwargs.get("transformer_options"), dict):
        return kwargs["transformer_options"]
    if len(args) > 5 and isinstance(args[5], dict):  # apply_model(x, t, c_concat, c_crossattn, control, to)
        return args[5]
    return {}


def is_flow(sampling) -> bool:
    """ComfyUI's rectified-flow sampling (Flux, SD3: x_t = (1 - sigma) x0 + sigma eps), recognised by its CONST
    prediction mixin so that no ComfyUI import is needed (the 2024-03 ComfyUI may lack it)."""
    return any(c.__name__ == "CONST" for c in type(sampling).__mro__)


def _text_tokens(context) -> int | None:
    """The prompt length of a model call's c_crossattn (B, T, C), when it has one."""
    return int(context.shape[1]) if torch.is_tensor(context) and context.ndim == 3 else None


def _timestep_of(base_model):
    """sigma -> the row label's timestep, on the 0-1000 scale for every model: a flow model's is 1000 sigma
    (ComfyUI hands Flux sigma itself and its network scales it by 1000)."""
    sampling = getattr(base_model, "model_sampling", None)
    if sampling is not None and is_flow(sampling):
        return lambda sigma: sigma * 1000.0
    return getattr(sampling, "timestep", None)


class _KeyedWrapper:
    """A wrapper that carries only the capture's key, and deep-copies as itself (ComfyUI copies model_options)."""

    def __init__(self, key: str):
        self.key = key

    def __deepcopy__(self, memo):
        return self


class ApplyModelWrapper(_KeyedWrapper):
    """ComfyUI's keyed APPLY_MODEL wrapper (ComfyUI >= 2024-12): around every `BaseModel.apply_model` call of the
    tapped MODEL, hooks on its diffusion_model exist only while the call runs."""

    def __call__(self, executor, *args, **kwargs):
        capture = lookup(self.key)
        if capture is None:
            return executor(*args, **kwargs)
        base = executor.class_obj
        context = kwargs.get("c_crossattn", args[3] if len(args) > 3 else None)  # apply_model's 4th argument
        return capture.run_call(base.diffusion_model, args[0], args[1], _find_transformer_options(args, kwargs),
                                lambda: executor(*args, **kwargs), _timestep_of(base), _text_tokens(context))


def check_reference_latents(net: torch.nn.Module, conds: dict) -> None:
    """Refuse in one line a reference latent of a sampling run's conditionings ({"positive": [cond dict, ...], ...},
    as ComfyUI's guider holds them, reference_latents still unprocessed) that the network cannot take."""
    layout = dit_layout(net)
    if layout is None or layout.reference_channels is None:
        return
    for name, items in (conds or {}).items():
        for cond in items or ():
            if isinstance(cond, dict):
                layout.check_reference_latents(cond.get("reference_latents"), f"the {name} conditioning",
                                               f"this {network_family(net)} model")


class OuterSampleWrapper(_KeyedWrapper):
    """ComfyUI's keyed OUTER_SAMPLE wrapper: marks the start of each sampling run of the tapped MODEL, the one
    boundary a schedule tensor cannot give (SamplerCustom's cached sigmas are the same tensor every run); and
    refuses a reference latent the network cannot take before ComfyUI processes the conditionings."""

    def __call__(self, executor, *args, **kwargs):
        capture = lookup(self.key)
        if capture is not None:
            capture.begin_run(marked=True)
        guider = getattr(executor, "class_obj", None)
        patcher = getattr(guider, "model_patcher", None)
        if patcher is not None:
            check_reference_latents(patcher.model.diffusion_model, getattr(guider, "conds", None))
        return executor(*args, **kwargs)


class UnetFunctionWrapper:
    """The single-slot `model_function_wrapper` of older ComfyUI (2024-03): chains the wrapper that was there
    before (never drops it) and calls it inside our hooks."""

    def __init__(self, key: str, inner=None):
        self.key, self.inner = key, inner

    def __call__(self, apply_model, args: dict):
        def call():
            if self.inner is not None:
                return self.inner(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

        capture = lookup(self.key)
        base = getattr(apply_model, "__self__", None)
        if capture is None or base is None or not hasattr(base, "diffusion_model"):
            return call()
        options = dict(args.get("c", {}).get("transformer_options") or {})
        options.setdefault("cond_or_uncond", args.get("cond_or_uncond"))
        return capture.run_call(base.diffusion_model, args["input"], args["timestep"], options, call,
                                _timestep_of(base), _text_tokens(args.get("c", {}).get("c_crossattn")))

    def to(self, device):
        """ComfyUI moves a model_function_wrapper that has .to with the model: pass it on to the chained one."""
        if self.inner is not None and hasattr(self.inner, "to"):
            return UnetFunctionWrapper(self.key, self.inner.to(device))
        return self

    def __deepcopy__(self, memo):
        return UnetFunctionWrapper(self.key, copy.deepcopy(self.inner, memo))

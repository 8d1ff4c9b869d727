"""The hook engine: attach taps to a denoiser for one run, capture their tensors, always detach.

    with FeatureCapture(unet, taps, device="cpu", early_exit=True) as cap:
        cap.run(sample, t, encoder_hidden_states=text)
    features = cap.features            # {layer id: tensor}, in the order the ids were requested

Spatial taps are read by plain forward hooks; attention maps by `MapRecordingProcessor`, installed only on the
attention modules whose maps were requested and restored afterwards. Whatever happens inside the `with` block
(an exception, KeyboardInterrupt, an early exit), the model leaves it with exactly the hooks and processors it had.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .attention_maps import MapRecordingProcessor
from .errors import DiffusionFeatureError, echo
from .hook_set import AttachedHooks, HookSet, module_lookup
from .taps import Tap


class _EarlyExit(Exception):
    """Raised by the last tap to fire, to skip the rest of the forward. Never leaves `FeatureCapture.run`."""


class TokenGridError(DiffusionFeatureError, RuntimeError):
    """A token-shaped tensor does not match the spatial grid recorded for it."""


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot read a tensor from a {type(output).__name__}")


def first_input(args, kwargs, names=("hidden_states", "sample")):
    """The tensor a module was called with: its first positional argument, else the first of `names` given."""
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError("the hooked module was called without its input tensor")


def tokens_to_grid(layer_id: str, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W) on the grid recorded for them (never guessed from sqrt(N))."""
    h, w = grid
    b, n, c = x.shape
    if n != h * w:
        raise TokenGridError(f"{layer_id}: {n} tokens do not fit the recorded {h}x{w} grid")
    return x.transpose(1, 2).reshape(b, c, h, w)


def pool_spatial(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool the last two (spatial) dimensions to (H // factor, W // factor), each at least 1."""
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (max(1, h // factor), max(1, w // factor)))


def owned(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """x, copied if it still shares memory with the model's activation `source`: the model may reuse or edit its
    activation in place afterwards (ControlNet residuals are added with +=), and a feature must not change."""
    if x.device.type != "meta" and x.data_ptr() == source.data_ptr():
        return x.clone()
    return x


class FeatureCapture(AttachedHooks):
    """Captures the tensors of `taps` on every forward of `model` while the context is open.

    dtype / device: where captured tensors go (None keeps the tensor's own; device="cpu" offloads as captured).
    feature_resize: an integer factor f >= 1; spatial taps are average-pooled to (H // f, W // f). Maps never.
    early_exit: `run` stops the forward once every tap has fired (its return value is then None).
    on_capture: optional callback(layer_id, tensor) after each capture (e.g. to count or stream).
    enabled / rows: attributes a multi-step run may change between forwards: `enabled = False` makes the hooks
    return at once (steps that are not captured); `rows` (a slice, or None for all) keeps only those batch rows,
    e.g. the conditional half of a classifier-free-guidance batch, before any copy is made.
    """

    def __init__(self, model: torch.nn.Module, taps: Iterable[Tap], *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, feature_resize: int = 1, early_exit: bool = False,
                 on_capture: Callable[[str, torch.Tensor], None] | None = None):
        self.model = model
        self.taps = list(taps)
        ids = [t.id for t in self.taps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a layer id was requested twice: {sorted({i for i in ids if ids.count(i) > 1})}")
        if not isinstance(feature_resize, int) or feature_resize < 1:
            raise ValueError(f"feature_resize must be an integer >= 1, got {echo(feature_resize)}")
        self.dtype, self.device = dtype, (torch.device(device) if device is not None else None)
        self.feature_resize, self.early_exit, self.on_capture = feature_resize, early_exit, on_capture
        self.enabled = True
        self.rows: slice | None = None
        self.features: dict[str, torch.Tensor] = {}
        self._grids: dict[str, tuple[int, int]] = {}

    # ---- attach (AttachedHooks removes it all when the block ends) ------------------------------------------
    def _attach(self, hooks: HookSet) -> None:
        module = module_lookup(self.model)
        for grid_path, divisor in {(t.grid_path, t.grid_divisor) for t in self.taps if t.kind in ("tokens", "map")}:
            hooks.forward_pre_hook(module(grid_path), self._grid_hook(grid_path, divisor), with_kwargs=True)
        for tap in self.taps:
            target = module(tap.module_path)
            if tap.kind == "input":
                hooks.forward_pre_hook(target, self._input_hook(tap), with_kwargs=True)
            elif tap.kind == "map":
                if not hasattr(target, "set_processor"):
                    raise TypeError(f"{tap.id}: module {tap.module_path!r} is not a diffusers Attention")
                hooks.processor(target, MapRecordingProcessor(self._map_recorder(tap)))
            else:
                hooks.forward_hook(target, self._output_hook(tap))

    # ---- hooks -----------------------------------------------------------------------------------------
    def _grid_hook(self, path: str, divisor: int):
        def hook(_module, args, kwargs):
            x = first_input(args, kwargs)
            self._grids[path] = (x.shape[-2] // divisor, x.shape[-1] // divisor)
        return hook

    def _input_hook(self, tap: Tap):
        def hook(_module, args, kwargs):
            self._store(tap, first_input(args, kwargs))
        return hook

    def _output_hook(self, tap: Tap):
        def hook(_module, _args, output):
            self._store(tap, _first_tensor(output))
        return hook

    def _map_recorder(self, tap: Tap):
        return lambda probs: self._store(tap, probs)

    # ---- capture ---------------------------------------------------------------------------------------
    def _shape(self, tap: Tap, x: torch.Tensor) -> torch.Tensor:
        if tap.kind == "tokens":
            x = tokens_to_grid(tap.id, x, self._grids[tap.grid_path])
        if tap.kind != "map" and self.feature_resize > 1:
            x = pool_spatial(x, self.feature_resize)
        return x

    def _store(self, tap: Tap, x: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self.rows is not None:
            x = x[self.rows]
        source = x
        x = self._shape(tap, x.detach())
        x = x.to(dtype=self.dtype or x.dtype, device=self.device or x.device)
        if tap.kind != "map":  # a map is the processor's own tensor, made for us
            x = owned(x, source)
        self.features[tap.id] = x
        if self.on_capture is not None:
            self.on_capture(tap.id, x)
        if self.early_exit and len(self.features) == len(self.taps):
            raise _EarlyExit()

    def run(self, *args, **kwargs):
        """One forward of the model with fresh features. Returns the model output, or None after an early exit."""
        if not self.attached:
            raise RuntimeError("FeatureCapture.run needs the context to be open (use `with FeatureCapture(...)`)")
        self.features, self._grids = {}, {}
        try:
            output = self.model(*args, **kwargs)
        except _EarlyExit:
            output = None
        missing = [t.id for t in self.taps if t.id not in self.features]
        if missing and self.enabled:
            raise RuntimeError(f"these taps never fired during the forward: {missing}")
        self.features = {t.id: self.features[t.id] for t in self.taps if t.id in self.features}
        return output


def residue(model: torch.nn.Module) -> dict[str, int]:
    """What hooks and map processors a model carries now (all of them, ours or not): after any run of ours the
    counts are what they were before it. Used by tests and by the pack's status route."""
    counts = {"forward_hooks": 0, "forward_pre_hooks": 0, "map_processors": 0}
    for module in model.modules():
        counts["forward_hooks"] += len(module._forward_hooks)
        counts["forward_pre_hooks"] += len(module._forward_pre_hooks)
        counts["map_processors"] += isinstance(getattr(module, "processor", None), MapRecordingProcessor)
    return counts

"""Torch hooks for one call of a native UNet: attached on entry, always removed on exit.

    with CallHooks(unet, taps, rows=None) as hooks:
        out = hooks.run(unet_call)          # or just call the UNet inside the block
    hooks.features                         # {layer id: tensor (rows, ...)}

A `CallHooks` lives for one denoiser call. It keeps nothing on the module afterwards: every handle it registered is
removed in `__exit__`, whatever happened inside (an exception, an interrupt, an early exit). Captured tensors are
copies (the UNet reuses and edits activations in place, e.g. ControlNet residuals are added with `+=`).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .maps import attention_probs, heads_of, upcast_of
from .names import NativeTap


class _EarlyExit(Exception):
    """Raised by the last tap to fire, to skip the rest of the forward. Never leaves `CallHooks.run`."""


class TokenGridError(RuntimeError):
    """A token-shaped tensor does not match the spatial grid recorded for it."""


def _first_arg(args, kwargs, names=("x", "hidden_states")):
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError("the hooked module was called without its input tensor")


class CallHooks:
    """Hooks that capture `taps` during the calls made while the context is open.

    rows: a 1-D LongTensor of batch rows to keep (None keeps all); rows are selected before anything is copied,
    and maps are computed for those rows only. dtype / device: where captured tensors go (None keeps their own).
    early_exit: `run` stops the forward once every tap has fired.
    """

    def __init__(self, unet: torch.nn.Module, taps: Iterable[NativeTap], *, rows: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, device=None, early_exit: bool = False):
        self.unet, self.taps = unet, list(taps)
        self.rows, self.dtype = rows, dtype
        self.device = torch.device(device) if device is not None else None
        self.early_exit = early_exit
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._grids: dict[str, tuple[int, int]] = {}
        self._queries: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "CallHooks":
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._detach()

    def _attach(self) -> None:
        modules = dict(self.unet.named_modules())

        def module(path: str) -> torch.nn.Module:
            if path not in modules:
                raise KeyError(f"the UNet has no module {path!r}")
            return modules[path]

        register = self._handles.append
        for grid_path in {t.grid_path for t in self.taps if t.kind in ("tokens", "map") and t.grid_path}:
            register(module(grid_path).register_forward_pre_hook(self._grid_hook(grid_path), with_kwargs=True))
        for tap in self.taps:
            target = module(tap.module_path)
            if tap.kind == "input":
                register(target.register_forward_pre_hook(self._input_hook(tap), with_kwargs=True))
            elif tap.kind == "map":
                heads, upcast = heads_of(target), upcast_of(target)
                register(target.to_q.register_forward_hook(self._query_hook(tap)))
                register(target.to_k.register_forward_hook(self._key_hook(tap, heads, upcast)))
            else:
                register(target.register_forward_hook(self._output_hook(tap)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._queries.clear()

    # ---- hooks -----------------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.rows is None else x.detach().index_select(0, self.rows.to(x.device))

    def _grid_hook(self, path: str):
        def hook(_module, args, kwargs):
            x = _first_arg(args, kwargs)
            self._grids[path] = (x.shape[-2], x.shape[-1])
        return hook

    def _input_hook(self, tap: NativeTap):
        def hook(_module, args, kwargs):
            self._store(tap, _first_arg(args, kwargs))
        return hook

    def _output_hook(self, tap: NativeTap):
        def hook(_module, _args, output):
            self._store(tap, output if isinstance(output, torch.Tensor) else output[0])
        return hook

    def _query_hook(self, tap: NativeTap):
        def hook(_module, _args, output):
            self._queries[tap.id] = self._select(output)
        return hook

    def _key_hook(self, tap: NativeTap, heads: int, upcast: bool):
        def hook(_module, _args, output):
            q = self._queries.pop(tap.id, None)
            if q is None:  # to_k without to_q first: not the CrossAttention call order we know
                raise RuntimeError(f"{tap.id}: {tap.module_path}.to_k ran before its to_q; cannot build the map")
            with torch.no_grad():
                self._store(tap, attention_probs(q, self._select(output), heads, upcast), selected=True)
        return hook

    # ---- capture ---------------------------------------------------------------------------------------
    def _store(self, tap: NativeTap, x: torch.Tensor, selected: bool = False) -> None:
        source = x
        if not selected:
            x = self._select(x)
        if tap.kind == "tokens":
            h, w = self._grids[tap.grid_path]
            b, n, c = x.shape
            if n != h * w:
                raise TokenGridError(f"{tap.id}: {n} tokens do not fit the recorded {h}x{w} grid")
            x = x.transpose(1, 2).reshape(b, c, h, w)
        x = x.to(dtype=self.dtype or x.dtype, device=self.device or x.device)
        if x.device.type != "meta" and x.data_ptr() == source.data_ptr():
            x = x.clone()  # the UNet may edit its activation in place afterwards; the feature must not change
        self.features[tap.id] = x
        if self.early_exit and len(self.features) == len(self.taps):
            raise _EarlyExit()

    def run(self, fn: Callable, *args, **kwargs):
        """Call fn (a UNet or anything that calls it) once with fresh features; None after an early exit."""
        self.features, self._grids = {}, {}
        try:
            out = fn(*args, **kwargs)
        except _EarlyExit:
            out = None
        missing = [t.id for t in self.taps if t.id not in self.features]
        if missing:
            raise RuntimeError(f"these taps never fired during the call: {missing}")
        self.features = {t.id: self.features[t.id] for t in self.taps}
        return out


def hook_counts(module: torch.nn.Module) -> dict[str, int]:
    """All forward hooks and pre-hooks a module tree carries now (ours or not): after any run of ours, the counts
    are what they were before it."""
    counts = {"forward_hooks": 0, "forward_pre_hooks": 0}
    for m in module.modules():
        counts["forward_hooks"] += len(m._forward_hooks)
        counts["forward_pre_hooks"] += len(m._forward_pre_hooks)
    return counts

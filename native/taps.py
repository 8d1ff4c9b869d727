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

from ..layer_catalog.hook_set import AttachedHooks, HookSet, module_lookup
from ..layer_catalog.hooks import first_input, owned, residue, tokens_to_grid
from .maps import attention_probs
from .names import NativeTap

_INPUT_NAMES = ("x", "hidden_states")  # ComfyUI's blocks take x, its attention modules hidden states


class _EarlyExit(Exception):
    """Raised by the last tap to fire, to skip the rest of the forward. Never leaves `CallHooks.run` (its own
    class, so that an early exit of one engine is never taken for another's)."""


class CallHooks(AttachedHooks):
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
        self._grids: dict[str, tuple[int, int]] = {}
        self._queries: dict[str, torch.Tensor] = {}

    # ---- attach (AttachedHooks removes it all when the block ends) ------------------------------------------
    def _attach(self, hooks: HookSet) -> None:
        module = module_lookup(self.unet, "network")
        for grid in {(t.grid_path, t.grid_divisor) for t in self.taps if t.kind in ("tokens", "map")
                     and t.grid_path is not None}:
            hooks.forward_pre_hook(module(grid[0]), self._grid_hook(*grid), with_kwargs=True)
        for tap in self.taps:
            target = module(tap.module_path)
            if tap.kind == "input":
                hooks.forward_pre_hook(target, self._input_hook(tap), with_kwargs=True)
            elif tap.kind == "map" and tap.key_path == tap.module_path:  # q and k from one fused projection
                hooks.forward_hook(target, self._fused_map_hook(tap))
            elif tap.kind == "map":
                hooks.forward_hook(target, self._query_hook(tap))
                hooks.forward_hook(module(tap.key_path), self._key_hook(tap))
            else:
                hooks.forward_hook(target, self._output_hook(tap))

    def _detached(self) -> None:
        self._queries.clear()

    # ---- hooks -----------------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.rows is None else x.detach().index_select(0, self.rows.to(x.device))

    def _grid_hook(self, path: str, divisor: int):
        def hook(_module, args, kwargs):
            x = first_input(args, kwargs, _INPUT_NAMES)
            self._grids[(path, divisor)] = (x.shape[-2] // divisor, x.shape[-1] // divisor)
        return hook

    def _input_hook(self, tap: NativeTap):
        def hook(_module, args, kwargs):
            self._store(tap, first_input(args, kwargs, _INPUT_NAMES))
        return hook

    def _output_hook(self, tap: NativeTap):
        def hook(_module, _args, output):
            self._store(tap, _slice(output if isinstance(output, torch.Tensor) else output[0], tap.part))
        return hook

    def _query_hook(self, tap: NativeTap):
        def hook(_module, _args, output):
            self._queries[tap.id] = (self._select(_slice(output, tap.part)), output.shape[0])
        return hook

    def _key_hook(self, tap: NativeTap):
        def hook(_module, _args, output):
            if tap.id not in self._queries:  # k before q: not the call order of the attentions we know
                raise RuntimeError(f"{tap.id}: {tap.key_path} ran before {tap.module_path}; cannot build the map")
            q, batch = self._queries.pop(tap.id)
            if output.shape[0] != batch:  # PixArt: every image's text in one flat sequence (1, B*T, C)
                output = output.reshape(batch, -1, output.shape[-1])
            self._store_map(tap, q, self._select(_slice(output, tap.key_part)))
        return hook

    def _fused_map_hook(self, tap: NativeTap):
        def hook(_module, _args, output):
            x = self._select(output)
            self._store_map(tap, _slice(x, tap.part), _slice(x, tap.key_part))
        return hook

    def _store_map(self, tap: NativeTap, q: torch.Tensor, k: torch.Tensor) -> None:
        with torch.no_grad():
            self._store(tap, attention_probs(q, k, tap.heads, tap.upcast), selected=True)

    # ---- capture ---------------------------------------------------------------------------------------
    def _store(self, tap: NativeTap, x: torch.Tensor, selected: bool = False) -> None:
        source = x
        if not selected:
            x = self._select(x)
        if tap.kind == "tokens":
            x = tokens_to_grid(tap.id, x, self._grids[(tap.grid_path, tap.grid_divisor)])
        x = owned(x.to(dtype=self.dtype or x.dtype, device=self.device or x.device), source)
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


def _slice(x: torch.Tensor, part: tuple[int, int] | None) -> torch.Tensor:
    if part is None:
        return x
    i, n = part
    width = x.shape[-1] // n
    return x[..., i * width:(i + 1) * width]


def hook_counts(module: torch.nn.Module) -> dict[str, int]:
    """All forward hooks and pre-hooks a module tree carries now (ours or not): after any run of ours, the counts
    are what they were before it."""
    counts = residue(module)
    return {"forward_hooks": counts["forward_hooks"], "forward_pre_hooks": counts["forward_pre_hooks"]}

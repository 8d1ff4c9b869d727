"""Feature injection through the same taps as capture: a tap's output in some batch rows is replaced by its
output in a source row, while the forward runs (Plug-and-Play).

    with FeatureInjection(unet, taps, source_row=0) as inject:
        inject.enabled = step < threshold_step      # per step, like FeatureCapture.enabled
        unet(torch.cat([source, targets]), t, ...)  # rows 1.. see row 0's features at the injected taps

A forward hook that returns a tensor replaces the module's output for the rest of the forward, so the injected
value flows on exactly as the source's would. Every hook is removed when the `with` block ends, whatever ended it.
Hooks registered later on the same module (a FeatureCapture opened inside this block) see the injected output.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .hook_set import AttachedHooks, HookSet, module_lookup
from .tap import Tap

INJECTABLE = ("spatial", "tokens")


class FeatureInjection(AttachedHooks):
    """Replace the outputs of `taps` in every row but `source_row` by the source row's, while `enabled`."""

    def __init__(self, model: torch.nn.Module, taps: Iterable[Tap], *, source_row: int = 0):
        self.model, self.taps, self.source_row = model, list(taps), source_row
        bad = [t.id for t in self.taps if t.kind not in INJECTABLE]
        if bad:
            raise ValueError(f"these layers cannot be injected (only module outputs can: res-out, res-increment, "
                             f"vit outputs, q/k/v, ...): {bad}")
        self.enabled = True
        self.injected: dict[str, int] = {}  # layer id -> how many forwards it was injected in (for checks)

    def _attach(self, hooks: HookSet) -> None:
        module = module_lookup(self.model)
        for tap in self.taps:
            hooks.forward_hook(module(tap.module_path), self._hook(tap.id))

    def _hook(self, layer_id: str):
        def hook(_module, _args, output):
            if not self.enabled:
                return None
            x = output[0] if isinstance(output, tuple) else output
            src = x[self.source_row:self.source_row + 1]
            mixed = src.expand_as(x).clone()  # every row the source's (the source row too: unchanged)
            self.injected[layer_id] = self.injected.get(layer_id, 0) + 1
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
        return hook

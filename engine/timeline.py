"""The rows a multi-step run captures (generation, Plug-and-Play, inversion): one recorder, filled step by step.

    timeline = Timeline(capture, steps=len(capture_at), rows_per_step=kept_rows)
    ...  # per denoiser call: capture.enabled / capture.rows set, capture.run(...)
    timeline.record(labels)          # after a captured call: its rows, one label each
    timeline.tensors()               # {id: (rows, ...)} in tap order

The output is allocated once, at the first capture, for every row the run will keep, and each step's rows are
copied into it: no list of per-step tensors and no final concatenation (which would hold the features twice).
"""
from __future__ import annotations

import torch

from ..layer_catalog.hooks import FeatureCapture


class Timeline:
    """finish: what a call's captured features become before they are kept (engine/dit_transforms.DitfRun.finish
    for the ditf preset: the companions it drops are then not kept)."""

    def __init__(self, capture: FeatureCapture, steps: int, rows_per_step: int, finish=None):
        self.capture, self.capacity, self.finish = capture, steps * rows_per_step, finish
        self.labels: list[dict] = []
        self._tensors: dict[str, torch.Tensor] = {}

    def record(self, labels: list[dict]) -> None:
        """Keep the capture's features of the call that just ran (one row per label), then forget them there."""
        filled, n = len(self.labels), len(labels)
        features = self.capture.features if self.finish is None else self.finish(self.capture.features)
        for tap_id, value in features.items():
            if value.shape[0] != n:
                raise RuntimeError(f"{tap_id}: {value.shape[0]} captured rows for {n} labels")
            if tap_id not in self._tensors:
                self._tensors[tap_id] = value.new_empty((self.capacity, *value.shape[1:]))
            self._tensors[tap_id][filled:filled + n].copy_(value)
        self.capture.features = {}
        self.labels += labels

    def tensors(self) -> dict[str, torch.Tensor]:
        return {t.id: self._tensors[t.id][:len(self.labels)] for t in self.capture.taps if t.id in self._tensors}

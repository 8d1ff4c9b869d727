"""The extraction driver both backends share: what DFExtractFeatures (DF_MODEL, diffusers) and DFExtractNative
(ComfyUI's MODEL) do around their denoiser calls, written once.

A backend supplies one function, `draw(seed) -> {layer id: tensor}`: the features of one noise draw (its own VAE
latents noised to the schedule's first timestep with `seeded_eps(seed)`, any denoise_from steps, one capturing
forward). The driver owns the rest: validation, the ensemble of draws and their float32 average, batching into an
output allocated once, and the metadata of DF_FEATURES.
"""
from __future__ import annotations

import torch

from ..layer_catalog.errors import echo


def check_ensemble(ensemble) -> None:
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be an integer >= 1 (noise draws to average), got {echo(ensemble)}")


def capture_dtype(dtype: torch.dtype | None, ensemble: int) -> torch.dtype | None:
    """The dtype a draw captures in: the requested one, or float32 when draws are summed (the requested dtype is
    then applied once, to the average)."""
    return dtype if ensemble == 1 else torch.float32


def ensemble_features(draw, seed: int, ensemble: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The features of draws seed .. seed+ensemble-1, averaged (DIFT's ensemble), in `dtype` (None: float32 for an
    ensemble, the draw's own otherwise)."""
    check_ensemble(ensemble)
    total: dict[str, torch.Tensor] = {}
    for k in range(ensemble):
        for name, value in draw(seed + k).items():
            total[name] = value if name not in total else total[name] + value
    if ensemble > 1:
        total = {k: (v / ensemble).to(dtype or v.dtype) for k, v in total.items()}
    return total


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {echo(batch_size)}")


def fill_batches(n: int, batch_size: int, chunk, on_batch=None) -> dict[str, torch.Tensor]:
    """chunk(start, stop) -> features of images start..stop-1, for chunks of `batch_size`, gathered into one output
    allocated once (a final concatenation would hold every feature twice); on_batch(k) after each chunk."""
    check_batch_size(batch_size)
    out: dict[str, torch.Tensor] = {}
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        part = chunk(start, stop)
        if start == 0:
            out = (dict(part) if stop == n else
                   {k: v.new_empty((n, *v.shape[1:])) for k, v in part.items()})
        if stop != n or start:
            for k, v in part.items():
                out[k][start:stop].copy_(v)
        del part
        if on_batch is not None:
            on_batch(stop - start)
    return out


def features_meta(family, t: int, seed: int, height: int, width: int, input_size: tuple[int, int], layers,
                  ensemble: int, prompt: list, denoise_from: int | None, denoise_steps: int, controlnets: list,
                  **extra) -> dict:
    """DF_FEATURES metadata of an extraction; input_size is the first input image's (width, height)."""
    from .features_io import size_meta

    meta = {"family": family, "t": t, "seed": seed, **size_meta(height, width), "prompt": list(prompt),
            "layers": list(layers), "ensemble": ensemble, **size_meta(input_size[1], input_size[0], "input_"),
            **extra}
    if denoise_from is not None:
        meta.update(denoise_from=denoise_from, denoise_steps=denoise_steps)
    if controlnets:
        meta["controlnets"] = controlnets
    return meta

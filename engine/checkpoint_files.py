"""Reading weight files that may come from anyone: safetensors first, and a pickle only through
torch.load(weights_only=True), so code inside a file never runs. Checkpoints, LoRAs and ControlNets all read here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..layer_catalog.errors import DiffusionFeatureError, echo

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # what a checkpoint, ControlNet or LoRA is


class CheckpointError(DiffusionFeatureError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what the file is or what is missing."""


def read_key_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a single-file checkpoint, reading as little as the format allows."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {echo(str(p))} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{echo(str(p))} is not a valid safetensors file ({e})") from None
    return {k: tuple(v.shape) for k, v in load_pickle_state_dict(p).items()}


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt/.pt state dict through torch.load(weights_only=True): code inside the file never runs."""
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{echo(str(path))} was refused by torch.load(weights_only=True): it is not a plain "
                              f"tensor checkpoint, and we never run the code a pickle may carry ({first}). "
                              "Convert it to .safetensors with a tool you trust.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{echo(str(path))} holds no state dict of tensors")
    return obj

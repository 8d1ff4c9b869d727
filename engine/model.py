"""The loaded model a run works on (DF_MODEL): denoiser, VAE, text encoders, tokenizers, noise schedule, family.

Cloning is cheap and shares the weights: nodes that "change" a model (attach taps, a LoRA) return a clone so the
input model stays as it was for every other branch of a graph.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..layer_catalog import compute_shapes, get_family
from ..layer_catalog.catalog import parse_size
from ..layer_catalog.errors import echo

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {echo(dtype)}; valid dtypes: {', '.join(DTYPES)}")


def parse_device(device) -> torch.device:
    """A torch device this process can use, or a one-sentence ValueError: torch's own answer for `cuda` on a
    CPU-only build is an assertion deep inside the first `.to()`, after the weights were read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {echo(device)} is not a torch device; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"device {echo(device)}: {why} (torch {torch.__version__}); use device cpu, or install "
                             "a CUDA build of torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {echo(device)}: this machine has {count} CUDA device(s); valid: cuda, "
                             f"cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {echo(device)}: MPS (Apple GPU) is not available here; use device cpu")
    return dev


@dataclass
class FeatureModel:
    family: str
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    source: str = ""  # where it came from (a path, or "random weights")
    layers: list[str] | None = None  # taps attached by DFAttachHooks (None: none yet)
    extra: dict = field(default_factory=dict)
    loras: tuple = ()  # (LoraWeights, strength_model, strength_clip), enabled only inside lora_applied (lora.py)

    def __post_init__(self):
        get_family(self.family)

    def clone(self, **changes) -> "FeatureModel":
        """A new FeatureModel sharing every module; `changes` replace fields (e.g. layers=[...])."""
        return dataclasses.replace(self, **changes)

    def lora_applied(self, components=None):
        """A with-block during which this model's LoRA adapters are enabled on its shared modules (none without
        LoRAs); every run of a model that may carry LoRAs goes inside one. See lora.lora_applied."""
        from .lora import COMPONENTS, lora_applied

        return lora_applied(self, COMPONENTS if components is None else components)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def native_size(self) -> int:
        return get_family(self.family).native_size

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        from .schedule import alphas_cumprod

        return alphas_cumprod(self.scheduler_config)

    def show_layers(self, size=None) -> dict[str, list[int]]:
        """Every layer id of this model with its per-sample shape at `size` (default: the family's native size),
        computed on a weightless meta-device copy of the denoiser (no memory, no change to this model)."""
        height, width = parse_size(size if size is not None else self.native_size)
        with torch.device("meta"):
            meta = type(self.denoiser).from_config(self.denoiser.config)
        tokens = self.extra.get("text_tokens", get_family(self.family).text_tokens)
        return compute_shapes(meta, height, width, tokens)

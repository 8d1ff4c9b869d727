"""Prompts through decoder language models (Qwen2.5-VL for Qwen-Image, Qwen3 for Z-Image and Flux.2 Klein,
Mistral3 for Flux.2 dev): one module per model kind (TextEncoder.kind), each encoding prompts exactly as the
family's diffusers pipeline does. engine/prompts.py hands a family to the module of its first encoder's kind."""
from __future__ import annotations

import importlib

MODULES = {"qwen2.5-vl": "qwen25_vl", "qwen3": "qwen3", "mistral3": "mistral3"}  # TextEncoder.kind -> module


def module_of(kind: str):
    """The module of a decoder-LM kind, or None for the CLIP / T5 kinds."""
    name = MODULES.get(kind)
    return None if name is None else importlib.import_module(f".{name}", __name__)


def encoder_for(kind: str):
    """The encode(model, prompts) -> Conditioning of a decoder-LM kind, or None for the CLIP / T5 kinds."""
    module = module_of(kind)
    return None if module is None else module.encode


def check_encoders(family: str, specs, encoders) -> None:
    """Each decoder-LM text encoder must be of its kind's model type (a folder's text_encoder/ of another family's
    model would otherwise fail deep inside a forward, or silently encode with the wrong model)."""
    for spec, encoder in zip(specs, encoders):
        module = module_of(spec.kind)
        if module is None:
            continue
        valid = getattr(module, "MODEL_TYPES", None)
        if valid is None:
            continue
        got = getattr(getattr(encoder, "config", None), "model_type", None)
        if got not in valid:
            raise ValueError(f"{family}'s text encoder must be a {spec.kind} model (model_type "
                             f"{' or '.join(map(repr, valid))}), got {type(encoder).__name__} (model_type {got!r})")

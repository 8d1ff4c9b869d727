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

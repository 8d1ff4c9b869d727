"""Prompts through decoder language models (Qwen2.5-VL for Qwen-Image, Qwen3 for Z-Image and Flux.2 Klein,
Mistral3 for Flux.2 dev): one module per model kind (TextEncoder.kind), each encoding prompts exactly as the
family's diffusers pipeline does. engine/prompts.py hands a family to the module of its first encoder's kind."""
from __future__ import annotations

import importlib

import torch

MODULES = {"qwen2.5-vl": "qwen25_vl", "qwen3": "qwen3", "mistral3": "mistral3"}  # TextEncoder.kind -> module


def module_of(kind: str):
    """The module of a decoder-LM kind, or None for the CLIP / T5 kinds."""
    name = MODULES.get(kind)
    return None if name is None else importlib.import_module(f".{name}", __name__)


def encoder_for(kind: str):
    """The encode(model, prompts) -> Conditioning of a decoder-LM kind, or None for the CLIP / T5 kinds."""
    module = module_of(kind)
    return None if module is None else module.encode


def hidden_states(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
    """One run of the language model: the hidden states of `layers` (TextEncoder.layers) side by side per token."""
    device = next(encoder.parameters()).device
    out = encoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True,
                  use_cache=False)
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1)


def real_tokens(states: torch.Tensor, attention_mask: torch.Tensor, drop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's real tokens (its attention mask), its first `drop` left out, zero-padded to the batch's longest:
    (rows (B, longest, D), mask (B, longest), 1 at real tokens)."""
    real = [row[m.bool()][drop:] for row, m in zip(states, attention_mask.to(states.device))]
    longest = max(len(r) for r in real)
    rows = states.new_zeros(len(real), longest, states.shape[-1])
    for i, r in enumerate(real):
        rows[i, :len(r)] = r
    mask = torch.arange(longest, device=states.device)[None] < torch.tensor([len(r) for r in real],
                                                                           device=states.device)[:, None]
    return rows, mask.long()

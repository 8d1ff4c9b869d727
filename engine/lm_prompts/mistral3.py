"""Prompts through Mistral3 (Flux.2 dev's Mistral Small 3.1), as diffusers' Flux2Pipeline.encode_prompt makes them:
each prompt a conversation of the pipeline's system message and one user message (text parts, "[IMG]" removed),
the batch rendered by the tokenizer's chat template to max_sequence_length (padded, truncated), run with its
padding mask, and the hidden states of the family's layers (TextEncoder.layers; Flux.2 dev: 10, 20, 30) side by
side per token, padding included (the transformer sees all 512 tokens, unmasked)."""
from __future__ import annotations

import torch

from ...layer_catalog import get_family
from ..conditioning import Conditioning
from . import hidden_states



def conversations(prompts: list[str]) -> list[list[dict]]:
    """The pipeline's conversations (its format_input without images)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
             {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]


@torch.no_grad()
def encode(model, prompts: list[str]) -> Conditioning:
    fam = get_family(model.family)
    spec = fam.text_encoders[0]
    if not model.tokenizers or not model.text_encoders:
        raise ValueError(f"a {fam.name} model needs its Mistral3 text encoder and its tokenizer (or processor)")
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    inputs = tokenizer.apply_chat_template(conversations(prompts), add_generation_prompt=False, tokenize=True,
                                           return_dict=True, return_tensors="pt", padding="max_length",
                                           truncation=True, max_length=fam.text_tokens)
    states = hidden_states(encoder, inputs["input_ids"], inputs["attention_mask"], spec.layers)
    return Conditioning(states.to(model.dtype), prompts=prompts)

"""Prompts through Qwen3 (Z-Image's text encoder), as diffusers' ZImagePipeline.encode_prompt makes them: each prompt
put in the tokenizer's chat template as one user message (generation prompt on, thinking enabled), tokenized to
max_sequence_length (padded, truncated), run with its padding mask, and the hidden states of the family's layers
(TextEncoder.layers; Z-Image: the second-to-last) side by side, real tokens only. Flux.2 Klein's variant
(Flux2KleinPipeline) turns thinking off and keeps all max_sequence_length tokens, padding included, unmasked
(TextEncoder.thinking / keep_padding).

The pipeline hands the transformer a list of per-prompt embeddings of their own lengths. A Conditioning holds one
tensor, so the prompts' real tokens are put first and zero-padded to the longest, with encoder_attention_mask
marking the real ones; the family's network_inputs cuts each row back to its real tokens.
"""
from __future__ import annotations

import torch

from ...layer_catalog import get_family
from ..conditioning import Conditioning
from . import hidden_states, real_tokens

# The template a Qwen3 tokenizer without its own (ComfyUI's bundled Qwen vocabulary, random weights) is given: what
# Qwen3's own template renders for one user message with a generation prompt.
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}"
                 "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def templated(tokenizer, prompt: str, thinking: bool = True) -> str:
    """The prompt as ZImagePipeline (thinking on) or Flux2KleinPipeline (off) puts it before tokenizing."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


@torch.no_grad()
def encode(model, prompts: list[str]) -> Conditioning:
    fam = get_family(model.family)
    if not model.tokenizers or not model.text_encoders:
        raise ValueError(f"a {fam.name} model needs its Qwen3 text encoder and tokenizer")
    spec = fam.encoders_of(model.text_encoders)[0]
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    inputs = tokenizer([templated(tokenizer, p, spec.thinking) for p in prompts], padding="max_length",
                       max_length=fam.text_tokens, truncation=True, return_tensors="pt")
    states = hidden_states(encoder, inputs.input_ids, inputs.attention_mask, spec.layers)
    if spec.keep_padding:
        return Conditioning(states.to(model.dtype), prompts=prompts)
    rows, real = real_tokens(states, inputs.attention_mask)
    return Conditioning(rows.to(model.dtype), encoder_attention_mask=real, prompts=prompts)

"""Prompts through Qwen2.5-VL (Qwen-Image's text encoder), exactly as QwenImagePipeline.encode_prompt: each prompt
wrapped in the family's chat template, tokenized (at most TOKENIZER_MAX tokens after the template's prefix), the
language model's last hidden state (TextEncoder.layers) of the prompt's real tokens with the template's first
`drop` tokens left out, so each prompt hands its own length; a batch is zero-padded to its longest prompt with a
mask (1 real, 0 padding), then cut to the family's text_tokens (max_sequence_length 512). A mask of only ones (a
single prompt, or prompts of one length) is dropped, as the pipeline drops it: the network then sees every token."""
from __future__ import annotations

from ...layer_catalog import get_family
from ..conditioning import Conditioning
from . import hidden_states, real_tokens

TOKENIZER_MAX = 1024  # QwenImagePipeline's tokenizer_max_length: prompt tokens read before the 512 cut


def encode(model, prompts: list[str]) -> Conditioning:
    fam = get_family(model.family)
    spec, tokenizer, encoder = fam.text_encoders[0], model.tokenizers[0], model.text_encoders[0]
    tokens = tokenizer([spec.template.format(p) for p in prompts], max_length=TOKENIZER_MAX + spec.drop,
                       padding=True, truncation=True, return_tensors="pt")
    hidden = hidden_states(encoder, tokens.input_ids, tokens.attention_mask, spec.layers)
    embeds, mask = real_tokens(hidden, tokens.attention_mask, spec.drop)
    embeds, mask = embeds[:, :fam.text_tokens].to(model.dtype), mask[:, :fam.text_tokens]
    return Conditioning(embeds, encoder_attention_mask=None if mask.all() else mask, prompts=list(prompts))

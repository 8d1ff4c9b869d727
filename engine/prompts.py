"""Prompt encoding per family, with long prompts chunked instead of truncated.

- sd15 / sd21: the text encoder's last hidden state (SD2.x checkpoints ship a 23-layer OpenCLIP-H, which is the
  penultimate layer of the original with the final norm, as SD2 was trained).
- sdxl / playground-v2: both encoders' penultimate hidden states concatenated (768 + 1280 = 2048) and the second
  encoder's pooled projection; the time ids are added at extraction, from the real image size.
- pixart-sigma: T5 with 300 tokens and its attention mask.
- flux: T5's tokens (512 a window, unmasked, as FluxPipeline encodes them) and CLIP-L's pooled embedding (the
  families whose encoders' `use` is "pooled": that encoder gives only the pooled_projections).
- sd3: as StableDiffusion3Pipeline.encode_prompt, CLIP-L's and CLIP-G's penultimate hidden states side by side (77
  tokens a window), zero-padded to T5's width, then T5's tokens (256 a window, unmasked) after them along the
  tokens; zeros in T5's place for a model without T5 (the encoders whose `use` is "both" give hidden states and
  pooled embeddings: the pooled_projections are both CLIPs' side by side).

A prompt longer than the window (75 tokens + BOS/EOS for CLIP, 300 for T5) is split into windows, each encoded on
its own and concatenated along the token axis; for SDXL both encoders get the same windows and the pooled
embedding is the first window's. Prompts of one batch with different lengths are padded with windows of the empty
prompt, so their token counts match.
"""
from __future__ import annotations

import torch

from ..layer_catalog import get_family
from .conditioning import Conditioning
from .lm_prompts import encoder_for
from .lora import TEXT_COMPONENTS, lora_applied

CLIP_WINDOW = 75
T5_WINDOW = 300


def _clip_windows(tokenizer, prompt: str) -> list[list[int]]:
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = [ids[i:i + CLIP_WINDOW] for i in range(0, len(ids), CLIP_WINDOW)] or [[]]
    return [[bos, *w, eos] + [pad] * (CLIP_WINDOW - len(w)) for w in windows]


def _t5_windows(tokenizer, prompt: str, window: int = T5_WINDOW) -> list[tuple[list[int], list[int]]]:
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    body = window - 1
    windows = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
    return [([*w, eos] + [pad] * (body - len(w)), [1] * (len(w) + 1) + [0] * (body - len(w))) for w in windows]


def _pad_to_same_length(per_prompt: list[list], empty) -> list[list]:
    most = max(len(w) for w in per_prompt)
    return [w + [empty] * (most - len(w)) for w in per_prompt]


def _run_clip(encoder, windows: list[list[int]], penultimate: bool):
    """Encode each window: (hidden (1, 77 * n, D), pooled of the first window or None)."""
    device = next(encoder.parameters()).device
    ids = torch.tensor(windows, device=device)
    out = encoder(ids, output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out[0]
    pooled = getattr(out, "text_embeds", None)
    return hidden.reshape(1, -1, hidden.shape[-1]), (pooled[:1] if pooled is not None else None)


@torch.no_grad()
def encode_prompt(model, prompts) -> Conditioning:
    """Encode one prompt (for the whole batch) or a list (one per image). Returns a Conditioning on the model's
    device, in the denoiser's dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a list of strings (an empty string is allowed)")
    with lora_applied(model, TEXT_COMPONENTS):  # a LoRA's text-encoder part, for this call only
        return _encode(model, prompts)


def _encode(model, prompts: list[str]) -> Conditioning:
    fam, dtype = get_family(model.family), model.dtype
    language_model = encoder_for(fam.encoders_of(model.text_encoders)[0].kind)
    if language_model is not None:
        return language_model(model, prompts)
    if fam.text_encoders[0].kind == "t5":
        return _encode_t5(model, prompts)
    if any(e.use == "pooled" for e in fam.text_encoders):
        return _encode_pooled_and_t5(model, prompts)
    if any(e.use == "both" for e in fam.text_encoders):
        return _encode_clips_and_t5(model, prompts)
    n = len(fam.text_encoders)
    tokenizers, encoders = model.tokenizers[:n], model.text_encoders[:n]
    if len(tokenizers) != n or len(encoders) != n:
        raise ValueError(f"a {fam.name} model needs {n} text encoder(s) and tokenizer(s)")
    hidden, pooled = _clip_states(tokenizers, encoders, prompts, fam.penultimate_text)
    states = torch.cat(hidden, dim=-1).to(dtype)
    added = {"text_embeds": pooled[-1].to(dtype)} if fam.pooled_text else None
    if fam.pooled_text and not pooled:
        raise ValueError(f"{fam.name}'s last text encoder must be a CLIPTextModelWithProjection (it gives the "
                         "pooled embedding)")
    return Conditioning(states, added_cond_kwargs=added, prompts=prompts)


def _clip_states(tokenizers, encoders, prompts: list[str], penultimate: bool) -> tuple[list, list]:
    """Each CLIP encoder's hidden states (B, 77 * windows, D) of the prompts, on the same windows, and the pooled
    embeddings (B, P) of the first window of those that give one (CLIPTextModelWithProjection)."""
    empty = _clip_windows(tokenizers[0], "")[0]
    # One window list per prompt, from the first tokenizer; the second CLIP tokenizer differs only in padding.
    per_prompt = _pad_to_same_length([_clip_windows(tokenizers[0], p) for p in prompts], empty)
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        pad_from, pad_to = tokenizers[0].pad_token_id, tokenizer.pad_token_id
        rows = [_run_clip(encoder, [_repad(w, tokenizer.eos_token_id, pad_from, pad_to) for w in windows],
                          penultimate=penultimate) for windows in per_prompt]
        hidden.append(torch.cat([h for h, _ in rows]))
        if rows[0][1] is not None:
            pooled.append(torch.cat([p for _, p in rows]))
    return hidden, pooled


def _repad(window: list[int], eos: int, pad_from: int, pad_to: int) -> list[int]:
    """Re-pad a window made with one tokenizer's pad id for a tokenizer that pads with another."""
    if pad_from == pad_to:
        return window
    end = window.index(eos, 1) + 1
    return window[:end] + [pad_to] * (len(window) - end)


def _encode_t5(model, prompts: list[str]) -> Conditioning:
    if not model.tokenizers or not model.text_encoders:
        raise ValueError(f"a {model.family} model needs its T5 text encoder and tokenizer")
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    empty = _t5_windows(tokenizer, "")[0]
    per_prompt = _pad_to_same_length([_t5_windows(tokenizer, p) for p in prompts], empty)
    device = next(encoder.parameters()).device
    states, masks = [], []
    for windows in per_prompt:
        ids = torch.tensor([w for w, _ in windows], device=device)
        mask = torch.tensor([m for _, m in windows], device=device)
        out = encoder(ids, attention_mask=mask)[0]
        states.append(out.reshape(1, -1, out.shape[-1]))
        masks.append(mask.reshape(1, -1))
    return Conditioning(torch.cat(states).to(model.dtype), added_cond_kwargs={"resolution": None,
                                                                              "aspect_ratio": None},
                        encoder_attention_mask=torch.cat(masks), prompts=prompts)


def _encode_pooled_and_t5(model, prompts: list[str]) -> Conditioning:
    """T5's hidden states as the tokens (windows of the family's text_tokens, run without a mask as FluxPipeline
    runs them) and the pooled embedding of the first window of each "pooled" CLIP encoder, side by side."""
    fam = get_family(model.family)
    n = len(fam.text_encoders)
    if len(model.tokenizers) < n or len(model.text_encoders) < n:
        raise ValueError(f"a {fam.name} model needs {n} text encoders and tokenizers "
                         f"({', '.join(e.kind for e in fam.text_encoders)})")
    pooled, states = [], []
    for spec, tokenizer, encoder in zip(fam.text_encoders, model.tokenizers, model.text_encoders):
        device = next(encoder.parameters()).device
        if spec.use == "pooled":
            rows = [_clip_windows(tokenizer, p)[0] for p in prompts]
            out = encoder(torch.tensor(rows, device=device), output_hidden_states=False)
            pooled.append(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
            continue
        states.append(_t5_unmasked(tokenizer, encoder, prompts, spec.window or fam.text_tokens))
    return Conditioning(torch.cat(states, dim=1).to(model.dtype), pooled=torch.cat(pooled, dim=-1).to(model.dtype),
                        prompts=prompts)


def _t5_unmasked(tokenizer, encoder, prompts: list[str], window: int) -> torch.Tensor:
    """T5's hidden states (B, window * windows, D) of the prompts, each window run without its padding mask (as
    FluxPipeline and StableDiffusion3Pipeline run T5)."""
    device = next(encoder.parameters()).device
    empty = _t5_windows(tokenizer, "", window)[0]
    per_prompt = _pad_to_same_length([_t5_windows(tokenizer, p, window) for p in prompts], empty)
    rows = []
    for windows in per_prompt:
        out = encoder(torch.tensor([w for w, _ in windows], device=device))[0]
        rows.append(out.reshape(1, -1, out.shape[-1]))
    return torch.cat(rows)


def _encode_clips_and_t5(model, prompts: list[str]) -> Conditioning:
    """The "both" CLIP encoders' hidden states side by side, zero-padded to the denoiser's text width, then the
    other encoders' (T5's) tokens after them, zeros of its window for an optional encoder the model lacks; the
    pooled embedding is the CLIPs' side by side (StableDiffusion3Pipeline.encode_prompt)."""
    fam = get_family(model.family)
    specs = fam.text_encoders
    n = sum(e.use == "both" for e in specs)
    needed = n + sum(not e.optional for e in specs[n:])
    if len(model.tokenizers) < needed or len(model.text_encoders) < needed:
        raise ValueError(f"a {fam.name} model needs {needed} text encoders and tokenizers "
                         f"({', '.join(e.kind for e in specs[:needed])}"
                         + (f"; {', '.join(e.kind for e in specs[needed:])} optional)" if needed < len(specs) else ")"))
    hidden, pooled = _clip_states(model.tokenizers[:n], model.text_encoders[:n], prompts, fam.penultimate_text)
    if len(pooled) != n:
        raise ValueError(f"{fam.name}'s CLIP text encoders must be CLIPTextModelWithProjection (each gives a pooled "
                         "embedding)")
    width = model.denoiser.config.joint_attention_dim  # the width the pipeline pads to (T5's, or its zeros')
    clips = torch.cat(hidden, dim=-1)
    tokens = [torch.nn.functional.pad(clips, (0, width - clips.shape[-1]))]
    for i, spec in enumerate(specs[n:], start=n):
        window = spec.window or fam.text_tokens
        if i < len(model.text_encoders):
            tokens.append(_t5_unmasked(model.tokenizers[i], model.text_encoders[i], prompts, window))
        else:
            tokens.append(clips.new_zeros(clips.shape[0], window, width))
    return Conditioning(torch.cat(tokens, dim=1).to(model.dtype), pooled=torch.cat(pooled, dim=-1).to(model.dtype),
                        prompts=prompts)

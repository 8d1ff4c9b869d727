"""An attention processor that also hands out its softmax probabilities.

SDPA never materialises the probabilities, so a map can only be had by computing attention explicitly. This
processor does that and nothing else differently; it is installed only on the attention modules whose maps were
asked for, so every other module keeps its fast processor (SDPA, or xformers on CUDA).
"""
from __future__ import annotations

from typing import Callable

import torch


class MapRecordingProcessor:
    """Computes diffusers' Attention exactly as AttnProcessor2_0 does, with explicit softmax(q k^T * scale).

    `record(probs)` receives the probabilities shaped (B, heads, Nq, Nk), in the attention's compute dtype.
    """

    def __init__(self, record: Callable[[torch.Tensor], None]):
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_len = context.shape[0], context.shape[1]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        # The map can be GiBs (SD1.5's first level: 8 x 4096 x 4096 per image), so it is built in one buffer:
        # scale, mask and a numerically stable softmax all happen in place, and the probabilities reuse the scores.
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(attn.scale)
        if attention_mask is not None:
            scores.add_(attention_mask)
        if attn.upcast_softmax:
            scores = scores.float()
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        probs = scores.div_(scores.sum(dim=-1, keepdim=True, dtype=torch.float32)).to(dtype)  # fp32 sums, as softmax
        del scores
        self.record(probs)

        hidden_states = torch.matmul(probs, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

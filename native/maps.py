"""Attention maps on ComfyUI's CrossAttention without touching its attention.

ComfyUI's `optimized_attention` never materialises the probabilities, and its attn1/attn2 "replace" patches are a
single slot per block that other packs (IPAdapter, SAG, PAG) use. So a map is recomputed from the module's own
projections instead: forward hooks on that CrossAttention's `to_q` and `to_k` keep their outputs, and when both
have fired, softmax(q k^T / sqrt(d_head)) is built per head. Only the modules whose maps were asked for get these
hooks; every other attention runs untouched.

What is recorded is what `to_q` / `to_k` produced. If another pack's patch changes the attention's inputs before
the projections (an attn2_patch that edits the context, IPAdapter-style extra tokens fed through to_k), the map is
over those tokens; a replace patch that computes attention on other keys than to_k's output is not seen.
"""
from __future__ import annotations

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head from projections shaped (B, N, heads * d): (B, heads, Nq, Nk).

    Computed as the diffusers side's MapRecordingProcessor does (one buffer, in-place scale and stable softmax,
    float32 sums), so the two backends give the same numbers; `upcast` computes scores in float32 (ComfyUI's
    attn_precision=float32, diffusers' upcast_attention). The result has q's dtype.
    """
    b, nq, inner = q.shape
    if inner % heads:
        raise ValueError(f"projection width {inner} is not a multiple of {heads} heads")
    d = inner // heads
    dtype = q.dtype
    qh = q.reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2)
    if upcast:
        qh, kh = qh.float(), kh.float()
    scores = torch.matmul(qh, kh.transpose(-1, -2)).mul_(d ** -0.5)
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True, dtype=torch.float32)).to(dtype)


"""Attention maps from an attention module's own projections, on every backend, without touching its attention.

Fused kernels (SDPA, xformers, ComfyUI's optimized_attention) never materialise the probabilities, and swapping an
attention's processor or forward would fork code that keeps changing upstream (and ComfyUI's attn replace patches
are a single slot other packs use). So a map is rebuilt from what the module computes anyway: forward hooks on its
query and key projections keep their outputs, and once both have fired softmax(q k^T / sqrt(d_head)) is built per
head (plus the module's additive attention mask, where diffusers passes one: PixArt's text padding). Only modules
whose maps were asked for get these hooks; every attention still runs its own kernel.

What is recorded is what the projections produced: a patch of another pack that edits the attention's inputs
before them is seen, one that computes attention on other keys than the key projection's output is not.
"""
from __future__ import annotations

import torch


def attention_params(attention: torch.nn.Module) -> tuple[int, bool]:
    """(heads, upcast) of an attention module of either backend: diffusers' Attention (`heads`, `upcast_attention`
    / `upcast_softmax`), ComfyUI's CrossAttention (`heads`, `attn_precision`), its PixArt attention (`num_heads`) or
    its Lumina2 / Z-Image JointAttention (`n_local_heads`)."""
    heads = getattr(attention, "heads", None)
    for name in ("num_heads", "n_local_heads"):
        if not isinstance(heads, int):
            heads = getattr(attention, name, None)
    if not isinstance(heads, int):
        raise TypeError(f"a {type(attention).__name__} does not say its number of heads; cannot build its maps")
    upcast = bool(getattr(attention, "upcast_attention", False) or getattr(attention, "upcast_softmax", False)
                  or getattr(attention, "attn_precision", None) == torch.float32)
    return heads, upcast


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d); a tensor already per head, (B, heads, N, d), is left as it is."""
    if x.dim() == 4:
        return x
    b, n, inner = x.shape
    if inner % heads:
        raise ValueError(f"projection width {inner} is not a multiple of {heads} heads")
    return x.reshape(b, n, heads, inner // heads).transpose(1, 2)


def _diffusers_rope(q: torch.Tensor, k: torch.Tensor, emb):
    from diffusers.models.embeddings import apply_rotary_emb  # the function diffusers' Flux attention calls

    return apply_rotary_emb(q, emb, sequence_dim=2), apply_rotary_emb(k, emb, sequence_dim=2)


def _complex_rope(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor):
    """diffusers' Z-Image: consecutive pairs of each head's channels as complex numbers times its per-token
    complex frequencies (B, N, d / 2), computed in float32 and returned in q's dtype, as its attention processor
    does (a function local to that processor, so it cannot be imported)."""
    def rotate(x):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.unsqueeze(1)).flatten(3).type_as(x)
    return rotate(q), rotate(k)


def _matrix_rope(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor):
    """ComfyUI's Lumina2 / Z-Image (NextDiT): each pair of channels times a 2x2 rotation per token, the
    embedding as its blocks get it, (B, N, 1, d / 2, 2, 2) (tokens before heads)."""
    rot = freqs.transpose(1, 2)  # (B, 1, N, d / 2, 2, 2), as q and k are (B, heads, N, d) here

    def rotate(x):
        pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)
    return rotate(q), rotate(k)


# Rotary embeddings by the name a Tap gives (its `rope`): each the model's own function, applied to q and k
# (B, heads, N, d) with the embedding the model passed. The native backend registers ComfyUI's Flux one ("comfy").
ROPES = {"diffusers": _diffusers_rope, "complex": _complex_rope, "matrix": _matrix_rope}


def apply_rope(kind: str, q: torch.Tensor, k: torch.Tensor, emb):
    if kind not in ROPES:
        raise ValueError(f"no rotary embedding {kind!r} is registered (known: {', '.join(ROPES)})")
    return ROPES[kind](q, k, emb)


def head_probs(qh: torch.Tensor, kh: torch.Tensor, upcast: bool = False,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) for per-head q (B, heads, Nq, d) and k (B, heads, Nk, d), in one buffer."""
    dtype, d = qh.dtype, qh.shape[-1]
    if upcast:
        qh, kh = qh.float(), kh.float()
    scores = torch.matmul(qh, kh.transpose(-1, -2)).mul_(d ** -0.5)
    if mask is not None:
        scores.add_(mask.to(scores.dtype))
    if scores.requires_grad:  # gradient mode: autograd keeps what the in-place softmax below would overwrite
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True, dtype=torch.float32)).to(dtype)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, upcast: bool = False,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) per head from projections shaped (B, N, heads * d): (B, heads, Nq, Nk).

    The map can be GiBs (SD1.5's first level: 8 x 4096 x 4096 per image), so it is built in one buffer: scale, mask
    and a numerically stable softmax happen in place, with float32 sums as torch's softmax. `upcast` computes the
    scores in float32 (diffusers' upcast_attention, ComfyUI's attn_precision=float32). `mask`: an additive bias
    broadcastable to (B, heads, Nq, Nk). The result has q's dtype.
    """
    return head_probs(split_heads(q, heads), split_heads(k, heads), upcast, mask)

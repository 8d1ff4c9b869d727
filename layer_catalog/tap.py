"""What a tap is: where one layer id's tensor appears in a network, on either backend, and how it is read. Kept
apart from the id -> tap rules (taps.py) so that the families' own layouts can build taps without an import circle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# How a tap's tensor is read:
#   input     a module's input, already shaped (B, C, H, W) (the denoiser's own sample: module_path "")
#   spatial   a module output already shaped (B, C, H, W) (or a tuple / output object whose first item is)
#   tokens    image tokens (B, N, C); reshaped to (B, C, h, w) on the grid of `grid_path` (or the capture's grid)
#   packed    patchified tokens (B, N, C * p * p) as diffusers' Flux takes them; unpacked to (B, C, h * p, w * p)
#   text      text tokens (B, T, C) of a transformer's text stream; stored as (B, C, T)
#   map       softmax attention probabilities (B, heads, Nq, Nk), from the outputs of module_path (q) and key_path (k)
#   vector    one vector per sample (B, ..., C) stored as (B, C), never pooled: a block's AdaLN modulation
KINDS = ("input", "spatial", "tokens", "packed", "text", "map", "vector")


@dataclass(frozen=True)
class Tap:
    """Where a layer id's tensor appears in a network, on either backend: paths into that network's module tree.

    part: (i, n) takes the i-th of n equal slices of the output's last axis (fused qkv / kv projections); key_part
    likewise for the key. attention_path: the attention module of a map (its heads, upcast and mask).

    Diffusion transformers add (all optional): `at="input"` reads the module's input instead of its output, `item`
    picks one of several (an output tuple's index; an input as (keyword, position)); `layout` merges per-head
    tensors ("bnhd": (B, N, heads, d), "bhnd": (B, heads, N, d)) to (B, N, heads * d); `columns` (start, stop) of
    the last axis (one part of a fused linear whose parts differ in width); `span` "text" or "image" takes that
    part of a joint [text, image] sequence whose text length is the token count entering `text_path`; "grid"
    the first h * w tokens of an image stream (the generated image's; reference images' tokens may follow them).
    Joint maps (text_path set) gather q and k of the image stream (module_path, key_path) and of the text stream
    (text_query_path, text_key_path; None where one joint sequence carries both), apply the model's rotary
    embedding (`rope`: whose function, read from argument `rope_arg` of module `rope_path`) and keep the image
    queries' probabilities at the `span` keys: "text" for cross-maps, "image" for self-maps. `text_mask_arg`: where
    the model takes a text padding mask ((B, T), true / 1 at real tokens; an argument of `rope_path`'s module): padded
    text keys then get no probability, as in the model's own attention.
    Z-Image adds: `text_item` reads the text length from that input of `text_path` (a (keyword, position); a list of
    per-sample (T, C) captions counts T) instead of its first input's second axis; `image_first` says the joint
    sequence is [image, text] (diffusers' Z-Image) instead of [text, image]; `pad_multiple` says each part of the
    joint sequence is padded to a multiple of that many tokens (Z-Image: 32), so a part's tokens start after the
    padded length of the part before it and the padding tokens are in no span. `text_kept_arg`: where `text_path`'s
    module takes a (B, T) mask of the caption tokens the network keeps (ComfyUI v0.3.64's NextDiT: its
    attention_mask, whose row sums place the image after the real caption tokens); the text length is then that
    sum, one for the whole batch. `norm_path`: an RMSNorm module whose
    weights the read applies per head (of its width) after `columns`, for q / k read from a fused projection where
    the model never calls its norm modules (newer ComfyUIs' Lumina2 / Z-Image); a map's key takes `key_columns` and
    `key_norm_path` likewise.
    Reference images (Flux Kontext, Flux.2, Qwen-Image-Edit: their tokens follow the generated image's in the image
    stream): `ref_read` says where the network's call shows them, (form, keyword, position) of its input:
    "latents" a list of reference latents (B, C, [1,] h, w), each padded to `grid_divisor` (ComfyUI's ref_latents);
    "shapes" per sample a list of (frames, h, w) token grids, the generated image's first (diffusers' img_shapes);
    "ids" the image tokens' positions (N, a) or (B, N, a) after the generated image's, axis 0 naming the image and
    axes 1 / 2 its row / column (diffusers' img_ids). `ref` = I reads reference I's tokens instead of the generated
    image's: after the generated image's h * w tokens and the earlier references' (span "grid": in the image stream;
    "image": in the joint [text, image, references] sequence), on that reference's own grid.
    """

    id: str
    module_path: str  # "" is the network itself
    kind: str
    grid_path: str | None = None  # module whose input (B, C, H, W) gives the token grid
    grid_divisor: int = 1  # patchified inputs: grid = input size // patch size
    part: tuple[int, int] | None = None
    key_path: str | None = None
    key_part: tuple[int, int] | None = None
    attention_path: str | None = None
    at: str = "output"
    item: int | tuple[str, int] | None = None
    layout: str = "bnc"
    columns: tuple[int, int] | None = None
    span: str | None = None
    text_path: str | None = None
    text_query_path: str | None = None
    text_key_path: str | None = None
    rope: str | None = None
    rope_path: str | None = None
    rope_arg: tuple[str, int] | None = None
    text_mask_arg: tuple[str, int] | None = None
    text_item: tuple[str, int] | None = None
    image_first: bool = False
    pad_multiple: int = 1
    norm_path: str | None = None
    key_columns: tuple[int, int] | None = None
    key_norm_path: str | None = None
    ref_read: tuple[str, str, int] | None = None
    ref: int | None = None
    text_kept_arg: tuple[str, int] | None = None


def is_unet(model: torch.nn.Module) -> bool:
    return hasattr(model, "down_blocks") and hasattr(model, "conv_in")


def is_pixart(model: torch.nn.Module) -> bool:
    return hasattr(model, "transformer_blocks") and hasattr(model, "adaln_single") and not is_unet(model)

"""The layer-id grammar: the one place where ids are parsed and written.

The names are exactly those of the reference project (generic-diffusion-feature), so its layer configs work here.
A parsed id is a `LayerId`; `format_id(parse_id(s)) == s` for every legal id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DiffusionFeatureError, echo

# Taps inside one transformer block, in the order they fire during a forward.
BLOCK_SUFFIXES = ("self-q", "self-k", "self-v", "self-map", "cross-q", "cross-map", "ffn-inner", "out")
# SD3.5 medium's second, image-only self-attention (its first blocks' attn2): its own taps under "attn2-".
DIT_SECOND_SUFFIXES = ("attn2-norm-out", "attn2-q", "attn2-k", "attn2-v", "attn2-self-map", "attn2-attn-out")
MAP_SUFFIXES = ("self-map", "cross-map", "attn2-self-map")
RES_SUFFIXES = ("increment", "out")
UNET_ENDS = ("in", "after-conv-in", "out")
# Diffusion transformers (Flux, SD3): taps of one block's image stream, in forward order; each but the maps and the
# second attention's also exists for the text stream as "txt-<suffix>". Maps are image queries over text keys
# (cross) / image keys (self).
DIT_SUFFIXES = ("in", "norm-out", "q", "k", "v", "cross-map", "self-map", "attn-out", *DIT_SECOND_SUFFIXES,
                "ffn-inner", "out")
DIT_TEXT_SUFFIXES = tuple(f"txt-{s}" for s in DIT_SUFFIXES if s not in MAP_SUFFIXES and s not in DIT_SECOND_SUFFIXES)
DIT_ENDS = ("in", "embed", "out")
# Z-Image's refiners: one-stream blocks before the joint ones. Refiner R's image stream (its noise refiner R, image
# tokens only, hence self-maps only) and text stream ("txt-": its context refiner R, text tokens only, no maps) never
# attend to each other; their taps mean what the same suffixes mean in a block.
DIT_REFINER_SUFFIXES = tuple(s for s in DIT_SUFFIXES if s != "cross-map" and s not in DIT_SECOND_SUFFIXES)
DIT_REFINER_TEXT_SUFFIXES = tuple(f"txt-{s}" for s in DIT_REFINER_SUFFIXES if s not in MAP_SUFFIXES)
# Reference images (Flux Kontext, Flux.2 editing, Qwen-Image-Edit): their tokens follow the generated image's in the
# image stream; `vit-block{B}-ref{I}-<suffix>` is reference I's part of that block's image-stream tensor (I = 0 for
# the first), on the reference's own grid. No maps: a map's queries are the generated image's.
DIT_REF_SUFFIXES = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")

_SUF = "|".join(re.escape(s) for s in BLOCK_SUFFIXES)
_FLAT_SUF = "|".join(re.escape(s) for s in sorted({*BLOCK_SUFFIXES, *DIT_SUFFIXES, *DIT_TEXT_SUFFIXES}, key=len,
                                                   reverse=True))
_REFINER_SUF = "|".join(re.escape(s) for s in sorted({*DIT_REFINER_SUFFIXES, *DIT_REFINER_TEXT_SUFFIXES}, key=len,
                                                    reverse=True))
_REF_SUF = "|".join(re.escape(s) for s in sorted(DIT_REF_SUFFIXES, key=len, reverse=True))
_PATTERNS = (
    ("dit", re.compile(r"dit-(?P<suffix>in|embed|out)")),
    ("unet", re.compile(r"unet-(?P<suffix>in|after-conv-in|out)")),
    ("res", re.compile(r"(?P<stage>down|up)-level(?P<level>\d+)-repeat(?P<repeat>\d+)-res-(?P<suffix>increment|out)")),
    ("res", re.compile(r"(?P<stage>mid)-repeat(?P<repeat>\d+)-res-(?P<suffix>increment|out)")),
    ("vit", re.compile(r"(?P<stage>down|up)-level(?P<level>\d+)-repeat(?P<repeat>\d+)-vit-out")),
    ("vit", re.compile(r"(?P<stage>mid)-vit-out")),
    ("block", re.compile(rf"(?P<stage>down|up)-level(?P<level>\d+)-repeat(?P<repeat>\d+)-vit-block(?P<block>\d+)-(?P<suffix>{_SUF})")),
    ("block", re.compile(rf"(?P<stage>mid)-vit-block(?P<block>\d+)-(?P<suffix>{_SUF})")),
    ("block", re.compile(rf"vit-block(?P<block>\d+)-(?P<suffix>{_FLAT_SUF})")),
    ("block", re.compile(rf"vit-block(?P<block>\d+)-ref(?P<ref>\d+)-(?P<suffix>{_REF_SUF})")),
    ("refiner", re.compile(rf"vit-refiner(?P<block>\d+)-(?P<suffix>{_REFINER_SUF})")),
    ("sampler", re.compile(r"(?P<stage>down)-level(?P<level>\d+)-(?P<suffix>downsampler)-out")),
    ("sampler", re.compile(r"(?P<stage>up)-level(?P<level>\d+)-(?P<suffix>upsampler)-out")),
)


class LayerIdSyntaxError(DiffusionFeatureError, ValueError):
    """The string is not a layer id of any family."""


@dataclass(frozen=True)
class LayerId:
    """A parsed layer id.

    part: 'unet' (unet-in/after-conv-in/out), 'dit' (dit-in/embed/out), 'res' (a resnet), 'vit' (a whole
    transformer's output),
    'block' (a tap inside one transformer block), 'refiner' (a tap inside one refiner of a DiT: `block` is its
    number), 'sampler' (down/upsampler output).
    stage: 'down', 'mid', 'up', or None (unet-* and dit-* ids, and the block ids of transformers).
    ref: the reference image of a DiT block id `vit-block{B}-ref{I}-<suffix>` (None: the generated image's).
    """

    part: str
    suffix: str
    stage: str | None = None
    level: int | None = None
    repeat: int | None = None
    block: int | None = None
    ref: int | None = None

    @property
    def is_map(self) -> bool:
        return self.part in ("block", "refiner") and self.suffix in MAP_SUFFIXES


def parse_id(text: str) -> LayerId:
    """Parse one id; raise LayerIdSyntaxError when it follows no rule of the grammar."""
    s = text.strip()
    for part, pattern in _PATTERNS:
        m = pattern.fullmatch(s)
        if m:
            g = m.groupdict()
            num = lambda k: int(g[k]) if g.get(k) is not None else None  # noqa: E731
            return LayerId(part=part, suffix=g["suffix"] if "suffix" in g else "out", stage=g.get("stage"),
                           level=num("level"), repeat=num("repeat"), block=num("block"), ref=num("ref"))
    raise LayerIdSyntaxError(f"{echo(text)} is not a layer id (see README: layer-id grammar)")


def format_id(lid: LayerId) -> str:
    """Write a LayerId back as its string."""
    if lid.part in ("unet", "dit"):
        return f"{lid.part}-{lid.suffix}"
    if lid.part == "sampler":
        return f"{lid.stage}-level{lid.level}-{lid.suffix}-out"
    if lid.part == "refiner":
        return f"vit-refiner{lid.block}-{lid.suffix}"
    if lid.ref is not None:
        return f"vit-block{lid.block}-ref{lid.ref}-{lid.suffix}"
    if lid.stage is None:  # transformers: blocks sit directly in the model
        return f"vit-block{lid.block}-{lid.suffix}"
    where = "mid" if lid.stage == "mid" else f"{lid.stage}-level{lid.level}"
    if lid.part == "res":
        return f"{where}-repeat{lid.repeat}-res-{lid.suffix}"
    vit = "mid-vit" if lid.stage == "mid" else f"{where}-repeat{lid.repeat}-vit"
    if lid.part == "vit":
        return f"{vit}-out"
    return f"{vit}-block{lid.block}-{lid.suffix}"


def reference_of(layer_id: str) -> tuple[str, int] | None:
    """(the generated image's id of the same tensor, the reference's index) of a reference-image id
    `vit-block{B}-ref{I}-<suffix>`; None for every other string."""
    try:
        lid = parse_id(layer_id)
    except LayerIdSyntaxError:
        return None
    if lid.ref is None:
        return None
    return f"vit-block{lid.block}-{lid.suffix}", lid.ref

"""The layer ids of a diffusion transformer (Flux, SD3) and their taps, from a table its family module fills in for
one loaded network of one backend. The grammar is the same for every such family and both backends:

    dit-in, dit-embed, dit-out                           the latent in, the image tokens after the patch embedding,
                                                         the prediction
    vit-block{B}-{in|norm-out|q|k|v|attn-out|ffn-inner|out}        image tokens of block B, as (C, h, w)
    vit-block{B}-txt-{...}                                         text tokens of block B, as (C, T)
    vit-block{B}-{cross-map|self-map}                    image queries' probabilities at the text / image keys
    vit-block{B}-attn2-{norm-out|q|k|v|self-map|attn-out}          a second, image-only attention (SD3.5 medium)
    vit-refiner{R}-{in|norm-out|q|k|v|self-map|attn-out|ffn-inner|out}   Z-Image's refiner R: its image stream
    vit-refiner{R}-txt-{...}                             its text stream (a separate block that sees text only)
    vit-block{B}-ref{I}-{in|norm-out|q|k|v|attn-out|ffn-inner|out}   reference image I's tokens of block B's image
                                                         stream, as (C, h, w) on that reference's own grid

B counts every block in forward order (Flux: its double-stream blocks, then its single-stream ones). A family
module says where each tensor is (`Read`s: paths and how to read them); this module turns that into ids in forward
order and into Taps, so both backends' ids come from the module tree actually loaded. Refiner ids come after
dit-embed and before the blocks, by R; a refiner's two streams run one after the other (diffusers' Z-Image: every
image refiner first; ComfyUI: every text refiner first), so the listed order is R's, not the clock's.

Reference ids exist where the family module says where the network's call shows its reference images (`ref_read`
in `common`, see Tap); how many a run has is the run's, so ids() lists none of them and they are checked when the
run reads them (a one-line ReferenceImageError naming the id and the run's count).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import echo
from ..grammar import DIT_REFINER_SUFFIXES, DIT_SUFFIXES, MAP_SUFFIXES, reference_of
from ..hooks import ReferenceImageError
from ..tap import Tap

# Where one block's tensors are: suffix ("q", "txt-q", ...) -> Tap fields (module_path, at, item, layout, columns,
# span, part). Maps: "map" -> Tap fields of the joint map (module_path / key_path of the image or joint stream,
# text_query_path / text_key_path, layout, rope, rope_path, rope_arg, attention_path); a map of an image-only
# attention ("attn2-self-map") has its own read (module_path / key_path, layout, attention_path). Optional
# "modulation": where the block's [shift | scale] of its image stream's first AdaLN is (module_path, columns): not a
# layer id, the companion tensor of the block's `in` for transforms that re-apply that modulation
# (engine/dit_transforms.py).
Read = dict
JOINT_MAPS = ("cross-map", "self-map")  # the two parts of the joint softmax: one "map" read serves both

# The key of a block input's companion modulation tensor among captured features: "<in id>:modulation".
MODULATION_SUFFIX = ":modulation"


@dataclass
class DitLayout:
    """One loaded diffusion transformer as its family module reads it.

    ends: "in" / "embed" / "out" -> Read (with its kind). blocks: one dict per block in forward order.
    common: Tap fields every token tap shares (grid_path, grid_divisor, text_path; ref_read where the network takes
    reference images). refiners: one dict per refiner (Z-Image), the same reads as a block's (its self-map under
    "map"). reference_channels: the channels of the reference latents the network takes (ComfyUI's ref_latents,
    padded to grid_divisor), for a one-line refusal of others before the network fails on them.
    """

    ends: dict[str, Read]
    blocks: list[dict[str, Read]]
    common: dict = field(default_factory=dict)
    refiners: list[dict[str, Read]] = field(default_factory=list)
    reference_channels: int | None = None

    @property
    def takes_references(self) -> bool:
        return self.common.get("ref_read") is not None

    def ids(self) -> list[str]:
        """Every id of this network, in the order the tensors appear during a forward."""
        ids = ["dit-in", "dit-embed"] if "embed" in self.ends else ["dit-in"]
        for r, reads in enumerate(self.refiners):
            for suffix in DIT_REFINER_SUFFIXES:
                if suffix == "self-map":  # the image stream's only map
                    ids += [f"vit-refiner{r}-self-map"] if "map" in reads else []
                    continue
                ids += [f"vit-refiner{r}-{s}" for s in (suffix, f"txt-{suffix}") if s in reads]
        for b, reads in enumerate(self.blocks):
            for suffix in DIT_SUFFIXES:
                if suffix in JOINT_MAPS:
                    if "map" in reads:
                        ids.append(f"vit-block{b}-{suffix}")
                    continue
                ids += [f"vit-block{b}-{s}" for s in (suffix, f"txt-{suffix}") if s in reads]
        return ids + ["dit-out"]

    def tap(self, layer_id: str) -> Tap:
        """The tap of one id of ids()."""
        if layer_id.startswith("dit-"):
            return Tap(layer_id, **{**self.common, **self.ends[layer_id[4:]]})
        reference = reference_of(layer_id)
        if reference is not None:  # the generated image's read, on reference I's tokens
            if not self.takes_references:
                raise ValueError(f"{echo(layer_id)}: this network takes no reference images")
            block, suffix = reference[0][len("vit-block"):].split("-", 1)
            return Tap(layer_id, kind="tokens", ref=reference[1], **{**self.common, **self.blocks[int(block)][suffix]})
        if layer_id.startswith("vit-refiner"):
            refiner, suffix = layer_id[len("vit-refiner"):].split("-", 1)
            reads = self.refiners[int(refiner)]
            if suffix == "self-map":
                return Tap(layer_id, kind="map", span="image", **{**self.common, **reads["map"]})
            return Tap(layer_id, kind="text" if suffix.startswith("txt-") else "tokens",
                       **{**self.common, **reads[suffix]})
        block, suffix = layer_id[len("vit-block"):].split("-", 1)
        reads = self.blocks[int(block)]
        if suffix in JOINT_MAPS:
            return Tap(layer_id, kind="map", span="text" if suffix == "cross-map" else "image",
                       **{**self.common, **reads["map"]})
        if suffix in MAP_SUFFIXES:  # an image-only attention's map: no text part
            return Tap(layer_id, kind="map", **{**self.common, "text_path": None, **reads[suffix]})
        kind = "text" if suffix.startswith("txt-") else "tokens"
        return Tap(layer_id, kind=kind, **{**self.common, **reads[suffix]})

    def taps(self, ids) -> list[Tap]:
        return [self.tap(i) for i in ids]

    def check_reference_latents(self, latents, where: str, owner: str) -> None:
        """Refuse in one line a reference latent this network cannot take (another channel count: an SD latent given
        to an edit model through ReferenceLatent), which it would otherwise fail on deep inside."""
        if self.reference_channels is None:
            return
        patch = self.common.get("grid_divisor", 1)
        for i, latent in enumerate(latents or ()):
            shape = list(getattr(latent, "shape", ()))
            if len(shape) < 4 or shape[1] != self.reference_channels:
                raise ReferenceImageError(
                    f"reference image {i + 1} of {where} is a latent of shape {shape}: {owner} takes "
                    f"{self.reference_channels}-channel reference latents (its own VAE's, as ReferenceLatent gets "
                    f"them from VAE Encode with this model's VAE), padded to a multiple of {patch} latent pixels")

    def modulation_tap(self, layer_id: str) -> Tap | None:
        """The companion tap of a block-input id (`vit-block{B}-in`): the block's [shift | scale] per sample, kind
        "vector"; None for other ids and blocks whose layout does not say where their modulation is."""
        if not (layer_id.startswith("vit-block") and layer_id.endswith("-in")) or "-txt-" in layer_id:
            return None
        read = self.blocks[int(layer_id[len("vit-block"):-len("-in")])].get("modulation")
        return None if read is None else Tap(layer_id + MODULATION_SUFFIX, kind="vector", **read)


def joint(reads: dict[str, Read], suffixes, span_text: bool = True) -> dict[str, Read]:
    """Reads of a single-stream block whose tensors hold [text, image] in one sequence: each suffix read once,
    split into its image part and (span_text) its text part."""
    out = {}
    for suffix in suffixes:
        read = reads[suffix]
        out[suffix] = {**read, "span": "image"}
        if span_text:
            out[f"txt-{suffix}"] = {**read, "span": "text"}
    return out


def axis4_position_ids(h: int, w: int, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux.2's 4-axis position ids (time, row, column, token) as Flux2Pipeline makes them: (h * w, 4) image ids
    (0, row, column, 0) and (text_tokens, 4) text ids (0, 0, 0, token); zeros on the meta device."""
    img_ids = torch.zeros(h, w, 4, device=device)
    txt_ids = torch.zeros(text_tokens, 4, device=device)
    if torch.device(device).type != "meta":
        img_ids[..., 1], img_ids[..., 2] = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)
        txt_ids[:, 3] = torch.arange(text_tokens, device=device)
    return img_ids.reshape(-1, 4), txt_ids

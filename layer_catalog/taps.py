"""From layer ids to the modules of a loaded diffusers denoiser, and back.

A `Tap` says where an id's tensor appears: the module to hook, how to read its tensor (`kind`), and for
token-shaped tensors which module's input tells the spatial grid. Enumeration walks a real model, so what it lists
is what that model has (a custom config with other depths gets its own ids).
"""
from __future__ import annotations

import torch

from .errors import echo
from .families import dit_layout
from .grammar import BLOCK_SUFFIXES, LayerId, format_id, parse_id
from .tap import Tap, is_pixart, is_unet


def _block_tap(lid: LayerId, transformer_path: str, block_root: str, grid_divisor: int) -> Tap:
    block = f"{block_root}transformer_blocks.{lid.block}"
    where = {
        "out": (block, "tokens"),
        "ffn-inner": (f"{block}.ff.net.0", "tokens"),
        "self-q": (f"{block}.attn1.to_q", "tokens"),
        "self-k": (f"{block}.attn1.to_k", "tokens"),
        "self-v": (f"{block}.attn1.to_v", "tokens"),
        "cross-q": (f"{block}.attn2.to_q", "tokens"),
        "self-map": (f"{block}.attn1", "map"),
        "cross-map": (f"{block}.attn2", "map"),
    }
    path, kind = where[lid.suffix]
    if kind == "map":
        return Tap(format_id(lid), f"{path}.to_q", kind, grid_path=transformer_path, grid_divisor=grid_divisor,
                   key_path=f"{path}.to_k", attention_path=path)
    return Tap(format_id(lid), path, kind, grid_path=transformer_path, grid_divisor=grid_divisor)


def tap_for(lid: LayerId, pixart: bool, patch_size: int = 1) -> Tap:
    """The tap of a parsed id, for a UNet (pixart=False) or a PixArt transformer. Does not check existence."""
    name = format_id(lid)
    if pixart:
        if lid.part != "block" or lid.stage is not None:
            raise ValueError(f"{echo(name)} is a UNet id; PixArt ids look like 'vit-block0-out'")
        return _block_tap(lid, "", "", patch_size)
    if lid.part == "block" and lid.stage is None:
        raise ValueError(f"{echo(name)} is a PixArt id; UNet ids look like 'up-level1-repeat1-vit-block0-out'")
    if lid.part == "unet":
        return {"in": Tap(name, "", "input"), "after-conv-in": Tap(name, "conv_in", "spatial"),
                "out": Tap(name, "conv_out", "spatial")}[lid.suffix]
    if lid.part == "sampler":
        return Tap(name, f"{lid.stage}_blocks.{lid.level}.{lid.suffix}s.0", "spatial")
    if lid.stage == "mid":
        resnet, transformer = f"mid_block.resnets.{lid.repeat}", "mid_block.attentions.0"
    else:
        base = f"{lid.stage}_blocks.{lid.level}"
        resnet, transformer = f"{base}.resnets.{lid.repeat}", f"{base}.attentions.{lid.repeat}"
    if lid.part == "res":
        return Tap(name, resnet + (".conv2" if lid.suffix == "increment" else ""), "spatial")
    if lid.part == "vit":
        return Tap(name, transformer, "spatial")
    return _block_tap(lid, transformer, transformer + ".", 1)


def _children(module, name):
    sub = getattr(module, name, None)
    return list(sub) if sub is not None else []


def _block_ids(prefix: str, blocks) -> list[str]:
    """Ids of every tap inside a sequence of transformer blocks; prefix is 'vit-' or '<where>-vit-'."""
    ids = []
    for b, block in enumerate(blocks):
        for suffix in BLOCK_SUFFIXES:
            if suffix.startswith("cross") and getattr(block, "attn2", None) is None:
                continue
            ids.append(f"{prefix}block{b}-{suffix}")
    return ids


def _transformer_ids(prefix: str, transformer) -> list[str]:
    return _block_ids(prefix, transformer.transformer_blocks) + [f"{prefix}out"]


def enumerate_ids(model: torch.nn.Module) -> list[str]:
    """Every legal id of a loaded denoiser, in the order the taps fire during a forward."""
    layout = dit_layout(model)
    if layout is not None:
        return layout.ids()
    if is_pixart(model):
        return _block_ids("vit-", model.transformer_blocks)
    if not is_unet(model):
        raise TypeError(f"unsupported denoiser {type(model).__name__}: expected a diffusers UNet2DConditionModel "
                        "or PixArtTransformer2DModel")
    ids = ["unet-in", "unet-after-conv-in"]

    def level(stage, index, block):
        resnets, attentions = _children(block, "resnets"), _children(block, "attentions")
        for r in range(len(resnets)):
            ids.extend([f"{stage}-level{index}-repeat{r}-res-increment", f"{stage}-level{index}-repeat{r}-res-out"])
            if r < len(attentions):
                ids.extend(_transformer_ids(f"{stage}-level{index}-repeat{r}-vit-", attentions[r]))
        sampler = "downsampler" if stage == "down" else "upsampler"
        if _children(block, f"{sampler}s"):
            ids.append(f"{stage}-level{index}-{sampler}-out")

    for i, block in enumerate(model.down_blocks):
        level("down", i, block)
    mid = model.mid_block
    if mid is not None:
        mid_res, mid_att = _children(mid, "resnets"), _children(mid, "attentions")
        for r in range(len(mid_res)):
            ids.extend([f"mid-repeat{r}-res-increment", f"mid-repeat{r}-res-out"])
            if r == 0 and mid_att:  # diffusers' mid block: resnet, transformer, resnet
                ids.extend(_transformer_ids("mid-vit-", mid_att[0]))
    for i, block in enumerate(model.up_blocks):
        level("up", i, block)
    ids.append("unet-out")
    return ids


def taps_of(model: torch.nn.Module, ids: list[str]) -> list[Tap]:
    """Taps for ids already known to be valid for this model."""
    layout = dit_layout(model)
    if layout is not None:
        return layout.taps(ids)
    pixart = is_pixart(model)
    patch = int(getattr(getattr(model, "config", None), "patch_size", 1) or 1) if pixart else 1
    return [tap_for(parse_id(i), pixart, patch) for i in ids]


def modulation_taps(model: torch.nn.Module, ids: list[str]) -> list[Tap]:
    """The companion taps ("<id>:modulation", kind "vector") of the block-input ids among `ids`: each block's
    [shift | scale], for transforms that re-apply its AdaLN (engine/dit_transforms.py). [] where the network has
    no such modulation (UNets, PixArt)."""
    layout = dit_layout(model)
    if layout is None:
        return []
    return [t for t in (layout.modulation_tap(i) for i in ids) if t is not None]

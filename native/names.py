"""ComfyUI's own networks under our layer ids, so one layer-id grammar serves both backends.

Diffusion transformers (Flux, ...) need no translation: their family module reads ComfyUI's module tree directly
(`Family.networks` maps ComfyUI's class to a DitLayout; families.dit_layout dispatches), so ids and taps come from
it. The UNet (`openaimodel.UNetModel`) and PixArt are seen under diffusers' module names instead. ComfyUI numbers
its blocks flat (`input_blocks.N`, `middle_block.N`, `output_blocks.N`); diffusers nests them by level
(`down_blocks.L.resnets.R`, ...). The correspondence is the one `comfy.utils.unet_to_diffusers` uses for weights,
but it is read here from the module tree itself (a Downsample closes a down level, an Upsample closes an up level),
so a checkpoint of another depth gets its own ids without a config. The tree is wrapped in a small diffusers-shaped
view, and the diffusers side's own enumeration and id -> tap rules (`layer_catalog.taps`) run on it unchanged: the
same names, in the same forward order, by the same code.

Imports no ComfyUI code: modules are recognised by their class names.
"""
from __future__ import annotations

import dataclasses

import torch

from ..layer_catalog.errors import DiffusionFeatureError
from ..layer_catalog.families import dit_layout, family_names, spoken
from ..layer_catalog.families.dit_layout import DitLayout
from ..layer_catalog.resolver import resolve_taps
from ..layer_catalog.tap import Tap
from ..layer_catalog.taps import enumerate_ids

SUPPORTED_FAMILIES = family_names(lambda f: f.native)
_DF_MODEL_HINT = ("load it with DFLoadCheckpoint or DFLoadDiffusers (DF_MODEL) to extract its features with the "
                  "diffusers backend")


class UnsupportedModelError(DiffusionFeatureError, TypeError):
    """The MODEL's network is not a UNet we can tap natively. The message names what is supported."""


def unsupported_message(what: str) -> str:
    unets = family_names(lambda f: f.native and f.denoiser == "unet")
    others = family_names(lambda f: f.native and f.denoiser != "unet")
    elsewhere = family_names(lambda f: not f.native)  # families only the diffusers backend taps (DF_MODEL)
    only_df = f"{spoken(elsewhere)} are tapped only on DF_MODEL; " if elsewhere else ""
    return (f"{what} is not supported by the native taps: they cover ComfyUI's UNet models of the families "
            f"{spoken(unets)}, and its diffusion transformers of {spoken(others)}; {only_df}video models and other "
            f"architectures have no layer ids; for taps the native model cannot reach, {_DF_MODEL_HINT}")


def unreadable_message(what: str, family: str, need: str) -> str:
    """The refusal of a MODEL of a diffusion-transformer family whose network this ComfyUI builds without the
    family's options (the family's comfy_missing names what is needed)."""
    return f"{what} cannot be tapped natively as {family}: that needs {need}; or {_DF_MODEL_HINT}"


class _Level:
    def __init__(self):
        self.resnets: list = []
        self.attentions: list = []
        self.downsamplers: list = []
        self.upsamplers: list = []


class UNetModel:
    """A diffusers-shaped view of a native UNet: `down_blocks[L].resnets/attentions/downsamplers`, `mid_block`,
    `up_blocks`, `conv_in`, whose leaves are the native modules. Only for enumeration; it runs nothing.
    (Named UNetModel so messages read 'this UNetModel'.)"""

    def __init__(self):
        self.down_blocks: list[_Level] = []
        self.up_blocks: list[_Level] = []
        self.mid_block = None
        self.conv_in = None


_KINDS = {"ResBlock": "resnets", "SpatialTransformer": "attentions", "Downsample": "downsamplers",
          "Upsample": "upsamplers"}


def _names(block) -> list[str]:
    return [type(m).__name__ for m in block]


def is_native_unet(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("input_blocks", "middle_block", "output_blocks", "out"))


class NativeLayout:
    """The diffusers <-> native correspondence of one native UNet, read from its module tree.

    `paths` maps a diffusers module path (down_blocks.1.attentions.0, mid_block.resnets.1, conv_out, ...) to the
    native one (input_blocks.4.1, middle_block.2, out.2, ...). `view` is the diffusers-shaped view.
    """

    def __init__(self, unet: torch.nn.Module):
        if not is_native_unet(unet):
            raise UnsupportedModelError(unsupported_message(f"a {type(unet).__name__}"))
        self.paths: dict[str, str] = {}
        view = UNetModel()
        first = list(unet.input_blocks[0])
        if len(first) != 1 or not isinstance(first[0], torch.nn.Conv2d):
            raise UnsupportedModelError(unsupported_message(f"a UNet whose input_blocks.0 holds {_names(first)}"))
        view.conv_in = first[0]
        self.paths["conv_in"] = "input_blocks.0.0"

        view.down_blocks = self._levels(unet.input_blocks, 1, "down_blocks", "input_blocks", "Downsample",
                                        (["Downsample"], ["ResBlock"], ["ResBlock", "SpatialTransformer"]))
        mid = unet.middle_block
        if mid is not None:
            names = _names(mid)
            if names not in (["ResBlock", "SpatialTransformer", "ResBlock"], ["ResBlock", "ResBlock"]):
                raise UnsupportedModelError(unsupported_message(f"a UNet whose middle_block holds {names}"))
            view.mid_block = _Level()
            for i, name in enumerate(names):
                self._add(view.mid_block, "mid_block", name, mid, "middle_block", i)
        view.up_blocks = self._levels(unet.output_blocks, 0, "up_blocks", "output_blocks", "Upsample",
                                      [["ResBlock", *rest] for rest in ([], ["SpatialTransformer"], ["Upsample"],
                                                                        ["SpatialTransformer", "Upsample"])])
        out = list(unet.out)
        if not out or not isinstance(out[-1], torch.nn.Conv2d):
            raise UnsupportedModelError(unsupported_message(f"a UNet whose out holds {_names(out)}"))
        self.paths["conv_out"] = f"out.{len(out) - 1}"
        self.view = view

    def _levels(self, blocks, start: int, side: str, native: str, closer: str, allowed) -> list[_Level]:
        """The diffusers levels of a flat list of native blocks (from `start`): a block holding `closer` (a
        Downsample, an Upsample) ends a level."""
        levels, level = [], _Level()
        for n in range(start, len(blocks)):
            names = _names(blocks[n])
            if names not in allowed:
                raise UnsupportedModelError(unsupported_message(f"a UNet whose {native}.{n} holds {names}"))
            for i, name in enumerate(names):
                self._add(level, f"{side}.{len(levels)}", name, blocks[n], f"{native}.{n}", i)
            if names[-1] == closer or (n == len(blocks) - 1 and level.resnets):
                if level.attentions and len(level.attentions) != len(level.resnets):
                    raise UnsupportedModelError(unsupported_message(
                        f"a UNet whose {side.split('_')[0]} level {len(levels)} has a transformer after some "
                        "resnets but not all (diffusers cannot name it)"))
                levels.append(level)
                level = _Level()
        return levels

    def _add(self, level: _Level, at: str, name: str, block, native: str, i: int) -> None:
        """Module i of the native `block` (at path `native`) as the next of its kind in `level` (at path `at`)."""
        kind = _KINDS[name]
        getattr(level, kind).append(block[i])
        self.paths[f"{at}.{kind}.{len(getattr(level, kind)) - 1}"] = f"{native}.{i}"

    def tap(self, tap: Tap, modules) -> Tap:
        """The native tap of a diffusers-side tap of this UNet: the same tap at the native module paths."""
        native = dataclasses.replace(tap, **{f: self.native_path(getattr(tap, f)) for f in
                                             ("module_path", "grid_path", "key_path", "attention_path")
                                             if getattr(tap, f) is not None})
        if tap.kind == "map" and not isinstance(getattr(modules[native.attention_path], "heads", None), int):
            attn = modules[native.attention_path]
            raise UnsupportedModelError(unsupported_message(
                f"a UNet whose {native.attention_path} is a {type(attn).__name__}"))
        return native

    def native_path(self, diffusers_path: str) -> str:
        """The native module path for a diffusers one: the longest mapped prefix, then the same tail (inside
        transformer blocks the names match), except a resnet's conv2, whose output is native `out_layers`' output
        (norm, SiLU, dropout, conv: the residual branch before the skip add)."""
        if diffusers_path == "":
            return ""
        parts = diffusers_path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in self.paths:
                tail = parts[cut:]
                if ".resnets." in f".{head}." and tail == ["conv2"]:
                    tail = ["out_layers"]
                return ".".join([self.paths[head], *tail])
        raise KeyError(f"no native module for diffusers path {diffusers_path!r}")


def native_ids(unet: torch.nn.Module) -> list[str]:
    """Every layer id of a native network (UNet, PixArt or a diffusion transformer), in the order the taps fire
    during a forward."""
    layout = _layout(unet)
    return layout.ids() if isinstance(layout, DitLayout) else enumerate_ids(layout.view)


def is_native_dit(net: torch.nn.Module) -> bool:
    """A ComfyUI network whose family module reads it directly (Family.networks names its class)."""
    return dit_layout(net) is not None


def _layout(net: torch.nn.Module):
    """The DitLayout of a diffusion transformer, else the diffusers-shaped layout of a UNet or PixArt."""
    dit = dit_layout(net)
    if dit is not None:
        return dit
    return PixArtLayout(net) if is_native_pixart(net) else NativeLayout(net)


def native_taps(spec, unet: torch.nn.Module, family: str | None = None) -> list[Tap]:
    """Taps for a layer spec (ids, presets, JSON file: as `resolve_taps`) on a native network. A wrong id raises
    LayerIdError naming the nearest valid ids of this model."""
    layout = _layout(unet)
    if isinstance(layout, DitLayout):  # the family's layout of ComfyUI's own modules: its taps as they are
        return resolve_taps(spec, unet, family)
    modules = dict(unet.named_modules())
    return [layout.tap(t, modules) for t in resolve_taps(spec, layout.view, family)]


# ---- PixArt ---------------------------------------------------------------------------------------------------
def is_native_pixart(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("blocks", "x_embedder", "t_block", "y_embedder"))


class _PixArtView:
    """Diffusers-shaped view of ComfyUI's PixArtMS for enumeration (transformer_blocks with attn2, adaln_single)."""

    def __init__(self, n_blocks: int, patch: int):
        self.transformer_blocks = [type("Block", (), {"attn2": True})() for _ in range(n_blocks)]
        self.adaln_single = None
        self.config = type("Config", (), {"patch_size": patch})()


class PixArtLayout:
    """ComfyUI's PixArt (comfy/ldm/pixart/pixartms.py) under diffusers' PixArtTransformer2DModel names.

    It fuses self-attention q/k/v in one `attn.qkv` linear and cross-attention k/v in `cross_attn.kv_linear`:
    self-q/k/v are slices of qkv's output (what diffusers' to_q/to_k/to_v produce), cross-q is q_linear's output,
    maps come from those projections. Its text for all images is one flat sequence (1, B*T, C); cross-map splits
    it back per image, as ComfyUI's attention does. KV-compressed blocks (sr_ratio > 1) have no diffusers twin.
    """

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.patch = int(getattr(net, "patch_size", 2))
        self.view = _PixArtView(len(net.blocks), self.patch)

    def tap(self, tap: Tap, modules) -> Tap:
        parts = tap.module_path.split(".")  # transformer_blocks.B.<rest>
        b, rest = int(parts[1]), ".".join(parts[2:])
        block = f"blocks.{b}"
        common = dict(grid_path="", grid_divisor=self.patch)
        attn = self.net.blocks[b].attn
        if tap.kind == "map" and (getattr(attn, "sr_ratio", 1) > 1 or not isinstance(attn.q_norm, torch.nn.Identity)):
            raise UnsupportedModelError(f"{tap.id}: block {b} of this PixArt compresses or normalises its keys, "
                                        f"which the diffusers PixArt cannot name; {_DF_MODEL_HINT}")
        table = {
            "": (block, None),
            "ff.net.0": (f"{block}.mlp.act", None),
            "attn1.to_q": (f"{block}.attn.qkv", (0, 3)),
            "attn1.to_k": (f"{block}.attn.qkv", (1, 3)),
            "attn1.to_v": (f"{block}.attn.qkv", (2, 3)),
            "attn2.to_q": (f"{block}.cross_attn.q_linear", None),
        }
        if tap.kind == "map":
            if rest == "attn1.to_q":
                return Tap(tap.id, f"{block}.attn.qkv", "map", part=(0, 3), key_path=f"{block}.attn.qkv",
                           key_part=(1, 3), attention_path=f"{block}.attn", **common)
            return Tap(tap.id, f"{block}.cross_attn.q_linear", "map", key_path=f"{block}.cross_attn.kv_linear",
                       key_part=(0, 2), attention_path=f"{block}.cross_attn", **common)
        path, part = table[rest]
        return Tap(tap.id, path, "tokens", part=part, **common)

"""Interrupt checks inside long forwards: a forward pre-hook on each top-level block of the denoiser and of the
VAE calls the run's interrupt callback, so a Cancel is honoured within one block instead of after a whole step
(at 8192 x 8192 one step is minutes). A pre-hook costs one Python call per block, nothing next to a block.

Hooks live only while the `with` block runs and are removed however it ends (an interrupt included), so no run
leaves hooks of ours on a model. Outside ComfyUI the callback is None and nothing is registered.
"""
from __future__ import annotations

import torch

from ..layer_catalog.hook_set import AttachedHooks, HookSet

_CONTAINERS = ("down_blocks", "up_blocks", "transformer_blocks", "blocks")  # UNet, VAE encoder/decoder, PixArt
_SINGLES = ("mid_block", "conv_out")
# ComfyUI's UNetModel (DFExtractNative) calls the layers of these blocks one by one, never the blocks themselves
_LAYERED = ("input_blocks", "middle_block", "output_blocks")
_INNER = ("resnets", "attentions", "downsamplers", "upsamplers")  # a level-0 block is several long steps


def block_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a denoiser or VAE (or its encoder/decoder) to check between, in no particular order."""
    found = []
    parts = [module] + [getattr(module, name) for name in ("encoder", "decoder")
                        if isinstance(getattr(module, name, None), torch.nn.Module)]
    for part in parts:
        for name in _CONTAINERS:
            for block in getattr(part, name, None) or ():
                found.append(block)
                for inner in _INNER:
                    found += list(getattr(block, inner, None) or ())
        for name in _LAYERED:
            for block in getattr(part, name, None) or ():
                found += list(block) if isinstance(block, torch.nn.Sequential) else [block]
        for name in _SINGLES:
            single = getattr(part, name, None)
            if isinstance(single, torch.nn.Module):
                found.append(single)
    return found


class InterruptChecks(AttachedHooks):
    """`with InterruptChecks(check, unet, vae):` calls check() before each block of those modules runs."""

    def __init__(self, check, *modules: torch.nn.Module | None):
        self.check = check
        self.modules = [m for m in modules if m is not None]

    def _attach(self, hooks: HookSet) -> None:
        if self.check is None:
            return
        check = self.check
        seen = set()
        for module in self.modules:
            for block in block_modules(module):
                if id(block) not in seen:
                    seen.add(id(block))
                    hooks.forward_pre_hook(block, lambda *_: check())

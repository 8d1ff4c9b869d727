"""The table of families, and the questions answered by looking through it (which family a checkpoint, a UNet
config or a ComfyUI model class is). Adding a family: one module beside this one, listed below, plus its
model_configs/ folder and generated catalog."""
from __future__ import annotations

import re
from typing import Callable

from ..errors import DiffusionFeatureError, echo
from . import flux, flux2, pixart_sigma, playground_v2, qwen_image, sd3, sd15, sd21, sdxl, z_image
from .family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    sd15.FAMILY, sd21.FAMILY, sdxl.FAMILY, playground_v2.FAMILY, pixart_sigma.FAMILY, flux.FAMILY, sd3.FAMILY,
    qwen_image.FAMILY, flux2.FAMILY, z_image.FAMILY)}
DEFAULT_FAMILY = sd15.FAMILY.name  # the family of the demo and of random weights when none is named


class UnknownFamilyError(DiffusionFeatureError, ValueError):
    pass


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"unknown family {echo(name)}; valid families: {', '.join(FAMILIES)}") from None


def family_names(where: Callable[[Family], bool]) -> tuple[str, ...]:
    """The families for which `where(family)` holds, in table order."""
    return tuple(name for name, fam in FAMILIES.items() if where(fam))


def spoken(names) -> str:
    """Names as a sentence lists them: 'a, b and c'."""
    names = list(names)
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def family_of_checkpoint(keys) -> str | None:
    """The family whose every checkpoint mark matches one of a single file's tensor names (None: none does). Where
    several do, the one with the most marks: a family that shares another's blocks adds a mark of its own (Flux.2
    files have Flux.1's double blocks too)."""
    keys = list(keys)
    found = [(len(fam.checkpoint_marks), name) for name, fam in FAMILIES.items() if fam.checkpoint_marks and
             all(any(re.match(mark, k) for k in keys) for mark in fam.checkpoint_marks)]
    return max(found, key=lambda f: f[0])[1] if found else None


def family_of_unet(text_width: int | None, pooled: bool, *, exact: bool = True) -> str | None:
    """The family of a UNet (a denoiser, or a ControlNet made for one) from its cross-attention width and whether
    it takes SDXL's added text/time conditioning. Families that share another's denoiser are never the answer.
    exact=False: the first such family whatever the width (custom and test sizes)."""
    fits = [n for n, f in FAMILIES.items() if f.denoiser == "unet" and f.pooled_text == pooled and
            f.same_denoiser_as is None]
    return next((n for n in fits if FAMILIES[n].text_width == text_width), None if exact else fits[0])


def network_family(model) -> str | None:
    """The family that reads a loaded network directly (None: none does). A class two families declare (ComfyUI's
    Flux builds Flux.1 and Flux.2) belongs to the one whose layout function does not answer None."""
    name = type(model).__name__
    return next((n for n, f in FAMILIES.items() if name in f.networks and f.networks[name](model) is not None), None)


def dit_layout(model):
    """The DitLayout of a loaded diffusion transformer of a family that declares its class (None: not one)."""
    family = network_family(model)
    return None if family is None else FAMILIES[family].networks[type(model).__name__](model)


def family_of_comfy_config(class_name: str) -> str | None:
    """Our family for one of ComfyUI's model configs (comfy/supported_models.py class names); None for the
    UNets we tap without a catalog (the SDXL refiner, upscalers, ...)."""
    return next((n for n, f in FAMILIES.items() if class_name in f.comfy_configs), None)

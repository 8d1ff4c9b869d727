"""The model families: one module each (sd15.py, ...) declares a Family with every fact the pack asks about it;
registry.py lists them. Imports nothing of the pack outside layer_catalog."""
from .family import CONFIG_ROOT, Family, TextEncoder
from .meta import denoiser_from_config, dummy_inputs, meta_denoiser
from .registry import (DEFAULT_FAMILY, FAMILIES, UnknownFamilyError, dit_layout, family_names, family_of_checkpoint,
                       family_of_comfy_config, family_of_unet, get_family, network_family, spoken)

__all__ = ["CONFIG_ROOT", "Family", "TextEncoder", "denoiser_from_config", "dummy_inputs", "meta_denoiser",
           "DEFAULT_FAMILY", "FAMILIES", "UnknownFamilyError", "dit_layout", "family_names", "family_of_checkpoint",
           "family_of_comfy_config", "family_of_unet", "get_family", "network_family", "spoken"]

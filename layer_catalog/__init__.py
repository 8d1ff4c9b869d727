"""Layer ids, per-family catalogs, and the hook engine. Imports no ComfyUI code.

    from diffusion_feature.layer_catalog import resolve_taps, FeatureCapture
    taps = resolve_taps("practical", unet, family="sd15")
    with FeatureCapture(unet, taps, early_exit=True) as cap:
        cap.run(sample, t, encoder_hidden_states=text)
    cap.features  # {id: tensor}
"""
from .catalog import (PRESET_NAMES, build_catalog, compute_shapes, family_ids, family_shapes, load_catalog,
                      parse_size, preset_ids)
from .families import FAMILIES, Family, UnknownFamilyError, dummy_inputs, get_family, meta_denoiser
from .grammar import LayerId, LayerIdSyntaxError, format_id, parse_id
from .hooks import FeatureCapture, TokenGridError, residue
from .injection import FeatureInjection
from .resolver import LayerIdError, nearest_ids, resolve_layers, resolve_taps
from .tap import KINDS, Tap
from .taps import enumerate_ids, modulation_taps, tap_for, taps_of

__all__ = [
    "PRESET_NAMES", "build_catalog", "compute_shapes", "family_ids", "family_shapes", "load_catalog", "parse_size",
    "preset_ids", "FAMILIES", "Family", "UnknownFamilyError", "dummy_inputs", "get_family", "meta_denoiser",
    "LayerId", "LayerIdSyntaxError", "format_id", "parse_id", "FeatureCapture", "FeatureInjection", "TokenGridError",
    "residue", "LayerIdError",
    "nearest_ids", "resolve_layers", "resolve_taps", "KINDS", "Tap", "enumerate_ids", "modulation_taps", "tap_for",
    "taps_of",
]

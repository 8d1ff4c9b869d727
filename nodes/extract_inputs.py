"""The widgets DFExtractFeatures and DFExtractNative share, defined once so the two nodes cannot drift apart.

Saved workflows store widget values by position: names, order and defaults here are public API. Each function
returns a fresh dict (ComfyUI may annotate the specs it is given) in the order the widgets appear on the node.
"""
from __future__ import annotations

from ..engine.images import RESIZE_MODES


def timestep_inputs(seed_draws: str) -> dict:
    """t and seed (required inputs). seed_draws: what the seed draws, e.g. 'the noise'."""
    return {
        "t": ("INT", {"default": 50, "min": 0, "max": 999,
                      "tooltip": "Training timestep: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": f"Seed of {seed_draws}: same seed, same features."}),
    }


def extraction_options(controlnet_on: str) -> dict:
    """resize .. denoise_steps (optional inputs). controlnet_on: where a ControlNet comes from, for the
    denoise_from tooltip (e.g. 'on the conditioning')."""
    return {
        "resize": (list(RESIZE_MODES), {"default": "keep-aspect",
                                        "tooltip": "keep-aspect: the model's native area, sides multiples of "
                                                   "64; stretch: the native square; center-crop: crop first."}),
        "ensemble": ("INT", {"default": 1, "min": 1, "max": 64,
                             "tooltip": "Average over this many noise draws (seed, seed+1, ...)."}),
        "feature_resize": ("INT", {"default": 1, "min": 1, "max": 16,
                                   "tooltip": "Average-pool spatial features by this factor (maps never)."}),
        "offload": ("BOOLEAN", {"default": True, "tooltip": "Move features to the CPU as they are captured."}),
        "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images per forward."}),
        "denoise_from": ("INT", {"default": 0, "min": 0, "max": 999,
                                 "tooltip": "0: off. Above t: noise to this timestep instead and run guided "
                                            f"DDIM steps down to t before capturing (with a ControlNet {controlnet_on}"
                                            ": the content-shift recipe, e.g. 60 -> 50)."}),
        "denoise_steps": ("INT", {"default": 1, "min": 1, "max": 100,
                                  "tooltip": "Denoising steps from denoise_from down to t."}),
    }

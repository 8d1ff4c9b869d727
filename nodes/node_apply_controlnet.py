"""DFApplyControlNet: attach a ControlNet hint to a conditioning (chainable)."""
from __future__ import annotations

from ..engine.control import attach_control


class DFApplyControlNet:
    DESCRIPTION = ("Attach a ControlNet and its control image (e.g. from ComfyUI's Canny node) to a conditioning. "
                   "DFGenerate applies it during [start, end) of its steps; DFExtractFeatures applies it to every "
                   "forward (use denoise_from for the content-shift recipe). Chain several: their residuals add "
                   "up. The input conditioning is unchanged.")
    CATEGORY = "diffusion_feature/conditioning"
    RETURN_TYPES = ("DF_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("DF_CONDITIONING", {"tooltip": "The encoded prompt to guide (DFEncodePrompt)."}),
            "controlnet": ("DF_CONTROLNET", {"tooltip": "A ControlNet of the model's family (DFLoadControlNet)."}),
            "image": ("IMAGE", {"tooltip": "The control image (edges, depth, pose...): one for the batch or one "
                                           "per image; resized to the generated or extracted size."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scale of the ControlNet's residuals; 0 turns it off."}),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "Generation: the fraction of the steps where it starts acting."}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Generation: the fraction of the steps where it stops acting."}),
        }}

    def apply(self, conditioning, controlnet, image, strength=1.0, start=0.0, end=1.0):
        return (attach_control(conditioning, controlnet, image, strength, start, end),)

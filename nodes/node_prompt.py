"""DFEncodePrompt: text -> DF_CONDITIONING for the model's family."""
from __future__ import annotations

from . import comfy_env
from ..engine.prompts import encode_prompt


class DFEncodePrompt:
    DESCRIPTION = ("Encode a prompt describing the image(s) with the model's text encoder(s). One line is used "
                   "for every image; with one_per_line, line i is the prompt of image i. Long prompts are split "
                   "into windows rather than truncated.")
    CATEGORY = "diffusion_feature/conditioning"
    RETURN_TYPES = ("DF_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": "The model whose text encoder(s) encode the prompt."}),
            "text": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "What the image shows. An empty prompt is allowed."}),
        }, "optional": {
            "one_per_line": ("BOOLEAN", {"default": False, "tooltip": "Treat each line as the prompt of one "
                                                                      "image of the batch, in order."}),
        }}

    def encode(self, model, text, one_per_line=False):
        comfy_env.manage(model)
        prompts = [line.strip() for line in text.splitlines() if line.strip()] if one_per_line else [text]
        return (encode_prompt(model, prompts or [""]),)

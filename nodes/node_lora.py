"""DFLoadLoRA: a LoRA from ComfyUI's loras folder -> a clone of the DF_MODEL that carries it."""
from __future__ import annotations

import os

from . import comfy_env
from ..engine.file_cache import FileCache
from ..engine.lora import load_lora, with_lora

_CACHE = FileCache(size=8)  # LoraWeights by (path, mtime_ns, size)


def cached_lora(path):
    """load_lora, remembered by path and modification time: re-running a graph does not reread the file, and an
    edited file is read again."""
    st = os.stat(path)
    return _CACHE.get(path, (st.st_mtime_ns, st.st_size), lambda: load_lora(path))


def _strength(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": tooltip})


class DFLoadLoRA:
    DESCRIPTION = ("Apply a LoRA (kohya, diffusers or peft format) to a model. Returns a clone that carries the "
                   "LoRA: it is merged into the weights only while that clone runs, so the input model and every "
                   "other branch of the graph stay unchanged. Chain several to stack LoRAs.")
    CATEGORY = "diffusion_feature/load"
    RETURN_TYPES = ("DF_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": "The model to apply the LoRA to (it is not changed)."}),
            "lora_name": (comfy_env.model_names("loras"), {"tooltip": "A LoRA from ComfyUI's models/loras folder. "
                                                                      ".safetensors preferred; .ckpt/.pt are read "
                                                                      "with weights_only=True."}),
            "strength_model": _strength("How strongly the LoRA changes the denoiser (UNet / transformer). 0 turns "
                                        "it off; negative values subtract it."),
            "strength_clip": _strength("How strongly the LoRA changes the text encoder(s), i.e. the prompt "
                                       "encoding. 0 turns it off."),
        }}

    def apply(self, model, lora_name, strength_model=1.0, strength_clip=1.0):
        lora = cached_lora(comfy_env.model_path("loras", lora_name))
        return (with_lora(model, lora, strength_model, strength_clip),)

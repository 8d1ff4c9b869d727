"""Loader nodes: a single-file checkpoint or a diffusers folder -> DF_MODEL."""
from __future__ import annotations

from ..layer_catalog import FAMILIES
from . import comfy_env
from .loading import load_model

CATEGORY = "diffusion_feature/load"
FAMILY_CHOICES = ["auto", *FAMILIES]
DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16"]
DEVICE_CHOICES = ["auto", "cpu", "cuda"]


def _resolve(dtype: str, device: str) -> tuple[str, str]:
    device = comfy_env.default_device() if device == "auto" else device
    if dtype == "auto":  # half precision on a GPU, full precision on a CPU (half is slow or unsupported there)
        dtype = "float16" if device.startswith("cuda") else "float32"
    return dtype, device


def _common_inputs() -> dict:
    return {
        "family": (FAMILY_CHOICES, {"default": "auto", "tooltip": "Model family; auto detects it from the weights. "
                                    "An explicit family that does not match the file is an error."}),
        "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "Weights dtype. auto: float16 on a GPU, float32 "
                                  "on a CPU. SDXL's VAE always runs in float32."}),
        "device": (DEVICE_CHOICES, {"default": "auto", "tooltip": "auto: ComfyUI's compute device."}),
    }


class DFLoadCheckpoint:
    DESCRIPTION = ("Load a single-file Stable Diffusion checkpoint (SD1.5, SD2.1, SDXL, Playground v2) as a "
                   "feature-extraction model. .safetensors preferred; .ckpt is read with weights_only=True.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("DF_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (comfy_env.model_names("checkpoints"),
                                           {"tooltip": "A checkpoint from ComfyUI's models/checkpoints folder."}),
                             **_common_inputs()}}

    def load(self, ckpt_name, family="auto", dtype="auto", device="auto"):
        dtype, device = _resolve(dtype, device)
        path = comfy_env.model_path("checkpoints", ckpt_name)
        return (load_model(path, None if family == "auto" else family, dtype, device),)


class DFLoadDiffusers:
    DESCRIPTION = "Load a diffusers model folder (any supported family, PixArt-Sigma included) for feature extraction."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("DF_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_path": (comfy_env.model_names("diffusers"),
                                            {"tooltip": "A folder with model_index.json in ComfyUI's "
                                                        "models/diffusers folder."}),
                             **_common_inputs()}}

    def load(self, model_path, family="auto", dtype="auto", device="auto"):
        dtype, device = _resolve(dtype, device)
        path = comfy_env.model_path("diffusers", model_path)
        return (load_model(path, None if family == "auto" else family, dtype, device),)

"""Loader nodes: a single-file checkpoint or a diffusers folder -> DF_MODEL."""
from __future__ import annotations

from ..layer_catalog import FAMILIES
from . import comfy_env
from ..engine.loading import load_model

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


class _Loader:
    """Shared by the two loaders: a name from one of ComfyUI's model folders -> DF_MODEL."""

    KIND = ""  # the model folder kind of folder_paths
    NAME = ""  # the input naming the model
    NAME_TOOLTIP = ""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("DF_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {cls.NAME: (comfy_env.model_names(cls.KIND), {"tooltip": cls.NAME_TOOLTIP}),
                             **_common_inputs()}}

    def load(self, family="auto", dtype="auto", device="auto", **name):
        dtype, device = _resolve(dtype, device)
        path = comfy_env.model_path(self.KIND, name[self.NAME])
        return (load_model(path, None if family == "auto" else family, dtype, device),)


class DFLoadCheckpoint(_Loader):
    DESCRIPTION = ("Load a single-file Stable Diffusion checkpoint (SD1.5, SD2.1, SDXL, Playground v2) as a "
                   "feature-extraction model. .safetensors preferred; .ckpt is read with weights_only=True.")
    KIND, NAME = "checkpoints", "ckpt_name"
    NAME_TOOLTIP = "A checkpoint from ComfyUI's models/checkpoints folder."


class DFLoadDiffusers(_Loader):
    DESCRIPTION = "Load a diffusers model folder (any supported family, PixArt-Sigma included) for feature extraction."
    KIND, NAME = "diffusers", "model_path"
    NAME_TOOLTIP = "A folder with model_index.json in ComfyUI's models/diffusers folder."

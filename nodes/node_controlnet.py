"""DFLoadControlNet: a ControlNet from ComfyUI's controlnet folder -> DF_CONTROLNET."""
from __future__ import annotations

from pathlib import Path

from . import comfy_env
from ..engine.checkpoint_files import SINGLE_FILE_SUFFIXES
from ..engine.controlnet import CONTROLNET_FAMILIES, WEIGHT_NAMES, load_controlnet
from ..engine.file_cache import FileCache

KIND = "controlnet"
DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16"]
FAMILY_CHOICES = ["auto", *CONTROLNET_FAMILIES]
_CACHE = FileCache(size=4)  # a few stay loaded: re-queuing reuses them, switching often does not pile up


def controlnet_names() -> list[str]:
    """Single files and diffusers folders of the controlnet folder. ComfyUI lists files only, so a diffusers
    folder shows up through its weights file and is listed as the folder; configs kept beside single files
    (`<stem>.json`, `<stem>.config/`) are not models and are left out."""
    names = set()
    for name in comfy_env.model_names(KIND):
        parts = Path(name).parts
        if Path(name).name in WEIGHT_NAMES or Path(name).name == "config.json":
            folder = str(Path(name).parent)
            if folder != "." and _is_diffusers_folder(folder):
                names.add(folder)
                continue
        if Path(name).suffix.lower() in SINGLE_FILE_SUFFIXES and not any(p.endswith(".config") for p in parts[:-1]):
            names.add(name)
    return sorted(names)


def _is_diffusers_folder(folder: str) -> bool:
    try:
        path = comfy_env.model_path(KIND, str(Path(folder) / "config.json")).parent
    except ValueError:
        return False
    return any((path / w).is_file() for w in WEIGHT_NAMES)


def resolve(name: str) -> Path:
    """The full path of a listed name. A folder is found through its config.json: ComfyUI's own lookup finds
    files only."""
    try:
        return comfy_env.model_path(KIND, str(Path(name) / "config.json")).parent
    except ValueError:
        return comfy_env.model_path(KIND, name)


def _stamp(path: Path) -> float:
    """When the weights last changed: a file's mtime, or the newest of a folder's config and weights."""
    if path.is_dir():
        return max(p.stat().st_mtime for p in path.iterdir() if p.is_file())
    return path.stat().st_mtime


class DFLoadControlNet:
    DESCRIPTION = ("Load a ControlNet for SD1.5, SD2.1 or SDXL from ComfyUI's models/controlnet folder: a single "
                   "file in the original (control_model.*) or the diffusers layout, or a diffusers folder. Nothing "
                   "is downloaded; a non-standard size needs its diffusers config beside the file as "
                   "<name>.json or <name>.config/config.json.")
    CATEGORY = "diffusion_feature/load"
    RETURN_TYPES = ("DF_CONTROLNET",)
    RETURN_NAMES = ("controlnet",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net_name": (controlnet_names(), {"tooltip": "A ControlNet file or diffusers folder from "
                                                                 "ComfyUI's models/controlnet folder."}),
        }, "optional": {
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "Weights dtype. auto: float16 on a GPU, "
                                                                    "float32 on a CPU."}),
            "family": (FAMILY_CHOICES, {"default": "auto", "tooltip": "The model family the ControlNet is for; "
                                        "auto detects it from the weights. A family the weights contradict is "
                                        "an error."}),
        }}

    def load(self, control_net_name, dtype="auto", family="auto"):
        device = comfy_env.default_device()
        if dtype == "auto":  # half precision on a GPU, full precision on a CPU (half is slow or unsupported there)
            dtype = "float16" if device.startswith("cuda") else "float32"
        path = resolve(control_net_name)
        controlnet = _CACHE.get(path, _stamp(path), variant=(dtype, family, device), load=lambda: load_controlnet(
            path, None if family == "auto" else family, dtype, device))
        return (controlnet,)

"""The one module that touches ComfyUI's own modules. Everything else imports without ComfyUI.

Each helper answers "not inside ComfyUI" (None / False) when ComfyUI is absent.
"""
from __future__ import annotations

from pathlib import Path


def inside_comfyui() -> bool:
    try:
        import folder_paths  # noqa: F401
    except ImportError:
        return False
    return True


def comfy_tokenizer_dir(name: str) -> Path | None:
    """ComfyUI's bundled tokenizer folder (comfy/sd1_tokenizer, comfy/t5_tokenizer), when running inside ComfyUI."""
    try:
        import comfy
    except ImportError:
        return None
    folder = Path(comfy.__file__).resolve().parent / name
    return folder if folder.is_dir() else None

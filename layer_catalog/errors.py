"""How the pack's errors present themselves: every exception class under its public module name, and user input
echoed into a message at a bounded length.

ComfyUI imports a custom-node pack under its folder's path, so without this a class defined in native/capture.py
reports its module as '/x/custom_nodes/diffusion_feature.native.capture' (the `exception_type` of a failed node in
ComfyUI's /history). Widgets and the HTTP API take text of any length, and an error that quotes it whole can be
larger than the input itself.

Imports nothing of the pack, so every module can use it.
"""
from __future__ import annotations

PUBLIC_PACKAGE = "diffusion_feature"
ECHO_LIMIT = 200  # characters of a user's value quoted in an error message

# The pack's import name ('diffusion_feature', or a folder path under ComfyUI): this is <root>.layer_catalog.errors
_ROOT = __name__.rsplit(".", 2)[0]


def public_module(module: str) -> str:
    """The module name a user imports for one of the pack's modules, however the pack itself was imported."""
    if module == _ROOT or module.startswith(_ROOT + "."):
        return PUBLIC_PACKAGE + module[len(_ROOT):]
    return module


class DiffusionFeatureError(Exception):
    """Base of the pack's exception classes, mixed in before the builtin one each is (ValueError, TypeError, ...),
    so `except ValueError` still catches them. Every subclass gets its public module name."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = public_module(cls.__module__)


DiffusionFeatureError.__module__ = public_module(__name__)


def echo(value, limit: int = ECHO_LIMIT) -> str:
    """repr(value) for an error message, cut to about `limit` characters; a longer value keeps its start and says
    its length: 'xxxx...'... (100000 characters)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    shown = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    return f"{shown}... ({len(text)} characters)"

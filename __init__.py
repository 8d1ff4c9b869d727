"""Diffusion Feature nodes: a ComfyUI custom-node pack and a Python library for diffusion features.

ComfyUI imports this file from custom_nodes/; Python users import `diffusion_feature`. Neither needs the other:
without ComfyUI, the node mappings below are still importable and the engine works on its own.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.comfy_env import inside_comfyui

WEB_DIRECTORY = "./web"

if inside_comfyui():  # the layer picker's HTTP routes
    from .nodes.routes import register as _register_routes

    _register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
__version__ = "0.1.0"

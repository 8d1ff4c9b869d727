"""Diffusion Feature nodes: a ComfyUI custom-node pack and a Python library for diffusion features.

ComfyUI imports this file from custom_nodes/; Python users import `diffusion_feature`. Neither needs the other:
without ComfyUI, the node mappings below are still importable and the engine works on its own.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.comfy_env import inside_comfyui

WEB_DIRECTORY = "./web"

if inside_comfyui():
    from .layer_catalog.resolver import restrict_layer_files as _restrict_layer_files
    from .nodes.comfy_env import layer_file as _layer_file
    from .nodes.routes import register as _register_routes

    _restrict_layer_files(_layer_file)  # widgets are untrusted: layer files come from the input folder only
    _register_routes()  # the layer picker's HTTP routes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
__version__ = "0.1.0"

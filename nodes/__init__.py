"""ComfyUI node classes (thin) and the ComfyUI-free engine they call.

Node classes arrive with the node-pack issue; until then the mappings are empty so ComfyUI loads the pack cleanly.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

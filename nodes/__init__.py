"""ComfyUI node classes (thin) and the ComfyUI-free engine they call.

class_type names are public API (headless workflows use them): never rename them.
"""
from .node_apply_controlnet import DFApplyControlNet
from .node_controlnet import DFLoadControlNet
from .node_extract import DFExtractFeatures
from .node_generate import DFGenerate
from .node_hooks import DFAttachHooks, DFShowLayers
from .node_load import DFLoadCheckpoint, DFLoadDiffusers
from .node_lora import DFLoadLoRA
from .node_pnp import DFInvert, DFPnPTranslate
from .node_prompt import DFEncodePrompt
from .node_save import DFLoadFeatures, DFSaveFeatures
from .node_visualize import DFAttentionMap, DFFeaturePCA, DFSelfAttentionPCA

NODE_CLASS_MAPPINGS = {
    "DFLoadCheckpoint": DFLoadCheckpoint,
    "DFLoadDiffusers": DFLoadDiffusers,
    "DFEncodePrompt": DFEncodePrompt,
    "DFAttachHooks": DFAttachHooks,
    "DFExtractFeatures": DFExtractFeatures,
    "DFShowLayers": DFShowLayers,
    "DFFeaturePCA": DFFeaturePCA,
    "DFAttentionMap": DFAttentionMap,
    "DFSaveFeatures": DFSaveFeatures,
    "DFLoadFeatures": DFLoadFeatures,
    "DFGenerate": DFGenerate,
    "DFLoadControlNet": DFLoadControlNet,
    "DFApplyControlNet": DFApplyControlNet,
    "DFLoadLoRA": DFLoadLoRA,
    "DFInvert": DFInvert,
    "DFPnPTranslate": DFPnPTranslate,
    "DFSelfAttentionPCA": DFSelfAttentionPCA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DFLoadCheckpoint": "Load Checkpoint (Diffusion Feature)",
    "DFLoadDiffusers": "Load Diffusers Model (Diffusion Feature)",
    "DFEncodePrompt": "Encode Prompt (Diffusion Feature)",
    "DFAttachHooks": "Attach Layers (Diffusion Feature)",
    "DFExtractFeatures": "Extract Features",
    "DFShowLayers": "Show Layers",
    "DFFeaturePCA": "Feature PCA",
    "DFAttentionMap": "Attention Map",
    "DFSaveFeatures": "Save Features",
    "DFLoadFeatures": "Load Features",
    "DFGenerate": "Generate and Capture",
    "DFLoadControlNet": "Load ControlNet (Diffusion Feature)",
    "DFApplyControlNet": "Apply ControlNet (Diffusion Feature)",
    "DFLoadLoRA": "Load LoRA (Diffusion Feature)",
    "DFInvert": "DDIM Invert (Plug-and-Play)",
    "DFPnPTranslate": "Plug-and-Play Translate",
    "DFSelfAttentionPCA": "Self-Attention PCA",
}

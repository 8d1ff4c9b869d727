"""ComfyUI node classes: thin faces over the engine (`engine/` for DF_MODEL, `native/` for ComfyUI's own MODEL).

class_type names are public API (headless workflows use them): never rename them. `comfy_env` is the one module
here that touches ComfyUI; `routes` serves the pack's HTTP routes.
"""
from ..engine import tokenizers as _tokenizers
from ..native.capture import set_host_job_id as _set_host_job_id
from .comfy_env import comfy_tokenizer_dir as _comfy_tokenizer_dir
from .comfy_env import current_prompt_id as _current_prompt_id

_tokenizers.set_host_tokenizer_dir(_comfy_tokenizer_dir)  # ComfyUI's bundled T5 tokenizer, when inside ComfyUI
_set_host_job_id(_current_prompt_id)  # native captures keep their rows per prompt, when inside ComfyUI
from .node_apply_controlnet import DFApplyControlNet
from .node_controlnet import DFLoadControlNet
from .node_correspondence import DFMatchPoints, DFSimilarityMap
from .node_extract import DFExtractFeatures
from .node_generate import DFGenerate
from .node_hooks import DFAttachHooks, DFShowLayers
from .node_load import DFLoadCheckpoint, DFLoadDiffusers
from .node_lora import DFLoadLoRA
from .node_native import DFCaptureLayers, DFCollectFeatures, DFExtractNative
from .node_pnp import DFInvert, DFPnPTranslate
from .node_prompt import DFEncodePrompt
from .node_save import DFLoadFeatures, DFSaveFeatures
from .node_visualize import DFAttentionMap, DFFeaturePCA, DFSelfAttentionPCA

# keyed by class name: the class_type of each node
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    DFLoadCheckpoint, DFLoadDiffusers, DFEncodePrompt, DFAttachHooks, DFExtractFeatures, DFShowLayers, DFFeaturePCA,
    DFAttentionMap, DFSaveFeatures, DFLoadFeatures, DFGenerate, DFLoadControlNet, DFApplyControlNet, DFLoadLoRA,
    DFInvert, DFPnPTranslate, DFSelfAttentionPCA, DFCaptureLayers, DFCollectFeatures, DFExtractNative, DFMatchPoints,
    DFSimilarityMap)}
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
    "DFCaptureLayers": "Capture Layers (native MODEL)",
    "DFCollectFeatures": "Collect Captured Features",
    "DFExtractNative": "Extract Features (native MODEL)",
    "DFMatchPoints": "Match Points (correspondence)",
    "DFSimilarityMap": "Similarity Map (correspondence)",
}

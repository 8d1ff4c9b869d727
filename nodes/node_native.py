"""The native nodes: ComfyUI's own MODEL (Load Checkpoint, LoraLoader, Apply ControlNet ...) as a feature extractor.

DFCaptureLayers + any core sampler + DFCollectFeatures capture during sampling; DFExtractNative extracts at a
training timestep. Their DF_FEATURES are the DF_MODEL nodes' type: PCA, attention maps and saving take both.
"""
from __future__ import annotations

from . import comfy_env
from ..engine.features_io import check_layout_layers
from ..native import BRANCHES, capture_layers
from ..native.extract import DEFAULT_GUIDANCE, collect, extract_native
from .extract_inputs import extraction_options, timestep_inputs
from .node_hooks import PRESET_CHOICES, PRESET_TIP, parse_layer_text
from .prompt_graph import conditioning_text, fed_by

_LAYERS_TIP = ("Layer ids, one per line or comma separated (e.g. up-level1-repeat1-vit-block0-cross-q), or a JSON "
               "file in the input folder. The layer picker fills this.")


def _spec(layers: str, preset: str, required: bool = True) -> list[str]:
    spec = parse_layer_text(layers, preset, required)
    return [str(comfy_env.layer_file(s)) if s.lower().endswith(".json") else s for s in spec]


def _check_saves(ids: list[str], prompt, unique_id) -> None:
    """The DFSaveFeatures nodes that this capture's features reach in the prompt: a layout they cannot write with
    these layers fails now, before the sampler runs, rather than after it."""
    if not isinstance(prompt, dict) or unique_id is None:
        return
    for nid in fed_by(prompt, unique_id, DFCaptureLayers.RETURN_TYPES.index("DF_CAPTURE")):
        node = prompt[nid]
        layout = (node.get("inputs") or {}).get("layout")
        if node.get("class_type") == "DFSaveFeatures" and isinstance(layout, str):
            try:
                check_layout_layers(layout, ids)
            except ValueError as e:
                raise ValueError(f"DFSaveFeatures (node {nid}) saves these features: {e}; capture a spatial layer "
                                 "too, or save with another layout") from None


class DFCaptureLayers:
    DESCRIPTION = ("Capture layers of ComfyUI's own MODEL during sampling. Connect the MODEL output to any sampler "
                   "(KSampler, SamplerCustom, ...) and the capture to DFCollectFeatures. The input MODEL is not "
                   "changed; hooks exist only while the sampler's model calls run.")
    CATEGORY = "diffusion_feature/native"
    RETURN_TYPES = ("MODEL", "DF_CAPTURE")
    RETURN_NAMES = ("model", "capture")
    FUNCTION = "capture"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to capture from (Load Checkpoint, LoraLoader, ...)."}),
            "layers": ("STRING", {"multiline": True, "default": "", "tooltip": _LAYERS_TIP}),
            "preset": (PRESET_CHOICES, {"default": "practical", "tooltip": PRESET_TIP}),
            "capture_steps": ("STRING", {"default": "all",
                                         "tooltip": "Sampler steps to capture: 'all', 'last', 'every 5', "
                                                    "'every 5 from 2', '0, 10, 15-19' (0 is the first step, -1 "
                                                    "the last)."}),
            "branch": (list(BRANCHES), {"default": "cond",
                                        "tooltip": "The guidance branch to capture: positive (cond), negative "
                                                   "(uncond; needs cfg > 1) or both."}),
        }, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def capture(self, model, layers, preset="none", capture_steps="all", branch="cond", prompt=None,
                unique_id=None):
        spec = _spec(layers, preset)
        tapped, capture = capture_layers(model, spec, capture_steps, branch, device="cpu")
        _check_saves(capture.ids, prompt, unique_id)
        return tapped, capture


class DFCollectFeatures:
    DESCRIPTION = ("The features a DFCaptureLayers capture recorded while its sampler ran: one row per captured "
                   "step, branch and image, labelled with step, timestep, sigma and branch. The LATENT input "
                   "(the sampler's output) makes this node run after the sampler.")
    CATEGORY = "diffusion_feature/native"
    RETURN_TYPES = ("DF_FEATURES",)
    RETURN_NAMES = ("features",)
    FUNCTION = "collect"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "capture": ("DF_CAPTURE", {"tooltip": "From DFCaptureLayers."}),
            "latent": ("LATENT", {"tooltip": "The sampler's output latent: it orders this node after the sampler."}),
        }}

    def collect(self, capture, latent):
        return (collect(capture, latent),)


class DFExtractNative:
    DESCRIPTION = ("Extract layers of ComfyUI's own MODEL at training timestep t (0..999), as DFExtractFeatures: "
                   "the image is VAE-encoded, noised to t with a seeded draw and passed once through the model with "
                   "the positive conditioning, through ComfyUI's own model call, so ControlNets (Apply ControlNet) "
                   "and LoRAs (LoraLoader) apply exactly as in sampling.")
    CATEGORY = "diffusion_feature/native"
    RETURN_TYPES = ("DF_FEATURES",)
    RETURN_NAMES = ("features",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model (through DFCaptureLayers, whose layers are then used, or "
                                           "with `layers` filled in)."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt describing the image (CLIP Text Encode), with any "
                                                     "ControlNets applied."}),
            "image": ("IMAGE", {"tooltip": "The image(s) to describe."}),
            **timestep_inputs("the noise"),
        }, "optional": {
            "layers": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": _LAYERS_TIP + " Empty: the layers of DFCaptureLayers."}),
            "preset": (PRESET_CHOICES, {"default": "none", "tooltip": PRESET_TIP}),
            **extraction_options("applied"),
            "guidance": ("FLOAT", {"default": DEFAULT_GUIDANCE, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Flux dev's guidance embedding (3.5 as diffusers' FluxPipeline; it "
                                              "replaces a FluxGuidance value). Recorded in the metadata; models "
                                              "without one (SD3, Flux schnell) do not apply it and record none."}),
            "shift": ("BOOLEAN", {"default": False,
                                  "tooltip": "Flow models (Flux, SD3): off, sigma = t / 1000 at any image size; on, "
                                             "the MODEL's own shifted schedule (ModelSamplingFlux's resolution "
                                             "shift, ModelSamplingSD3's shift when applied; SD3's own is 3). "
                                             "Recorded in the metadata."}),
        }, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def extract(self, model, vae, positive, image, t, seed, layers="", preset="none", resize="keep-aspect",
                ensemble=1, feature_resize=1, offload=True, batch_size=4, denoise_from=0, denoise_steps=1,
                guidance=DEFAULT_GUIDANCE, shift=False, prompt=None, unique_id=None):
        on_batch = comfy_env.batch_progress(int(image.shape[0]))
        comfy_env.check_interrupt()
        spec = _spec(layers, preset, required=False) or None  # None: the layers of DFCaptureLayers
        features = extract_native(model, vae, positive, image, spec, t, seed,
                                  resize=resize, ensemble=ensemble, feature_resize=feature_resize, offload=offload,
                                  batch_size=batch_size, denoise_from=denoise_from or None,
                                  denoise_steps=denoise_steps, on_batch=on_batch,
                                  prompt=conditioning_text(prompt, unique_id, "positive"),
                                  interrupt=comfy_env.interrupt_callback(), shift=shift, guidance=guidance)
        return (features,)

"""DFExtractFeatures: the main node. Hooked model + images + conditioning -> DF_FEATURES."""
from __future__ import annotations

import torch

from . import comfy_env
from ..engine.extraction import extract_in_batches
from .extract_inputs import extraction_options, timestep_inputs


class DFExtractFeatures:
    DESCRIPTION = ("Extract the attached layers at training timestep t (0..999): the images are VAE-encoded, "
                   "noised to t with a seeded draw and passed once through the denoiser, stopping as soon as every "
                   "layer is captured. ControlNets attached to the conditioning and LoRAs of the model apply.")
    CATEGORY = "diffusion_feature/extract"
    RETURN_TYPES = ("DF_FEATURES",)
    RETURN_NAMES = ("features",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": "A model with layers attached (DFAttachHooks)."}),
            "image": ("IMAGE", {"tooltip": "The image(s) to describe."}),
            "conditioning": ("DF_CONDITIONING", {"tooltip": "The encoded prompt (DFEncodePrompt)."}),
            **timestep_inputs("the VAE sample and the noise"),
        }, "optional": extraction_options("on the conditioning")}

    def extract(self, model, image, conditioning, t, seed, resize="keep-aspect", ensemble=1, feature_resize=1,
                offload=True, batch_size=4, denoise_from=0, denoise_steps=1):
        if not model.layers:
            raise ValueError("this model has no layers attached: connect it through DFAttachHooks first")
        comfy_env.manage(model)
        for hint in conditioning.controls:
            comfy_env.manage_module(hint.controlnet.module, model.device)
        on_batch = comfy_env.batch_progress(int(image.shape[0]))
        comfy_env.check_interrupt()
        with torch.inference_mode():
            features = extract_in_batches(model, image, conditioning, model.layers, t, seed, batch_size=batch_size,
                                          on_batch=on_batch, resize=resize, ensemble=ensemble,
                                          feature_resize=feature_resize, offload=offload,
                                          denoise_from=denoise_from or None, denoise_steps=denoise_steps,
                                          interrupt=comfy_env.interrupt_callback())
        return (features,)

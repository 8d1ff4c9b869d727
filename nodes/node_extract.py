"""DFExtractFeatures: the main node. Hooked model + images + conditioning -> DF_FEATURES."""
from __future__ import annotations

import torch

from . import comfy_env
from ..engine.extraction import extract_in_batches
from ..engine.images import RESIZE_MODES


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
            "t": ("INT", {"default": 50, "min": 0, "max": 999,
                          "tooltip": "Training timestep: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the VAE sample and the noise: same seed, same features."}),
        }, "optional": {
            "resize": (list(RESIZE_MODES), {"default": "keep-aspect",
                                            "tooltip": "keep-aspect: the model's native area, sides multiples of "
                                                       "64; stretch: the native square; center-crop: crop first."}),
            "ensemble": ("INT", {"default": 1, "min": 1, "max": 64,
                                 "tooltip": "Average over this many noise draws (seed, seed+1, ...)."}),
            "feature_resize": ("INT", {"default": 1, "min": 1, "max": 16,
                                       "tooltip": "Average-pool spatial features by this factor (maps never)."}),
            "offload": ("BOOLEAN", {"default": True, "tooltip": "Move features to the CPU as they are captured."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images per forward."}),
            "denoise_from": ("INT", {"default": 0, "min": 0, "max": 999,
                                     "tooltip": "0: off. Above t: noise to this timestep instead and run guided "
                                                "DDIM steps down to t before capturing (with a ControlNet on the "
                                                "conditioning: the content-shift recipe, e.g. 60 -> 50)."}),
            "denoise_steps": ("INT", {"default": 1, "min": 1, "max": 100,
                                      "tooltip": "Denoising steps from denoise_from down to t."}),
        }}

    def extract(self, model, image, conditioning, t, seed, resize="keep-aspect", ensemble=1, feature_resize=1,
                offload=True, batch_size=4, denoise_from=0, denoise_steps=1):
        if not model.layers:
            raise ValueError("this model has no layers attached: connect it through DFAttachHooks first")
        comfy_env.manage(model)
        for hint in conditioning.controls:
            comfy_env.manage_module(hint.controlnet.module, model.device)
        progress = comfy_env.Progress(int(image.shape[0]))

        def step(n):
            progress.update(n)
            comfy_env.check_interrupt()

        comfy_env.check_interrupt()
        with torch.inference_mode():
            features = extract_in_batches(model, image, conditioning, model.layers, t, seed, batch_size=batch_size,
                                          on_batch=step, resize=resize, ensemble=ensemble,
                                          feature_resize=feature_resize, offload=offload,
                                          denoise_from=denoise_from or None, denoise_steps=denoise_steps,
                                          interrupt=comfy_env.interrupt_callback())
        return (features,)

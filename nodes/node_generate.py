"""DFGenerate: text-to-image / image-to-image that also captures the attached layers at chosen steps."""
from __future__ import annotations

import torch

from . import comfy_env
from ..engine.features_io import Features
from ..engine.generation import BRANCHES, generate, sampling_settings
from ..engine.samplers import DEFAULT_SCHEDULER, SCHEDULERS


# Widget values meaning "the model's default" (engine/generation.sampling_defaults): a widget's default cannot change
# with the model, and values a saved graph may hold keep their meaning (steps started at 1, cfg at 0)
FAMILY_DEFAULT_STEPS, FAMILY_DEFAULT_CFG = 0, -1.0


class DFGenerate:
    DESCRIPTION = ("Generate images (diffusers' sampling loop: the same seed gives the same image as the diffusers "
                   "pipeline) and capture the layers attached to the model at the chosen steps. Features come out "
                   "one row per captured step, branch and image, labelled with the step and its timestep; a joint "
                   "DFFeaturePCA over them gives a timeline. ControlNets attached to the conditioning apply.")
    CATEGORY = "diffusion_feature/generate"
    RETURN_TYPES = ("IMAGE", "DF_FEATURES")
    RETURN_NAMES = ("image", "features")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": "The model; with layers attached (DFAttachHooks) they are captured."}),
            "positive": ("DF_CONDITIONING", {"tooltip": "The prompt to generate (DFEncodePrompt), with any "
                                                        "ControlNets attached."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the initial noise (a CPU generator, as diffusers)."}),
            "steps": ("INT", {"default": FAMILY_DEFAULT_STEPS, "min": FAMILY_DEFAULT_STEPS, "max": 1000,
                              "tooltip": "Sampling steps; 0: the model's default, its diffusers pipeline's (e.g. "
                                         "50 for SD1.5, 8 for Z-Image Turbo, 4 for Flux schnell)."}),
            "cfg": ("FLOAT", {"default": FAMILY_DEFAULT_CFG, "min": FAMILY_DEFAULT_CFG, "max": 30.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance scale; at 1 or below (down to 0) only the "
                                         "positive branch runs; below 0 (-1): the model's default, its diffusers "
                                         "pipeline's (e.g. 7.5 for SD1.5, 1 for Flux dev and Z-Image Turbo, 4 "
                                         "for Qwen-Image)."}),
            "scheduler": (list(SCHEDULERS), {"default": DEFAULT_SCHEDULER,
                                             "tooltip": "The solver, on the checkpoint's own noise schedule; "
                                                        "'checkpoint' is the one it ships with."}),
            "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                              "tooltip": "Pixels; 0: the family's native size (ignored with an input image)."}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                               "tooltip": "Pixels; 0: the family's native size (ignored with an input image)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images generated together."}),
            "capture_steps": ("STRING", {"default": "every 5",
                                         "tooltip": "Steps whose layers are captured: 'all', 'last', 'every 5', "
                                                    "'every 5 from 2', '0, 10, 15-19' (0 is the first step, -1 "
                                                    "the last); empty: none."}),
            "capture_branch": (list(BRANCHES), {"default": "cond",
                                                "tooltip": "Which guidance branch to capture: the positive "
                                                           "(cond), the negative (uncond), or both."}),
        }, "optional": {
            "negative": ("DF_CONDITIONING", {"tooltip": "The negative prompt; unconnected: the empty prompt (zeros "
                                                        "for SDXL), as diffusers does."}),
            "image": ("IMAGE", {"tooltip": "Image-to-image: start from this image, noised according to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "Image-to-image strength: the last denoise x steps of the schedule "
                                             "run."}),
            "offload": ("BOOLEAN", {"default": True, "tooltip": "Move captured features to the CPU as they come."}),
        }}

    def run(self, model, positive, seed, steps, cfg, scheduler, width, height, batch_size, capture_steps,
            capture_branch, negative=None, image=None, denoise=1.0, offload=True):
        comfy_env.manage(model)
        for hint in positive.controls:
            comfy_env.manage_module(hint.controlnet.module, model.device)
        steps = None if steps <= FAMILY_DEFAULT_STEPS else steps  # generate takes None as the model's default
        cfg = None if cfg < 0 else cfg
        on_step = comfy_env.step_progress(sampling_settings(model, steps, cfg)[0], model.family)
        comfy_env.check_interrupt()
        with torch.inference_mode():
            result = generate(model, positive, negative, steps=steps, cfg=cfg, seed=seed, width=width or None,
                              height=height or None, batch=batch_size, scheduler=scheduler, image=image,
                              denoise=denoise, layers=model.layers, capture_steps=capture_steps,
                              capture_branch=capture_branch, offload=offload, on_step=on_step,
                              interrupt=comfy_env.interrupt_callback())
        features = result.features or Features.empty(result.images.shape[1:3], family=model.family, seed=seed)
        return (result.images, features)

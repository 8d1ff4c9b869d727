"""DFInvert and DFPnPTranslate: Plug-and-Play image translation (a real image, new prompts, its structure kept)."""
from __future__ import annotations

import torch

from . import comfy_env
from ..engine.features_io import Features
from ..engine.images import RESIZE_MODES
from ..engine.inversion import invert
from ..engine.pnp import CAPTURE_BRANCHES, NEGATIVE_SCHEDULES, translate
from ..layer_catalog.families import family_names


def _ids(text: str) -> list[str] | None:
    ids = [part for part in text.replace(",", " ").split() if part]
    return ids or None


class DFInvert:
    DESCRIPTION = ("DDIM-invert one image: its VAE latent walked up the DDIM schedule with a prompt (empty by "
                   "default), every step's latent kept for DFPnPTranslate. Optionally samples back and reports the "
                   "reconstruction error; with layers attached, captures them at the chosen inversion steps.")
    CATEGORY = "diffusion_feature/pnp"
    RETURN_TYPES = ("DF_INVERSION", "IMAGE", "DF_FEATURES")
    RETURN_NAMES = ("inversion", "reconstruction", "features")
    FUNCTION = "run"
    OUTPUT_NODE = True  # shows the reconstruction error on the node

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": f"A {' / '.join(family_names(lambda f: f.pnp_feature_layers))} model "
                                              "(with layers attached to capture them)."}),
            "image": ("IMAGE", {"tooltip": "The image to invert (one)."}),
            "prompt": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "The inversion prompt; empty as in Plug-and-Play."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "DDIM steps (the translation uses "
                                                                                "the same)."}),
        }, "optional": {
            "resize": (list(RESIZE_MODES), {"default": "keep-aspect",
                                            "tooltip": "keep-aspect: the model's native area, sides multiples of "
                                                       "64; stretch: the native square; center-crop."}),
            "check_reconstruction": ("BOOLEAN", {"default": True,
                                                 "tooltip": "Sample back from the last latent and report the "
                                                            "error (doubles the time)."}),
            "capture_steps": ("STRING", {"default": "", "tooltip": "Inversion steps to capture the attached layers "
                                                                   "at: 'all', 'every 5', '0, 10'; empty: none."}),
        }}

    def run(self, model, image, prompt, steps, resize="keep-aspect", check_reconstruction=True, capture_steps=""):
        comfy_env.manage(model)
        on_step = comfy_env.step_progress(steps * (2 if check_reconstruction else 1))
        with torch.inference_mode():
            inversion = invert(model, image[:1] if image.shape[0] > 1 else image, prompt, steps, resize=resize,
                               check=check_reconstruction, layers=model.layers, capture_steps=capture_steps,
                               on_step=on_step, interrupt=comfy_env.interrupt_callback())
        recon = inversion.reconstruction if inversion.reconstruction is not None else inversion.image
        features = inversion.features or Features.empty(inversion.size, family=model.family)
        text = (f"reconstruction: PSNR {inversion.error['psnr']:.2f} dB, mean abs error "
                f"{inversion.error['image_mae']:.4f}, latent RMSE {inversion.error['latent_rmse']:.4f}"
                if inversion.error else "reconstruction not checked")
        return {"ui": {"text": [text]}, "result": (inversion, recon, features)}


class DFPnPTranslate:
    DESCRIPTION = ("Plug-and-Play: generate the inverted image anew for each target prompt (one per line) while "
                   "injecting the source's residual features for the first feature_threshold of the steps and "
                   "its self-attention queries and keys for the first attention_threshold. Layer sets are layer "
                   "ids (empty: the original's choice for the family).")
    CATEGORY = "diffusion_feature/pnp"
    RETURN_TYPES = ("IMAGE", "DF_FEATURES")
    RETURN_NAMES = ("images", "features")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": "The model the image was inverted with (with layers attached to "
                                              "capture them)."}),
            "inversion": ("DF_INVERSION", {"tooltip": "From DFInvert."}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a golden sculpture",
                                   "tooltip": "Target prompts, one per line: one image each, run together."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance scale (higher: further from the source)."}),
            "feature_threshold": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Fraction of the steps (from the first) where residual "
                                                       "features are injected: structure preservation."}),
            "attention_threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "Fraction of the steps where self-attention q and k are "
                                                         "injected."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of DDIM's noise when eta > 0 (eta 0 is deterministic)."}),
        }, "optional": {
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "DDIM stochasticity: 0 (the original's) is deterministic."}),
            "feature_layers": ("STRING", {"multiline": True, "default": "",
                                          "tooltip": "Layer ids whose outputs are injected; empty: "
                                                     "up-level1-repeat1-res-increment (SDXL: up-level0-...)."}),
            "attention_layers": ("STRING", {"multiline": True, "default": "",
                                            "tooltip": "q/k layer ids injected; empty: the decoder's "
                                                       "self-attention q and k."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Pushed away from; empty: the inversion prompt."}),
            "negative_alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "1: no negative prompting; lower: stronger."}),
            "negative_schedule": (list(NEGATIVE_SCHEDULES), {"default": "linear",
                                                             "tooltip": "How the negative prompt's weight moves "
                                                                        "over the steps."}),
            "capture_steps": ("STRING", {"default": "", "tooltip": "Steps to capture the attached layers at; "
                                                                   "empty: none."}),
            "capture_branch": (list(CAPTURE_BRANCHES), {"default": "cond",
                                                        "tooltip": "Rows to capture: targets (cond), their "
                                                                   "negatives, both, or all with the source."}),
        }}

    def run(self, model, inversion, prompts, cfg, feature_threshold, attention_threshold, seed=0, eta=0.0,
            feature_layers="",
            attention_layers="", negative_prompt="", negative_alpha=1.0, negative_schedule="linear",
            capture_steps="", capture_branch="cond"):
        comfy_env.manage(model)
        targets = [line.strip() for line in prompts.splitlines() if line.strip()]
        on_step = comfy_env.step_progress(inversion.steps, model.family)
        with torch.inference_mode():
            out = translate(model, inversion, targets, cfg=cfg, feature_threshold=feature_threshold,
                            attention_threshold=attention_threshold, feature_layers=_ids(feature_layers),
                            attention_layers=_ids(attention_layers), negative=negative_prompt.strip(),
                            negative_alpha=negative_alpha, negative_schedule=negative_schedule, eta=eta, seed=seed,
                            layers=model.layers,
                            capture_steps=capture_steps, capture_branch=capture_branch, on_step=on_step,
                            interrupt=comfy_env.interrupt_callback())
        return (out.images, out.features or Features.empty(inversion.size, family=model.family))

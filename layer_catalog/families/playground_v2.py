"""Playground v2: the SDXL UNet and encoders with other weights. ComfyUI loads it as SDXL, and its single files
cannot be told from SDXL's: it is chosen by name only."""
from dataclasses import replace

from .family import Sampling
from .sdxl import FAMILY as SDXL

FAMILY = replace(SDXL, name="playground-v2", description="Playground v2 (the SDXL UNet)", comfy_configs=(),
                 checkpoint_marks=(), same_denoiser_as=SDXL.name,
                 # its model card's recipe on StableDiffusionXLPipeline (50 steps, the __call__ default)
                 sampling=Sampling(50, 3.0, "Playground v2's model card: guidance_scale 3"))

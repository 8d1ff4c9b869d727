"""Stable Diffusion 2.x: SD1.x's UNet layout (linear projections, other head counts) with OpenCLIP-H."""
from dataclasses import replace

from .family import TextEncoder
from .sd15 import FAMILY as SD15

FAMILY = replace(
    SD15, name="sd21", description="Stable Diffusion 2.x (OpenCLIP-H); 768 is the v-model's size, the base is 512",
    native_size=768, text_encoders=(TextEncoder("clip", 1024, pad="!"),),
    comfy_configs=("SD20", "SD21UnclipL", "SD21UnclipH"),
    checkpoint_marks=(r"model\.diffusion_model\.", r"cond_stage_model\.model\."),  # OpenCLIP-H inside
)

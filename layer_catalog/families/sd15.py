"""Stable Diffusion 1.x: the UNet with CLIP-L's last hidden state."""
from .family import Family, TextEncoder

FAMILY = Family(
    name="sd15", description="Stable Diffusion 1.x (CLIP-L)", denoiser="unet", native_size=512,
    text_encoders=(TextEncoder("clip", 768, pad="<|endoftext|>"),),
    # Presets from the paper (Meng et al., NeurIPS 2024): "practical" is its recommended choice, "legacy" the
    # conventional one (block outputs between up-levels).
    presets={"practical": ("up-level1-repeat1-vit-block0-cross-q", "up-level1-repeat2-res-out",
                           "up-level2-repeat1-vit-block0-cross-q", "up-level3-repeat0-vit-block0-self-k"),
             "legacy": ("up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out",
                        "up-level3-repeat2-vit-out")},
    comfy_configs=("SD15", "SD15_instructpix2pix"),
    checkpoint_marks=(r"model\.diffusion_model\.", r"cond_stage_model\.transformer\."),  # HF CLIP-L inside
    # Plug-and-Play's "output block 4"; its self-attention injection leaves out the decoder's first block
    pnp_feature_layers=("up-level1-repeat1-res-increment",), pnp_attention_skip="up-level1-repeat0-",
)

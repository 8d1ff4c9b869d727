"""Stable Diffusion XL: the UNet with added text/time conditioning, CLIP-L + OpenCLIP-bigG."""
from .family import Family, Sampling, TextEncoder

FAMILY = Family(
    name="sdxl", description="Stable Diffusion XL (CLIP-L + OpenCLIP-bigG)", denoiser="unet", native_size=1024,
    text_encoders=(TextEncoder("clip", 768, pad="<|endoftext|>"), TextEncoder("clip", 1280, pad="!")),
    presets={"practical": ("up-level0-repeat0-vit-block7-out", "up-level0-repeat0-vit-block5-out",
                           "up-level1-repeat0-vit-block0-cross-q", "up-level1-repeat0-vit-block0-out"),
             "legacy": ("up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-repeat2-res-out")},
    penultimate_text=True, pooled_text=True, zero_negative=True, vae_float32=True, latent_format="SDXL",
    comfy_configs=("SDXL", "SDXL_instructpix2pix", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
    checkpoint_marks=(r"model\.diffusion_model\.label_emb\.0\.0\.weight$",),
    pnp_feature_layers=("up-level0-repeat1-res-increment",),
    sampling=Sampling(50, 5.0, "StableDiffusionXLPipeline's __call__ defaults"),
)

"""PixArt-Sigma: a diffusion transformer (28 blocks) on T5 with 300 tokens."""
from .family import Family, Sampling, TextEncoder

FAMILY = Family(
    name="pixart-sigma", description="PixArt-Sigma (DiT, T5 with 300 tokens)", denoiser="transformer",
    native_size=1024, text_encoders=(TextEncoder("t5", 4096),), text_tokens=300,
    # Not covered by the paper's tables: practical = outputs of three middle blocks (DiT features are known to
    # peak mid-depth), legacy = the last block's output. Our choice; documented as such in the README.
    presets={"practical": ("vit-block12-out", "vit-block14-out", "vit-block16-out"), "legacy": ("vit-block27-out",)},
    vae_float32=True, latent_format="SDXL", comfy_configs=("PixArtSigma",),
    checkpoint_marks=(r"(transformer\.)?x_embedder\.proj\.weight$",), single_file=False,
    sampling=Sampling(20, 4.5, "PixArtSigmaPipeline's __call__ defaults"),
)

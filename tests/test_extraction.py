"""Extraction at timestep t equals noising the latent by hand and calling the UNet ourselves."""
from __future__ import annotations

import pytest
import torch

from conftest import inputs_for
from diffusion_feature.engine.conditioning import Conditioning
from diffusion_feature.engine.extraction import encode_latents, extract_latents
from diffusion_feature.engine.memory_guard import FeatureMemoryError
from diffusion_feature.engine.schedule import alphas_cumprod, check_timestep

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
IDS = ["down-level1-repeat0-vit-block0-self-k", "mid-repeat0-res-increment", "up-level1-repeat1-vit-block0-cross-map"]


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def test_alphas_cumprod_is_the_scaled_linear_schedule():
    abar = alphas_cumprod(dict(SD_SCHEDULER, _class_name="EulerDiscreteScheduler", timestep_spacing="leading"))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0), atol=1e-6, rtol=1e-5)


def test_extraction_equals_hand_noising(sd15_unet, vae):
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1  # non-square
    cond = Conditioning(torch.randn(1, 5, 32))
    t, seed = 261, 7
    abar = alphas_cumprod(SD_SCHEDULER)
    with torch.no_grad():
        x0 = encode_latents(vae, pixels, seed)
        got = extract_latents(sd15_unet, x0, cond, IDS + ["unet-out"], t, seed, abar)
        # by hand: the posterior sample, the noise, the forward
        dist = vae.encode(pixels).latent_dist
        z = (dist.mean + dist.std * torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(seed)))
        z = z * vae.config.scaling_factor
        torch.testing.assert_close(x0, z)
        eps = torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(seed))
        x_t = abar[t].sqrt().float() * z + (1 - abar[t]).sqrt().float() * eps
        out = sd15_unet(x_t, torch.tensor([t, t]), encoder_hidden_states=cond.encoder_hidden_states.expand(2, 5, 32))
    torch.testing.assert_close(got["unet-out"], out.sample, atol=1e-5, rtol=1e-4)
    assert got["mid-repeat0-res-increment"].shape == (2, 32, 1, 2)
    assert got["up-level1-repeat1-vit-block0-cross-map"].shape == (2, 2, 2 * 3, 5)  # mirrors down-level2: 2x3


def test_seed_and_timestep_semantics(sd15_unet):
    x0 = inputs_for(sd15_unet)["sample"]
    cond = Conditioning(torch.randn(2, 7, 32))
    abar = alphas_cumprod(SD_SCHEDULER)
    run = lambda t, seed, **kw: extract_latents(sd15_unet, x0, cond, IDS, t, seed, abar, **kw)  # noqa: E731
    a, b, c = run(50, 0), run(50, 0), run(50, 1)
    for i in IDS:
        assert torch.equal(a[i], b[i])
        assert not torch.equal(a[i], c[i])
    run(0, 0), run(999, 0)
    for bad in (-1, 1000, 2.5, True, "50"):
        with pytest.raises(ValueError, match="t must be an integer training timestep in 0..999"):
            run(bad, 0)
    # the ensemble is the mean over seed, seed + 1
    ens = run(50, 0, ensemble=2)
    for i in IDS:
        torch.testing.assert_close(ens[i], (a[i] + c[i]) / 2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="ensemble"):
        run(50, 0, ensemble=0)


def test_same_image_same_features_whatever_the_batch(sd15_unet):
    x0 = inputs_for(sd15_unet, batch=3)["sample"]
    cond = Conditioning(torch.randn(1, 7, 32))
    abar = alphas_cumprod(SD_SCHEDULER)
    batch = extract_latents(sd15_unet, x0, cond, IDS[:2], 500, 3, abar)
    alone = extract_latents(sd15_unet, x0[2:], cond, IDS[:2], 500, 3, abar)
    for i in IDS[:2]:
        torch.testing.assert_close(batch[i][2:], alone[i], atol=1e-5, rtol=1e-5)


def test_sdxl_conditioning_reaches_the_unet(sdxl_unet):
    kw = inputs_for(sdxl_unet, batch=2, tokens=4)
    cond = Conditioning(kw["encoder_hidden_states"], added_cond_kwargs=kw["added_cond_kwargs"])
    seen = {}
    handle = sdxl_unet.add_embedding.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    try:
        extract_latents(sdxl_unet, kw["sample"], cond, ["unet-out"], 10, 0, alphas_cumprod(SD_SCHEDULER))
    finally:
        handle.remove()
    time_embeds = sdxl_unet.add_time_proj(kw["added_cond_kwargs"]["time_ids"].flatten()).reshape(2, -1)
    want = torch.cat([kw["added_cond_kwargs"]["text_embeds"], time_embeds], dim=-1)
    torch.testing.assert_close(seen["in"], want)


def test_conditioning_batch_mismatch_is_an_error(sd15_unet):
    x0 = inputs_for(sd15_unet, batch=3)["sample"]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        extract_latents(sd15_unet, x0, Conditioning(torch.randn(2, 7, 32)), IDS[:1], 5, 0,
                        alphas_cumprod(SD_SCHEDULER))


def test_check_timestep_accepts_ints_only():
    assert check_timestep(0) == 0 and check_timestep(999) == 999


def test_maps_that_cannot_fit_are_refused_up_front(sd15_unet, monkeypatch):
    from diffusion_feature.engine import extraction

    x0 = inputs_for(sd15_unet, (8, 12), batch=2)["sample"]
    cond = Conditioning(torch.randn(1, 7, 32))
    ids = ["down-level0-repeat0-vit-block0-self-map", "up-level3-repeat1-vit-block0-cross-map"]
    from diffusion_feature.layer_catalog import resolve_taps
    sizes = [2 * 4 * 2 * 96 * 96, 2 * 4 * 2 * 96 * 7]  # the two maps: batch x fp32 x heads x Nq x Nk
    # the run's plan: the maps it keeps, and the peak of the forward that computes them (on the same device here)
    need = extraction.extraction_needs(sd15_unet, resolve_taps(ids, sd15_unet), 2, (8, 12), 7)[torch.device("cpu")]
    assert dict(need.parts)["the features of 2 images"] == sum(sizes) and need.total > sum(sizes)
    monkeypatch.setattr(extraction, "_free_bytes", lambda device: 1000)
    calls = []
    hook = sd15_unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(FeatureMemoryError,
                           match=rf"need {need.total / 2**20:.1f} MiB on cpu \(.*\) but only 0\.0 MiB is free"):
            extract_latents(sd15_unet, x0, cond, ids, 50, 0, alphas_cumprod(SD_SCHEDULER))
        monkeypatch.setattr(extraction, "_free_bytes", lambda device: need.total - 1)
        with pytest.raises(FeatureMemoryError):
            extract_latents(sd15_unet, x0, cond, ids, 50, 0, alphas_cumprod(SD_SCHEDULER))
    finally:
        hook.remove()
    assert calls == []  # refused before the forward
    monkeypatch.setattr(extraction, "_free_bytes", lambda device: need.total)
    extract_latents(sd15_unet, x0, cond, ids, 50, 0, alphas_cumprod(SD_SCHEDULER))  # exactly fits: runs


def test_an_image_tensor_reaches_the_vae_in_floating_point():
    """A ComfyUI IMAGE is prepared in floats (no 8-bit round trip): at the model's size it is passed on exactly;
    resized, it stays close to a float resize rather than to 8-bit steps; its input size is recorded."""
    from diffusion_feature.engine.extraction import _pixels

    image = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    pixels, input_size = _pixels(image, 64, "stretch", "96x64")
    assert input_size == (96, 64) and pixels.dtype == torch.float32
    assert torch.equal(pixels, image.permute(0, 3, 1, 2) * 2 - 1)
    eight_bit = (image[:1] * 255).round() / 255  # what ComfyUI's LoadImage makes of a file: its very pixels
    from PIL import Image
    png = Image.fromarray((eight_bit[0] * 255).round().to(torch.uint8).numpy())
    assert torch.equal(_pixels(eight_bit, 64, "stretch", "96x64")[0], _pixels([png], 64, "stretch", "96x64")[0])
    half, _ = _pixels(image, 64, "stretch", "48x32")
    assert half.shape == (2, 3, 32, 48) and not torch.equal(half, (half * 127.5).round() / 127.5)

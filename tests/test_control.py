"""ControlNet guidance in extraction and generation, and extraction's denoise_from (the content-shift recipe)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_controlnet, tiny_feature_model, tiny_pixart_model
from diffusion_feature.engine.conditioning import with_time_ids
from diffusion_feature.engine.control import ControlError, attach_control
from diffusion_feature.engine.controlnet import ControlNet, ControlNetError
from diffusion_feature.engine.extraction import encode_latents, extract
from diffusion_feature.engine.generation import generate
from diffusion_feature.engine.prompts import encode_prompt
from diffusion_feature.engine.samplers import make_scheduler
from diffusion_feature.engine.schedule import noise_latents

SIZE = 64
DOWN = ["down-level1-repeat1-res-out", "down-level2-repeat0-vit-out"]
MID = ["mid-repeat1-res-out"]  # the mid block's own output: the mid residual is added after it
UP = ["up-level1-repeat0-res-out", "up-level3-repeat2-res-out"]


@pytest.fixture(scope="module")
def sd15():
    return tiny_feature_model("sd15")


@pytest.fixture(scope="module")
def nets(sd15):
    return [ControlNet(tiny_controlnet(sd15.denoiser, seed=s), None, "test", f"net{s}") for s in (1, 2)]


@pytest.fixture(scope="module")
def photo():
    torch.manual_seed(0)
    return torch.rand(1, SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def edges():
    torch.manual_seed(1)
    return (torch.rand(1, SIZE, SIZE, 3) > 0.8).float()


def _extract(model, image, cond, **kw):
    return extract(model, image, cond, DOWN + MID + UP, t=50, seed=3, size=f"{SIZE}x{SIZE}", **kw).tensors


def test_strength_zero_equals_no_controlnet_and_residuals_reach_only_the_decoder(sd15, nets, photo, edges):
    cond = encode_prompt(sd15, "a house")
    plain = _extract(sd15, photo, cond)
    zero = _extract(sd15, photo, attach_control(cond, nets[0], edges, strength=0.0))
    guided = _extract(sd15, photo, attach_control(cond, nets[0], edges, strength=1.0))
    for k in plain:
        assert torch.equal(zero[k], plain[k]), k
    for k in DOWN + MID:  # residuals join the skip connections and the mid output: the encoder is untouched
        assert torch.equal(guided[k], plain[k]), k
    for k in UP:
        assert not torch.allclose(guided[k], plain[k]), k


def test_chained_controlnets_add_their_residuals(sd15, nets, photo, edges):
    cond = encode_prompt(sd15, "a house")
    other = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
    chained = attach_control(attach_control(cond, nets[0], edges, 0.7), nets[1], other, 1.3)
    got = _extract(sd15, photo, chained)
    # by hand: the same noisy latent, each ControlNet called directly, residuals summed, one UNet call recorded
    pixels = photo.permute(0, 3, 1, 2) * 2 - 1  # an IMAGE reaches the VAE in floats
    x_t = noise_latents(encode_latents(sd15.vae, pixels, 3), 50, sd15.alphas_cumprod, 3)
    t = torch.tensor([50])
    text = cond.encoder_hidden_states
    down, mid = None, None
    for net, image, scale in ((nets[0], edges, 0.7), (nets[1], other, 1.3)):
        d, m = net.module(x_t, t, encoder_hidden_states=text, controlnet_cond=image.permute(0, 3, 1, 2),
                          conditioning_scale=scale, return_dict=False)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    from diffusion_feature.layer_catalog import resolve_taps

    taps = resolve_taps(UP, sd15.denoiser, "sd15")
    outputs = {}
    handles = [dict(sd15.denoiser.named_modules())[tap.module_path].register_forward_hook(
        lambda _m, _a, out, k=tap.id: outputs.__setitem__(k, out)) for tap in taps]
    try:
        sd15.denoiser(x_t, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid)
    finally:
        for h in handles:
            h.remove()
    for k in UP:
        torch.testing.assert_close(got[k], outputs[k], atol=1e-6, rtol=1e-5)


def test_generation_with_controlnet_equals_the_diffusers_controlnet_pipeline(sd15, nets, edges):
    from diffusers import StableDiffusionControlNetPipeline

    pos, neg = encode_prompt(sd15, "a red house"), encode_prompt(sd15, "")
    guided = attach_control(pos, nets[0], edges, strength=0.8, start=0.25, end=0.75)
    ours = generate(sd15, guided, neg, steps=4, cfg=4.0, seed=9, width=SIZE, height=SIZE, scheduler="euler")
    pipe = StableDiffusionControlNetPipeline(
        vae=sd15.vae, text_encoder=sd15.text_encoders[0], tokenizer=sd15.tokenizers[0], unet=sd15.denoiser,
        controlnet=nets[0].module, scheduler=make_scheduler(sd15.scheduler_config, "euler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref = pipe(prompt_embeds=pos.encoder_hidden_states, negative_prompt_embeds=neg.encoder_hidden_states,
               image=edges.permute(0, 3, 1, 2), controlnet_conditioning_scale=0.8, control_guidance_start=0.25,
               control_guidance_end=0.75, num_inference_steps=4, guidance_scale=4.0, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(9), output_type="pt")
    torch.testing.assert_close(ours.images, ref.images.permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    plain = generate(sd15, pos, neg, steps=4, cfg=4.0, seed=9, width=SIZE, height=SIZE, scheduler="euler")
    assert not torch.allclose(ours.images, plain.images)


@pytest.mark.parametrize("with_controlnet", [False, True])
def test_denoise_from_runs_guided_ddim_steps_down_to_t(sd15, nets, photo, edges, with_controlnet):
    cond = encode_prompt(sd15, "a house")
    if with_controlnet:
        cond = attach_control(cond, nets[0], edges, strength=1.0)
    got = extract(sd15, photo, cond, UP, t=50, seed=4, size=f"{SIZE}x{SIZE}", denoise_from=60,
                  denoise_steps=2).tensors
    assert not torch.equal(got[UP[0]], extract(sd15, photo, cond, UP, t=50, seed=4, size=f"{SIZE}x{SIZE}").tensors[
        UP[0]])
    # by hand: x_60 from the seeded noise, eps at 60 and 55, the DDIM formula, then the taps at 50
    abar = sd15.alphas_cumprod
    pixels = photo.permute(0, 3, 1, 2) * 2 - 1  # an IMAGE reaches the VAE in floats
    x = noise_latents(encode_latents(sd15.vae, pixels, 4), 60, abar, 4)
    text = cond.encoder_hidden_states

    def unet(x, t):
        extra = {}
        if with_controlnet:
            d, m = nets[0].module(x, torch.tensor([t]), encoder_hidden_states=text,
                                  controlnet_cond=edges.permute(0, 3, 1, 2), return_dict=False)
            extra = {"down_block_additional_residuals": d, "mid_block_additional_residual": m}
        return sd15.denoiser(x, torch.tensor([t]), encoder_hidden_states=text, **extra).sample

    for a, b in ((60, 55), (55, 50)):
        eps = unet(x, a)
        x0 = (x - (1 - abar[a]).sqrt().float() * eps) / abar[a].sqrt().float()
        x = abar[b].sqrt().float() * x0 + (1 - abar[b]).sqrt().float() * eps
    from diffusion_feature.layer_catalog import resolve_taps

    paths = [t.module_path for t in resolve_taps(UP, sd15.denoiser, "sd15")]
    rec = {}
    handles = [dict(sd15.denoiser.named_modules())[p].register_forward_hook(
        lambda _m, _a, out, p=p: rec.__setitem__(p, out)) for p in paths]
    try:
        unet(x, 50)
    finally:
        for h in handles:
            h.remove()
    for layer, path in zip(UP, paths):
        torch.testing.assert_close(got[layer], rec[path], atol=1e-5, rtol=1e-4)


def test_denoise_from_works_for_sdxl_with_time_ids():
    model = tiny_feature_model("sdxl")
    image = torch.rand(1, SIZE, 96, 3, generator=torch.Generator().manual_seed(0))
    feats = extract(model, image, "a cat", ["mid-repeat1-res-out"], t=30, seed=0, size="96x64", denoise_from=80,
                    denoise_steps=3)
    assert feats.meta["denoise_from"] == 80 and feats.tensors["mid-repeat1-res-out"].isfinite().all()


def test_control_and_denoise_from_errors(sd15, nets, photo, edges):
    cond = encode_prompt(sd15, "a house")
    with pytest.raises(ValueError, match=r"denoise_from \(50\) must be above t \(50\)"):
        extract(sd15, photo, cond, UP, t=50, size=f"{SIZE}x{SIZE}", denoise_from=50)
    with pytest.raises(ValueError, match="3 denoising steps do not fit between timesteps 52 and 50"):
        extract(sd15, photo, cond, UP, t=50, size=f"{SIZE}x{SIZE}", denoise_from=52, denoise_steps=3)
    with pytest.raises(ControlError, match="strength must be a finite number >= 0, got -0.5"):
        attach_control(cond, nets[0], edges, strength=-0.5)
    with pytest.raises(ControlError, match="0 <= start < end <= 1"):
        attach_control(cond, nets[0], edges, start=0.6, end=0.4)
    with pytest.raises(ControlError, match="IMAGE tensor"):
        attach_control(cond, nets[0], torch.rand(64, 64))
    sdxl = tiny_feature_model("sdxl")
    wrong = attach_control(encode_prompt(sdxl, "a cat"), nets[0], edges)
    with pytest.raises(ControlNetError):
        extract(sdxl, photo, wrong, ["mid-repeat1-res-out"], size=f"{SIZE}x{SIZE}")
    with pytest.raises(ControlNetError):
        generate(sdxl, wrong, steps=1, width=SIZE, height=SIZE)
    pixart = tiny_pixart_model()
    with pytest.raises(ControlNetError, match="pixart-sigma"):
        generate(pixart, attach_control(encode_prompt(pixart, "a cat"), nets[0], edges), steps=1, width=SIZE,
                 height=SIZE)
    two = attach_control(cond, nets[0], torch.rand(2, SIZE, SIZE, 3))
    with pytest.raises(ControlError, match="2 control images for a batch of 3"):
        generate(sd15, two, batch=3, steps=1, cfg=1.0, width=SIZE, height=SIZE)


def test_conditioning_with_controls_is_a_copy_and_survives_time_ids(sd15, nets, edges):
    cond = encode_prompt(sd15, "a house")
    guided = attach_control(cond, nets[0], edges)
    assert cond.controls == () and len(guided.controls) == 1
    assert with_time_ids(guided, 64, 64).controls == guided.controls
    four = attach_control(cond, nets[0], torch.rand(4, SIZE, SIZE, 3))
    assert four.take(1, 3).controls[0].image.shape[0] == 2

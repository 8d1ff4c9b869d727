"""DDIM inversion and Plug-and-Play translation: the algebra, the invert -> sample path of every supported family,
injection through taps, and the promised errors."""
from __future__ import annotations

import pytest
import torch

from conftest import SD_SCHEDULER, hook_state, tiny_feature_model, tiny_sd15_unet
from diffusion_feature.layer_catalog import LayerIdError
from diffusion_feature.engine.ddim import move_between
from diffusion_feature.engine.generation import generate
from diffusion_feature.engine.inversion import Inversion, InversionError, fingerprint, invert
from diffusion_feature.engine.pnp import PnPError, negative_weights, translate
from diffusion_feature.engine.conditioning import with_time_ids
from diffusion_feature.engine.prompts import encode_prompt
from diffusion_feature.engine.samplers import make_scheduler

FEATURE = "up-level1-repeat1-res-increment"
QUERY = "up-level2-repeat1-vit-block0-self-q"


@pytest.fixture(scope="module")
def photo():
    return torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def inversion(sd15, photo):
    return invert(sd15, photo, "a house", steps=5, size="96x64")


def test_one_inversion_step_then_one_sampling_step_has_the_known_first_order_error():
    """With eps(x) = 0.3 x + c the two predictions differ, and the round trip misses x by exactly
    (sqrt(1 - a_s) - sqrt(a_s) sqrt(1 - a_t) / sqrt(a_t)) (eps(x_t) - eps(x_s))."""
    from diffusion_feature.engine.schedule import alphas_cumprod

    abar = alphas_cumprod(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x_s, c = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    stub = lambda x: 0.3 * x + c  # noqa: E731
    for s, t in ((100, 300), (0, 20), (500, 980)):
        a_s, a_t = float(abar[s]), float(abar[t])
        x_t = move_between(x_s, stub(x_s), a_s, a_t)  # inversion: the prediction read at x_s's level
        back = move_between(x_t, stub(x_t), a_t, a_s)  # sampling
        coefficient = (1 - a_s) ** 0.5 - a_s ** 0.5 * (1 - a_t) ** 0.5 / a_t ** 0.5
        torch.testing.assert_close(back - x_s, coefficient * (stub(x_t) - stub(x_s)), atol=1e-12, rtol=1e-9)
        # a prediction that does not depend on the latent inverts exactly
        exact = move_between(move_between(x_s, c, a_s, a_t), c, a_t, a_s)
        torch.testing.assert_close(exact, x_s, atol=1e-12, rtol=1e-9)


def test_inversion_latents_follow_the_ddim_schedule(sd15, inversion):
    sched = make_scheduler(sd15.scheduler_config, "ddim")
    sched.set_timesteps(5)
    assert inversion.timesteps == sorted(int(t) for t in sched.timesteps)
    assert inversion.latents.shape == (6, 4, 8, 12) and inversion.size == (64, 96)
    # the first step by hand: eps at (x0, t1), read at the clean level (final_alpha_cumprod), moved to t1
    x0, t1 = inversion.latents[:1], inversion.timesteps[0]
    cond = with_time_ids(encode_prompt(sd15, "a house"), 64, 96)
    eps = sd15.denoiser(x0, torch.tensor([t1]), encoder_hidden_states=cond.encoder_hidden_states).sample
    a0, a1 = float(sched.final_alpha_cumprod), float(sched.alphas_cumprod[t1])
    by_hand = a1 ** 0.5 * (x0 - (1 - a0) ** 0.5 * eps) / a0 ** 0.5 + (1 - a1) ** 0.5 * eps
    torch.testing.assert_close(inversion.latents[1:2], by_hand, atol=1e-5, rtol=1e-5)
    # the reported error is the reconstruction's, which is DDIM sampling back down the schedule by hand
    x = inversion.latents[-1:]
    descending = list(reversed(inversion.timesteps))
    for i, t in enumerate(descending):
        eps = sd15.denoiser(x, torch.tensor([t]), encoder_hidden_states=cond.encoder_hidden_states).sample
        a_t = float(sched.alphas_cumprod[t])
        a_n = float(sched.alphas_cumprod[descending[i + 1]]) if i + 1 < len(descending) else a0
        x = a_n ** 0.5 * (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5 + (1 - a_n) ** 0.5 * eps
    rmse = (x - inversion.latents[:1]).pow(2).mean().sqrt().item()
    assert inversion.error["latent_rmse"] == pytest.approx(rmse, rel=1e-4)
    assert inversion.error["image_mae"] == pytest.approx((inversion.reconstruction - inversion.image).abs().mean()
                                                         .item())


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_invert_and_sample_back_runs_for_every_supported_family(family, photo):
    if family == "sd21":  # the SD2.1 layout: an sd15-shaped UNet with a v-prediction schedule
        model = tiny_feature_model("sd15").clone(family="sd21", scheduler_config=dict(
            SD_SCHEDULER, prediction_type="v_prediction"))
    else:
        model = tiny_feature_model(family)
    inv = invert(model, photo, "", steps=4, size="96x64")
    assert inv.family == family and inv.reconstruction.shape == (1, 64, 96, 3)
    assert set(inv.error) == {"latent_rmse", "image_mae", "psnr"}
    assert all(torch.isfinite(torch.tensor(v)) for v in inv.error.values())
    out = translate(model, inv, ["a cat"], cfg=3.0)
    assert out.images.shape == (1, 64, 96, 3) and out.images.isfinite().all()


def _generated_source(model, prompt: str, steps: int):
    """An Inversion whose latents are a DDIM generation's own trajectory (Plug-and-Play's generated-image mode)."""
    x_T = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    trajectory = [x_T]
    gen = generate(model, prompt, steps=steps, cfg=1.0, width=96, height=64, scheduler="ddim", latents=x_T,
                   on_step=lambda i, n, latents, x0: trajectory.append(latents.clone()))
    ascending = list(reversed([int(t) for t in _timesteps(model, steps)]))
    latents = torch.cat(list(reversed(trajectory)))  # clean end first, then up the schedule
    cond = with_time_ids(encode_prompt(model, prompt), 64, 96)
    return gen, Inversion(latents, ascending, cond, prompt, model.family, (64, 96), fingerprint(model), gen.images)


def _timesteps(model, steps):
    sched = make_scheduler(model.scheduler_config, "ddim")
    sched.set_timesteps(steps)
    return sched.timesteps


def test_full_injection_with_the_source_prompt_reproduces_the_source_generation(sd15):
    gen, source = _generated_source(sd15, "a red house", 4)
    out = translate(sd15, source, ["a red house"], cfg=1.0, feature_threshold=1.0, attention_threshold=1.0)
    torch.testing.assert_close(out.images, gen.images, atol=1e-5, rtol=0)
    other = translate(sd15, source, ["a cat"], cfg=1.0, feature_threshold=1.0, attention_threshold=1.0)
    assert not torch.allclose(other.images, gen.images, atol=1e-3)


def test_no_injection_equals_plain_generation_from_the_inverted_latent(sd15, inversion):
    out = translate(sd15, inversion, ["a cat", "a dog"], cfg=4.0, feature_threshold=0.0, attention_threshold=0.0)
    plain = generate(sd15, ["a cat", "a dog"], None, steps=inversion.steps, cfg=4.0, width=96, height=64,
                     scheduler="ddim", latents=inversion.latents[-1:])
    torch.testing.assert_close(out.images, plain.images, atol=1e-5, rtol=0)
    injected = translate(sd15, inversion, ["a cat", "a dog"], cfg=4.0)
    assert not torch.allclose(injected.images, plain.images, atol=1e-3)


def test_injected_taps_equal_the_source_taps_of_the_same_step(sd15, inversion):
    before = hook_state(sd15.denoiser)
    out = translate(sd15, inversion, ["a cat", "a dog"], cfg=4.0, feature_threshold=0.6, attention_threshold=0.4,
                    attention_layers=[QUERY, QUERY[:-1] + "k"], layers=[FEATURE, QUERY, "mid-repeat1-res-out"],
                    capture_steps="all", capture_branch="all")
    assert hook_state(sd15.denoiser) == before
    rows = out.features.meta["rows"]
    assert [r["branch"] for r in rows[:5]] == ["source", "uncond", "uncond", "cond", "cond"]
    feats = out.features.tensors
    for step in range(5):  # 5 steps: features injected in the first 3 (0.6), queries in the first 2 (0.4)
        block = slice(5 * step, 5 * step + 5)
        for layer, injected_until in ((FEATURE, 3), (QUERY, 2)):
            x = feats[layer][block]
            same = [torch.equal(x[r], x[0]) for r in range(1, 5)]
            assert same == [step < injected_until] * 4, (layer, step)
        mid = feats["mid-repeat1-res-out"][block]  # not injected: the targets' own features
        assert not torch.equal(mid[3], mid[0])
    # the source row at each step is the inverted latent's own forward (independent hook on a plain call)
    t = rows[0]["timestep"]
    src = inversion.conditioning.encoder_hidden_states
    record = {}
    module = dict(sd15.denoiser.named_modules())["up_blocks.1.resnets.1.conv2"]
    handle = module.register_forward_hook(lambda _m, _a, o: record.__setitem__("x", o))
    try:
        sd15.denoiser(inversion.latent_at(int(t)), torch.tensor(int(t)), encoder_hidden_states=src)
    finally:
        handle.remove()
    torch.testing.assert_close(feats[FEATURE][0], record["x"][0], atol=1e-5, rtol=1e-5)


def test_negative_prompt_schedules():
    assert negative_weights(1.0, "constant", 4).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert negative_weights(0.75, "linear", 3).tolist() == [0.75, 0.375, 0.0]
    w = negative_weights(1.0, "exp", 3)
    assert w[0] == 1.0 and w[-1] == pytest.approx(torch.exp(torch.tensor(-6.0)).item())


def test_negative_prompting_changes_the_translation(sd15, inversion):
    plain = translate(sd15, inversion, ["a cat"], cfg=4.0)
    pushed = translate(sd15, inversion, ["a cat"], cfg=4.0, negative="a dog", negative_alpha=0.5,
                       negative_schedule="linear")
    assert not torch.allclose(plain.images, pushed.images)
    no_effect = translate(sd15, inversion, ["a cat"], cfg=4.0, negative="a dog", negative_alpha=1.0)
    torch.testing.assert_close(no_effect.images, plain.images, atol=0, rtol=0)


def test_eta_draws_seeded_noise(sd15, inversion):
    a = translate(sd15, inversion, ["a cat"], cfg=3.0, eta=0.5, seed=1)
    b = translate(sd15, inversion, ["a cat"], cfg=3.0, eta=0.5, seed=1)
    c = translate(sd15, inversion, ["a cat"], cfg=3.0, eta=0.5, seed=2)
    d = translate(sd15, inversion, ["a cat"], cfg=3.0, seed=2)
    assert torch.equal(a.images, b.images) and not torch.allclose(a.images, c.images)
    torch.testing.assert_close(d.images, translate(sd15, inversion, ["a cat"], cfg=3.0, seed=7).images, atol=0,
                               rtol=0)  # eta 0: the seed plays no part


def test_bad_inputs(sd15, sdxl, inversion, photo):
    with pytest.raises(PnPError, match="feature_threshold must be a fraction of the steps in 0..1, got 1.5"):
        translate(sd15, inversion, ["a cat"], feature_threshold=1.5)
    with pytest.raises(PnPError, match="attention_threshold must be a fraction .* got -0.1"):
        translate(sd15, inversion, ["a cat"], attention_threshold=-0.1)
    with pytest.raises(PnPError, match="eta must be in 0..1"):
        translate(sd15, inversion, ["a cat"], eta=-1.0)
    with pytest.raises(PnPError, match="negative_alpha must be in 0..1"):
        translate(sd15, inversion, ["a cat"], negative_alpha=2.0)
    with pytest.raises(PnPError, match="negative_schedule must be one of constant, linear, exp"):
        translate(sd15, inversion, ["a cat"], negative_schedule="cosine")
    with pytest.raises(LayerIdError, match="nearest valid ids"):
        translate(sd15, inversion, ["a cat"], feature_layers=["up-level1-repeat9-res-increment"])
    with pytest.raises(ValueError, match="cannot be injected"):
        translate(sd15, inversion, ["a cat"], attention_layers=["up-level2-repeat1-vit-block0-self-map"])
    other_weights = sd15.clone(denoiser=tiny_sd15_unet(seed=1))
    with pytest.raises(InversionError, match="made with other weights"):
        translate(other_weights, inversion, ["a cat"])
    with pytest.raises(InversionError, match="made with a sd15 model; the model given is sdxl"):
        translate(sdxl, inversion, ["a cat"])
    tampered = Inversion(inversion.latents[:, :, :4], inversion.timesteps, inversion.conditioning, "a house",
                         "sd15", inversion.size, inversion.fingerprint, inversion.image)
    with pytest.raises(InversionError, match="latents of 4x12 do not fit its 64x96 image"):
        translate(sd15, tampered, ["a cat"])
    with pytest.raises(InversionError, match="invert one image at a time"):
        invert(sd15, torch.rand(2, 64, 64, 3), steps=2)
    with pytest.raises(InversionError, match="steps must be an integer >= 1"):
        invert(sd15, photo, steps=0)

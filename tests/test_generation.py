"""Generation with capture: same images as diffusers' pipelines for the same seed, captured taps equal to an
independent hook on the UNet call of each step, capture state owned by each run."""
from __future__ import annotations

import pytest
import torch

from conftest import hook_state, tiny_pixart_model
from diffusion_feature.engine.generation import generate
from diffusion_feature.engine.prompts import encode_prompt
from diffusion_feature.engine.samplers import SCHEDULERS, make_scheduler, parse_capture_steps

SIZE = 64  # pixels: an 8x8 latent


def _pipe_images(out) -> torch.Tensor:
    return out.images.permute(0, 2, 3, 1).float()


def _sd15_pipeline(model, scheduler, cls_name="StableDiffusionPipeline"):
    import diffusers

    return getattr(diffusers, cls_name)(
        unet=model.denoiser, vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
        scheduler=make_scheduler(model.scheduler_config, scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m", "euler_ancestral"])
def test_sd15_text_to_image_equals_the_diffusers_pipeline(sd15, scheduler):
    pos, neg = encode_prompt(sd15, "a photo of a cat"), encode_prompt(sd15, "blurry")
    ours = generate(sd15, pos, neg, steps=4, cfg=5.0, seed=3, width=SIZE, height=SIZE, batch=2, scheduler=scheduler)
    pipe = _sd15_pipeline(sd15, scheduler)
    ref = pipe(prompt_embeds=pos.encoder_hidden_states, negative_prompt_embeds=neg.encoder_hidden_states,
               num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(3), output_type="pt")
    assert ours.images.shape == (2, SIZE, SIZE, 3)
    torch.testing.assert_close(ours.images, _pipe_images(ref), atol=1e-5, rtol=0)
    assert not torch.equal(ours.images[0], ours.images[1])  # one noise draw for the batch, not one per image


def test_sd15_image_to_image_equals_the_diffusers_pipeline(sd15):
    torch.manual_seed(0)
    image = torch.rand(1, SIZE, SIZE, 3)
    pos = encode_prompt(sd15, "a red house")
    ours = generate(sd15, pos, "", steps=5, cfg=4.0, seed=7, image=image, denoise=0.6, scheduler="ddim",
                    width=SIZE, height=SIZE, batch=2)
    pipe = _sd15_pipeline(sd15, "ddim", "StableDiffusionImg2ImgPipeline")
    pixels = image.permute(0, 3, 1, 2) * 2 - 1  # an IMAGE reaches the VAE in floats
    ref = pipe(prompt_embeds=pos.encoder_hidden_states,
               negative_prompt_embeds=encode_prompt(sd15, "").encoder_hidden_states, image=pixels, strength=0.6,
               num_inference_steps=5, guidance_scale=4.0, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(7), output_type="pt")
    torch.testing.assert_close(ours.images, _pipe_images(ref), atol=1e-5, rtol=0)


def test_sdxl_text_to_image_equals_the_diffusers_pipeline(sdxl):
    from diffusers import StableDiffusionXLPipeline

    pos = encode_prompt(sdxl, "a photo of a cat")
    ours = generate(sdxl, pos, None, steps=3, cfg=6.0, seed=1, width=SIZE, height=96, scheduler="dpmpp_2m")
    pipe = StableDiffusionXLPipeline(
        unet=sdxl.denoiser, vae=sdxl.vae, text_encoder=sdxl.text_encoders[0], text_encoder_2=sdxl.text_encoders[1],
        tokenizer=sdxl.tokenizers[0], tokenizer_2=sdxl.tokenizers[1],
        scheduler=make_scheduler(sdxl.scheduler_config, "dpmpp_2m"))
    ref = pipe(prompt_embeds=pos.encoder_hidden_states, pooled_prompt_embeds=pos.added_cond_kwargs["text_embeds"],
               num_inference_steps=3, guidance_scale=6.0, height=96, width=SIZE,
               generator=torch.Generator().manual_seed(1), output_type="pt")
    assert ours.images.shape == (1, 96, SIZE, 3)
    torch.testing.assert_close(ours.images, _pipe_images(ref), atol=1e-5, rtol=0)


def test_pixart_text_to_image_equals_the_diffusers_pipeline():
    from diffusers import PixArtSigmaPipeline

    model = tiny_pixart_model()
    pos, neg = encode_prompt(model, "a red house"), encode_prompt(model, "")
    ours = generate(model, pos, neg, steps=3, cfg=4.5, seed=2, width=SIZE, height=SIZE, scheduler="dpmpp_2m")
    pipe = PixArtSigmaPipeline(tokenizer=model.tokenizers[0], text_encoder=model.text_encoders[0], vae=model.vae,
                               transformer=model.denoiser,
                               scheduler=make_scheduler(model.scheduler_config, "dpmpp_2m"))
    ref = pipe(prompt_embeds=pos.encoder_hidden_states, prompt_attention_mask=pos.encoder_attention_mask,
               negative_prompt_embeds=neg.encoder_hidden_states,
               negative_prompt_attention_mask=neg.encoder_attention_mask, negative_prompt=None, num_inference_steps=3,
               guidance_scale=4.5, height=SIZE, width=SIZE, use_resolution_binning=False,
               generator=torch.Generator().manual_seed(2), output_type="pt")
    torch.testing.assert_close(ours.images, _pipe_images(ref), atol=1e-5, rtol=0)


class _EveryCall:
    """The test's own hooks: every output of chosen modules, one entry per UNet call."""

    def __init__(self, unet, paths):
        modules = dict(unet.named_modules())
        self.calls: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        self.handles = [modules[p].register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path):
        def hook(_m, _a, out):
            self.calls[path].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


LAYERS = ["down-level1-repeat0-vit-out", "mid-repeat1-res-out", "up-level2-repeat1-res-out",
          "up-level1-repeat0-vit-block0-self-q"]


def test_captured_taps_equal_an_independent_hook_on_each_step(sd15):
    from diffusion_feature.layer_catalog import resolve_taps

    taps = resolve_taps(LAYERS, sd15.denoiser, "sd15")
    recorder = _EveryCall(sd15.denoiser, [t.module_path for t in taps])
    try:
        plain = generate(sd15, "a cat", "a dog", steps=4, cfg=3.0, seed=5, width=SIZE, height=96, batch=2)
    finally:
        recorder.close()
    run = generate(sd15, "a cat", "a dog", steps=4, cfg=3.0, seed=5, width=SIZE, height=96, batch=2,
                   layers=LAYERS, capture_steps="1, 3", capture_branch="both", offload=True)
    torch.testing.assert_close(run.images, plain.images, atol=0, rtol=0)  # capture changes nothing
    feats = run.features
    assert list(feats.tensors) == LAYERS
    rows = feats.meta["rows"]
    # per captured step: uncond image 0, 1 then cond image 0, 1 (diffusers' [negative, positive] batch)
    assert [(r["step"], r["branch"], r["image"]) for r in rows] == [
        (s, b, i) for s in (1, 3) for b in ("uncond", "cond") for i in (0, 1)]
    for tap in taps:
        expected = torch.cat([recorder.calls[tap.module_path][k] for k in (1, 3)])
        if tap.kind == "tokens":  # (rows, h*w, C) on up level 1 of a 12x8 latent: a 3x2 grid
            expected = expected.transpose(1, 2).reshape(expected.shape[0], -1, 3, 2)
        got = feats.tensors[tap.id]
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    sched = make_scheduler(sd15.scheduler_config, "euler")
    sched.set_timesteps(4)
    assert [r["timestep"] for r in rows[::4]] == [float(sched.timesteps[k]) for k in (1, 3)]


def test_branches_select_rows_and_two_runs_never_mix(sd15):
    kw = dict(steps=3, cfg=2.0, seed=0, width=SIZE, height=SIZE, layers=["mid-repeat1-res-out"], capture_steps="all")
    both = generate(sd15, "a cat", None, capture_branch="both", **kw).features
    cond = generate(sd15, "a cat", None, capture_branch="cond", **kw).features
    again = generate(sd15, "a cat", None, capture_branch="cond", **kw).features
    uncond = generate(sd15, "a cat", None, capture_branch="uncond", **kw).features
    x = both.tensors["mid-repeat1-res-out"]
    assert x.shape[0] == 6 and cond.tensors["mid-repeat1-res-out"].shape[0] == 3
    torch.testing.assert_close(cond.tensors["mid-repeat1-res-out"], x[1::2], atol=0, rtol=0)
    torch.testing.assert_close(uncond.tensors["mid-repeat1-res-out"], x[0::2], atol=0, rtol=0)
    # a second run restarts: same rows, same labels, same values (the reference's counters kept growing)
    assert again.meta["rows"] == cond.meta["rows"] == [
        {"step": s, "timestep": r["timestep"], "branch": "cond", "image": 0} for s, r in enumerate(cond.meta["rows"])]
    torch.testing.assert_close(again.tensors["mid-repeat1-res-out"], cond.tensors["mid-repeat1-res-out"], atol=0, rtol=0)


def test_prompts_of_different_lengths_run_as_separate_forwards(sd15):
    long = " ".join(["a red house"] * 40)  # two CLIP windows: 154 tokens against the negative's 77
    kw = dict(steps=2, cfg=3.0, seed=0, width=SIZE, height=SIZE)
    run = generate(sd15, long, "", layers=["mid-repeat1-res-out"], capture_steps="all", capture_branch="both", **kw)
    assert [r["branch"] for r in run.features.meta["rows"]] == ["uncond", "cond"] * 2
    assert run.images.isfinite().all()


def test_no_capture_attaches_nothing_and_failed_runs_leave_no_hooks(sd15):
    before = hook_state(sd15.denoiser)
    run = generate(sd15, "a cat", steps=2, cfg=1.0, width=SIZE, height=SIZE, layers=LAYERS, capture_steps="")
    assert run.features is None
    seen = []

    def stop(i, total, latents, x0):
        seen.append(hook_state(sd15.denoiser) != before)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(sd15, "a cat", steps=3, width=SIZE, height=SIZE, layers=LAYERS + ["up-level1-repeat0-vit-block0-self-map"],
                 capture_steps="all", on_step=stop)
    assert seen == [True]  # hooks were attached during the run ...
    assert hook_state(sd15.denoiser) == before  # ... and are gone after it


def test_generation_errors(sd15):
    kw = dict(steps=2, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        generate(sd15, "a", cfg=1.0, layers=["mid-repeat1-res-out"], capture_steps="all", capture_branch="uncond", **kw)
    with pytest.raises(ValueError, match="capture step 5 is outside 0..1"):
        generate(sd15, "a", layers=["mid-repeat1-res-out"], capture_steps="5", **kw)
    with pytest.raises(ValueError, match="unknown scheduler 'heun2'; valid schedulers: euler"):
        generate(sd15, "a", scheduler="heun2", **kw)
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        generate(sd15, "a", steps=2, width=60, height=SIZE)
    with pytest.raises(ValueError, match="denoise must be in"):
        generate(sd15, "a", image=torch.rand(1, SIZE, SIZE, 3), denoise=0.0, **kw)
    with pytest.raises(ValueError, match="an image .image-to-image. or starting latents, not both"):
        generate(sd15, "a", image=torch.rand(1, SIZE, SIZE, 3), latents=torch.zeros(1, 4, 8, 8), **kw)
    with pytest.raises(ValueError, match=r"starting latents must be \(1 or 1, 4, 8, 8\)"):
        generate(sd15, "a", latents=torch.zeros(1, 4, 8, 9), **kw)
    with pytest.raises(ValueError, match="2 prompts or images for a batch of 3"):
        generate(sd15, ["a", "b"], batch=3, **kw)
    with pytest.raises(Exception, match="mid-repeat1-res-outt"):
        generate(sd15, "a", layers=["mid-repeat1-res-outt"], capture_steps="all", **kw)


def test_capture_step_grammar():
    assert parse_capture_steps("", 10) == [] and parse_capture_steps("none", 10) == []
    assert parse_capture_steps("all", 4) == [0, 1, 2, 3]
    assert parse_capture_steps("last", 4) == [3]
    assert parse_capture_steps("every 3", 10) == [0, 3, 6, 9]
    assert parse_capture_steps("every 4 from 2", 10) == [2, 6]
    assert parse_capture_steps("0, 5, 7-9, -1", 10) == [0, 5, 7, 8, 9]
    assert parse_capture_steps([1, -2], 5) == [1, 3]
    with pytest.raises(ValueError, match="cannot read 'x'"):
        parse_capture_steps("1, x", 5)
    with pytest.raises(ValueError, match="runs backwards"):
        parse_capture_steps("4-2", 5)
    with pytest.raises(ValueError, match="capture step -6 is outside 0..4"):
        parse_capture_steps("-6", 5)


def test_every_scheduler_builds_on_the_checkpoint_schedule(sd15):
    for name in SCHEDULERS:
        s = make_scheduler(sd15.scheduler_config, name)
        assert s.config.beta_schedule == "scaled_linear" and s.config.beta_end == 0.012


def test_v_prediction_checkpoints_generate_as_diffusers_does(sd15):
    v_model = sd15.clone(scheduler_config=dict(sd15.scheduler_config, prediction_type="v_prediction"))
    pos, neg = encode_prompt(sd15, "a cat"), encode_prompt(sd15, "")
    ours = generate(v_model, pos, neg, steps=3, cfg=3.0, seed=1, width=SIZE, height=SIZE, scheduler="ddim")
    pipe = _sd15_pipeline(v_model, "ddim")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ref = pipe(prompt_embeds=pos.encoder_hidden_states, negative_prompt_embeds=neg.encoder_hidden_states,
               num_inference_steps=3, guidance_scale=3.0, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(1), output_type="pt")
    torch.testing.assert_close(ours.images, _pipe_images(ref), atol=1e-5, rtol=0)
    eps = generate(sd15, pos, neg, steps=3, cfg=3.0, seed=1, width=SIZE, height=SIZE, scheduler="ddim")
    assert not torch.allclose(ours.images, eps.images)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_moves_are_exact_for_a_closed_form_denoiser(prediction_type):
    """A stub denoiser that knows x0 and eps returns the exact prediction: a move to any timestep, down or up,
    lands exactly on sqrt(abar_s) x0 + sqrt(1 - abar_s) eps."""
    from diffusion_feature.engine.ddim import ddim_move, descending_timesteps
    from diffusion_feature.engine.schedule import alphas_cumprod
    from conftest import SD_SCHEDULER

    abar = alphas_cumprod(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    point = lambda t: abar[t].sqrt().float() * x0 + (1 - abar[t]).sqrt().float() * eps  # noqa: E731

    def stub(x_t, t):
        a = abar[t].float()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]

    for t, s in ((600, 400), (400, 601), (50, -1), (999, 0)):
        moved = ddim_move(point(t), stub(point(t), t), t, s, abar, prediction_type)
        torch.testing.assert_close(moved, x0 if s < 0 else point(s), atol=2e-5, rtol=1e-4)
    assert descending_timesteps(60, 50, 2) == [60, 55, 50]
    assert descending_timesteps(999, 0, 3) == [999, 666, 333, 0]


def test_attention_maps_captured_during_generation_show_per_step(sd15):
    from diffusion_feature import NODE_CLASS_MAPPINGS

    layer = "up-level1-repeat0-vit-block0-cross-map"
    run = generate(sd15, "a cat", None, steps=3, cfg=2.0, seed=0, width=SIZE, height=96, layers=[layer],
                   capture_steps="0, 2", capture_branch="both")
    maps = run.features.tensors[layer]
    assert maps.shape[0] == 4 and torch.allclose(maps.sum(-1), torch.ones(()))  # rows of probabilities
    heat, mask = NODE_CLASS_MAPPINGS["DFAttentionMap"]().show(run.features, layer, 1, 0.5, 0.5)
    assert heat.shape == (4, 96, SIZE, 3) and mask.shape == (4, 96, SIZE)

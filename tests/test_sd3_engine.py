"""SD3 / SD3.5 on DF_MODEL (the diffusers backend), as Flux is: prompts equal StableDiffusion3Pipeline.encode_prompt
(with and without T5), extraction equals a hand-run of the transformer on the pipeline's own embeddings, generation
equals the pipeline (its own timestep spacing, classifier-free guidance), loading (diffusers folders with and
without T5, random weights from the shipped configs), and the refusals (guidance, the image-size shift, the
UNet-only tools, sizes, missing encoders); single files of the MMDiT in Stability AI's / ComfyUI's layout with
their components."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_feature.layer_catalog import FeatureCapture, get_family, taps_of
from test_dit_sd3 import tiny_sd3
from test_flux_engine import by_comfy_key_map, extract, tiny_flow_vae, tiny_shipped_configs, tiny_t5_tokenizer

SD3 = "sd3"
H, W = 64, 128  # pixels: a non-square 8x16 latent, a 4x8 token grid
# the tiny SD3.5-medium-like transformer of test_dit_sd3: 3 joint blocks (the last context pre-only), attn2 in block 0
IDS = ["dit-in", "dit-embed", "vit-block0-out", "vit-block0-attn2-q", "vit-block1-txt-out", "vit-block1-cross-map",
       "vit-block2-txt-q", "dit-out"]


def tiny_sd3_parts(seed: int = 0, t5: bool = True) -> dict:
    """SD3's components at a tiny size: CLIP-L (8 wide) and CLIP-G (16 wide) with projections (pooled 8 + 16 = the
    transformer's 24), T5 as wide as the transformer's joint attention (32), a 16-channel VAE with SD3's shift and
    scale; the real CLIP tokenizers (CLIP-G's pads with '!'). t5=False: saved without T5, as diffusers allows."""
    from transformers import T5Config, T5EncoderModel

    from conftest import tiny_clip
    from diffusion_feature.engine.tokenizers import clip_tokenizer

    transformer = tiny_sd3("sd3.5", seed)
    torch.manual_seed(seed)
    parts = dict(transformer=transformer, vae=tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5305),
                 text_encoder=tiny_clip(8, True, seed=1), tokenizer=clip_tokenizer(),
                 text_encoder_2=tiny_clip(16, True, seed=2), tokenizer_2=clip_tokenizer("!"),
                 text_encoder_3=None, tokenizer_3=None)
    if t5:
        torch.manual_seed(seed + 3)
        parts.update(text_encoder_3=T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_ff=16, d_kv=8, num_heads=2,
                                                             num_layers=1)).eval(),
                     tokenizer_3=tiny_t5_tokenizer())
    return parts


def feature_model(parts: dict):
    from diffusion_feature.engine.model import FeatureModel

    names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if parts[n] is not None]
    return FeatureModel(SD3, parts["transformer"], parts["vae"], [parts[n] for n in names],
                        [parts[n.replace("text_encoder", "tokenizer")] for n in names],
                        get_family(SD3).config("scheduler", "scheduler_config.json"), source="tiny")


def pipeline(parts: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(get_family(SD3).config("scheduler",
                                                                                  "scheduler_config.json"))
    return StableDiffusion3Pipeline(scheduler=scheduler, **parts)


@pytest.fixture(scope="module")
def parts():
    return tiny_sd3_parts()


@pytest.fixture(scope="module")
def sd3(parts):
    return feature_model(parts)


@pytest.fixture(scope="module")
def parts_without_t5(parts):
    return {**parts, "text_encoder_3": None, "tokenizer_3": None}


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, H, W, 3)).astype(np.float32) / 255)


def pipeline_embeddings(parts: dict, prompt):
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline(parts).encode_prompt(prompt, None, None, device=torch.device("cpu"),
                                                             do_classifier_free_guidance=False)
    return embeds, pooled


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompts_equal_the_pipelines_encode_prompt(parts, parts_without_t5, with_t5):
    """Both CLIPs' penultimate states side by side, zero-padded to 32, then T5's 256 tokens (zeros without T5);
    pooled: both CLIPs' pooled embeddings side by side. One prompt per image, as the pipeline encodes a list."""
    from diffusion_feature.engine.prompts import encode_prompt

    chosen = parts if with_t5 else parts_without_t5
    prompts = ["a photo of a red house", "a cat"]
    cond = encode_prompt(feature_model(chosen), prompts)
    embeds, pooled = pipeline_embeddings(chosen, prompts)
    assert cond.encoder_hidden_states.shape == (2, 77 + 256, 32) and cond.pooled.shape == (2, 24)
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled, atol=1e-6, rtol=1e-5)
    assert bool(cond.encoder_hidden_states[:, 77:].abs().sum() == 0) is not with_t5


def hand_run(parts, image, prompt: str, sigma: float, seed: int):
    """The transformer run by hand on the pipeline's own embeddings, on x_t = (1 - sigma) x0 + sigma eps built here
    (x0: the VAE's mean of the image's 8-bit pixels, shifted and scaled as SD3's), timestep sigma * 1000 as the
    pipeline passes it."""
    net, vae = parts["transformer"], parts["vae"]
    embeds, pooled = pipeline_embeddings(parts, prompt)
    with torch.no_grad():
        pixels = ((image * 255).round() / 127.5 - 1).permute(0, 3, 1, 2).contiguous()  # the 8-bit file's pixels
        x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        x_t = (1 - sigma) * x0 + sigma * eps
        with FeatureCapture(net, taps_of(net, IDS), token_grid=tuple(x0.shape[-2:])) as capture:
            capture.run(hidden_states=x_t, timestep=torch.tensor([sigma * 1000]), encoder_hidden_states=embeds,
                        pooled_projections=pooled)
    return capture.features


def test_extraction_equals_a_hand_run_of_the_transformer(parts, sd3, image):
    got = extract(sd3, image, "a red house", IDS, t=600, seed=4, vae_sample=False)
    want = hand_run(parts, image, "a red house", 0.6, seed=4)
    assert sorted(got.tensors) == sorted(IDS)
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert got.tensors["dit-in"].shape == (1, 16, 8, 16) and got.tensors["vit-block0-out"].shape == (1, 192, 4, 8)
    assert got.tensors["vit-block1-cross-map"].shape[-1] == 77 + 256
    assert (got.meta["t"], got.meta["sigma"], got.meta["shift"], got.meta["guidance"]) == (600, 0.6, None, None)
    shifted = extract(sd3, image, "a red house", IDS[2:3], t=600, seed=4, vae_sample=False, shift=3.0)
    sigma = 3 * 0.6 / (1 + 2 * 0.6)  # the scheduler's own shift of sigma, as an option
    assert shifted.meta["sigma"] == pytest.approx(sigma) and shifted.meta["shift"] == 3.0
    torch.testing.assert_close(shifted.tensors[IDS[2]], hand_run(parts, image, "a red house", shifted.meta["sigma"],
                                                                 seed=4)[IDS[2]], atol=1e-6, rtol=1e-5)


def test_extraction_without_t5_takes_zeros_in_its_place(parts_without_t5, image):
    model = feature_model(parts_without_t5)
    assert len(model.text_encoders) == 2
    got = extract(model, image, "a cat", IDS, t=300, seed=1, vae_sample=False)
    want = hand_run(parts_without_t5, image, "a cat", 0.3, seed=1)
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_generation_equals_the_pipeline_and_captures_both_branches(parts, sd3):
    """Text-to-image as StableDiffusion3Pipeline samples it: flow-match Euler at the scheduler's own timesteps
    (shift 3, not FluxPipeline's linspace sigmas), classifier-free guidance over the empty prompt's full encoding,
    the same seeded noise; the captured dit-out rows are each step's two branches, which step the latents."""
    from diffusion_feature.engine.generation import generate

    steps, seed, cfg = 3, 5, 4.0
    gen = generate(sd3, "a red house", steps=steps, cfg=cfg, seed=seed, width=W, height=H,
                   layers=["dit-out", "vit-block1-out"], capture_steps="all", capture_branch="both")
    want = pipeline(parts)("a red house", height=H, width=W, num_inference_steps=steps, guidance_scale=cfg,
                           generator=torch.Generator().manual_seed(seed), output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    sched = pipeline(parts).scheduler
    sched.set_timesteps(steps)
    assert not np.allclose(sched.sigmas[:-1].numpy(), np.linspace(1, 1 / steps, steps))
    rows, v = gen.features.meta["rows"], gen.features.tensors["dit-out"]
    assert [(r["step"], r["branch"]) for r in rows] == [(i, b) for i in range(steps) for b in ("uncond", "cond")]
    assert "guidance" not in gen.features.meta or gen.features.meta["guidance"] is None
    x = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    for i in range(steps):
        uncond, cond = v[2 * i:2 * i + 1], v[2 * i + 1:2 * i + 2]
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * (uncond + cfg * (cond - uncond))
    torch.testing.assert_close(gen.latents, x, atol=1e-5, rtol=1e-5)
    assert gen.features.tensors["vit-block1-out"].shape == (6, 192, 4, 8)


def test_refusals_name_what_would_be_valid(sd3, image):
    from diffusion_feature.engine.generation import generate
    from diffusion_feature.engine.inversion import InversionError, invert
    from diffusion_feature.engine.pnp import PnPError, translate
    from diffusion_feature.engine.prompts import encode_prompt

    with pytest.raises(ValueError, match=r"guidance applies to the families with a guidance embedding "
                                         r"\(flux, flux2\), not sd3; leave it unset$"):
        extract(sd3, image, "", ["dit-in"], t=100, guidance=3.5)
    with pytest.raises(ValueError, match=r"guidance applies to .* \(flux, flux2\), not sd3"):
        generate(sd3, "a cat", steps=2, width=64, height=64, guidance=3.5)
    with pytest.raises(ValueError, match=r"shift 'resolution' is the image-size shift of flux, qwen-image and flux2, "
                                         r"not sd3: "
                                         r"give a number \(its scheduler shifts by 3.0\) or leave it unset$"):
        extract(sd3, image, "", ["dit-in"], t=100, shift="resolution")
    with pytest.raises(ValueError, match=r"sd3 takes 2x2 latent patches: the image's sides must be multiples of 16 "
                                         r"pixels, got 64x72$"):
        extract(sd3, image, "", ["dit-in"], t=100, size=(72, 64))
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16 pixels for sd3, got 72"):
        generate(sd3, "a cat", steps=2, width=64, height=72)
    with pytest.raises(InversionError, match=r"DDIM inversion works on the sd15, .* families, not sd3$"):
        invert(sd3, image, "", 2)
    with pytest.raises(PnPError, match=r"Plug-and-Play runs on sd15, .* UNets, not sd3$"):
        translate(sd3, None, ["a cat"])
    with pytest.raises(ValueError, match=r"denoise_from .* works on the sd15.* not sd3$"):
        extract(sd3, image, "", ["dit-in"], t=100, denoise_from=300)
    with pytest.raises(ValueError, match=r"image-to-image generation works on the sd15, .* families, not sd3$"):
        generate(sd3, "a cat", steps=2, image=image)
    with pytest.raises(ValueError, match=r"sd3 samples with flow-match Euler: scheduler must be one of euler, "):
        generate(sd3, "a cat", steps=2, width=64, height=64, scheduler="ddim")
    one_clip = sd3.clone(text_encoders=sd3.text_encoders[:1], tokenizers=sd3.tokenizers[:1])
    with pytest.raises(ValueError, match=r"a sd3 model needs 2 text encoders and tokenizers \(clip, clip; t5 "
                                         r"optional\)$"):
        encode_prompt(one_clip, "a cat")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, parts):
    """The tiny SD3 (with T5) written by StableDiffusion3Pipeline.save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-sd3")
    pipeline(parts).save_pretrained(folder)
    return folder


def test_diffusers_sd3_folders_load_offline_with_and_without_t5(tmp_path, sd3_folder, parts, parts_without_t5, sd3,
                                                                 image):
    """Folders written by StableDiffusion3Pipeline.save_pretrained load as the in-memory models (with T5: its
    text_encoder_3 / tokenizer_3; without: text_encoder_3 null)."""
    from diffusion_feature.engine.loading import detect_folder_family, load_model

    ids = ["vit-block0-txt-out", "vit-block2-out"]
    for folder, chosen, model in ((sd3_folder, parts, sd3), (tmp_path / "without-t5", parts_without_t5, None)):
        if model is None:
            pipeline(chosen).save_pretrained(folder)
        assert detect_folder_family(folder) == SD3
        loaded = load_model(folder)
        assert loaded.family == SD3 and loaded.vae.config.shift_factor == 0.0609
        assert [type(e).__name__ for e in loaded.text_encoders] == ["CLIPTextModelWithProjection"] * 2 + (
            ["T5EncoderModel"] if model is not None else [])
        model = model or feature_model(chosen)
        got, want = (extract(m, image, "a photo of a cat", ids, t=250, seed=0) for m in (loaded, model))
        for k in ids:
            torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)


def test_a_single_file_sd3_loads_with_its_components(tmp_path, sd3_folder, parts, parts_without_t5, sd3, image):
    """An SD3 single file in Stability AI's / ComfyUI's layout (the MMDiT under model.diffusion_model., written by
    ComfyUI's own map of the two layouts read backwards, a VAE beside it that is not read) loads with a components
    folder, its tiny transformer's config read from the weights over the shipped SD3.5 large one; or with
    component files without the optional T5, whose tiny configs come from <stem>.config/."""
    import shutil

    from safetensors.torch import save_file

    from diffusion_feature.engine.checkpoint_files import CheckpointError
    from diffusion_feature.engine.loading import load_model
    from ldm_export import vae_to_ldm

    depth = parts["transformer"].config.num_layers
    state = by_comfy_key_map(parts["transformer"], lambda utils: utils.mmdit_to_diffusers(
        {"depth": depth}, output_prefix="model.diffusion_model."))
    vae = vae_to_ldm(parts["vae"])  # first_stage_model.*
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in {**state, **vae}.items()}, path)
    with pytest.raises(CheckpointError, match=r"is read for its sd3 transformer only: give components= .* files as "
                                              r"vae=FILE, text_encoder=FILE, text_encoder_2=FILE, text_encoder_3=FILE "
                                              r"\(optional\)$"):
        load_model(path)
    ids = ["vit-block0-attn2-k", "vit-block1-cross-map", "dit-out"]
    loaded = load_model(path, components=sd3_folder)
    assert loaded.family == SD3 and loaded.source == str(path)
    got, want = (extract(m, image, "a red house", ids, t=400, seed=0) for m in (loaded, sd3))
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5, msg=k)
    shutil.copytree(sd3_folder, tmp_path / "sd3.5_tiny.config")
    files = {"vae": tmp_path / "vae.safetensors", "text_encoder": tmp_path / "clip_l.safetensors",
             "text_encoder_2": tmp_path / "clip_g.safetensors"}
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae.items()}, files["vae"])
    for name in ("text_encoder", "text_encoder_2"):  # transformers' layout, as ComfyUI's clip_l / clip_g files
        save_file({k: v.contiguous() for k, v in parts[name].state_dict().items()}, files[name])
    loaded = load_model(path, components=files)
    assert len(loaded.text_encoders) == 2
    got, want = (extract(m, image, "a red house", ids, t=400, seed=0) for m in (loaded, feature_model(parts_without_t5)))
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5, msg=k)


def test_the_nodes_extract_sd3_as_the_library_does(sd3, image, monkeypatch):
    """DFEncodePrompt -> DFAttachHooks -> DFExtractFeatures on an SD3 DF_MODEL (native side 128 here, as for Flux)."""
    from diffusion_feature import NODE_CLASS_MAPPINGS as N
    from diffusion_feature.engine.model import FeatureModel

    monkeypatch.setattr(FeatureModel, "native_size", property(lambda self: 128))
    ids = ["vit-block1-out", "vit-block2-txt-in"]
    (cond,) = N["DFEncodePrompt"]().encode(sd3, "a photo of a dog")
    (hooked,) = N["DFAttachHooks"]().attach(sd3, "\n".join(ids), "none")
    (features,) = N["DFExtractFeatures"]().extract(hooked, image, cond, 300, 2, resize="keep-aspect", batch_size=1)
    want = extract(sd3, image, "a photo of a dog", ids, t=300, seed=2, size=None)
    assert features.meta["sigma"] == 0.3 and features.meta["guidance"] is None
    for k in ids:
        torch.testing.assert_close(features.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)


def test_random_sd3_builds_from_the_shipped_configs(tmp_path, monkeypatch, image):
    """load_model("random:sd3") builds SD3.5 large's architecture from the shipped configs (shrunk here), with its
    three text encoders, the bundled CLIP tokenizers and the host's T5 tokenizer; its features come out."""
    from diffusion_feature.engine.loading import RandomWeightsWarning, load_model

    clip = dict(intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    tiny_shipped_configs(tmp_path, monkeypatch, SD3, {
        "transformer": dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                            caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=16,
                            sample_size=16),
        "vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1),
        "text_encoder": dict(hidden_size=8, projection_dim=8, **clip),
        "text_encoder_2": dict(hidden_size=16, projection_dim=16, **clip),
        "text_encoder_3": dict(vocab_size=16, d_model=32, d_ff=16, d_kv=8, num_heads=2, num_layers=1)})
    with pytest.warns(RandomWeightsWarning):
        model = load_model("random:sd3")
    assert [type(e).__name__ for e in model.text_encoders] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    assert [t.pad_token for t in model.tokenizers[:2]] == ["<|endoftext|>", "!"]
    assert model.vae.config.shift_factor == 0.0609 and model.scheduler_config["shift"] == 3.0
    got = extract(model, image, "a red house", ["vit-block1-cross-map", "dit-out"], t=500, seed=0)
    assert got.tensors["vit-block1-cross-map"].shape[-1] == 77 + 256 and got.meta["sigma"] == 0.5
    assert got.tensors["dit-out"].shape == (1, 16, 8, 16) and torch.isfinite(got.tensors["dit-out"]).all()

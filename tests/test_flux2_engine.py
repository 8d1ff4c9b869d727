"""Flux.2 on DF_MODEL (the diffusers backend): prompts equal Flux2Pipeline.encode_prompt (Mistral3's layers 10, 20, 30
side by side, 512 tokens), extraction equals a hand-run of the transformer on the pipeline's own embeddings, latents
normalised by the VAE's batch-norm statistics and packed as the pipeline does, 4-axis ids and the guidance input;
generation equals the pipeline from the same noise (empirical mu, linspace sigmas, guidance 4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_feature.layer_catalog import FeatureCapture, get_family, taps_of
from test_flux_engine import extract
from test_z_image_engine import tiny_qwen_tokenizer

F2 = "flux2"
H, W = 64, 128  # pixels: an 8x16 VAE latent, a 4x8 token grid
LATENT_CHANNELS, TEXT = 4, 8  # the tiny VAE's channels; the tiny Mistral's width (three layers side by side: 24)
IDS = ["dit-in", "vit-block0-out", "vit-block0-txt-q", "vit-block1-cross-map", "vit-block2-in", "vit-block3-txt-out",
       "dit-out"]
TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}{%- for part in "
            "message['content'] %}{{- part['text'] }}{%- endfor %}{{- '<|im_end|>' }}{%- endfor %}")


def tiny_parts(seed: int = 0) -> dict:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * TEXT,
                                          timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                          guidance_embeds=True).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=LATENT_CHANNELS,
                             layers_per_block=1, sample_size=64).eval()
    with torch.no_grad():  # batch-norm statistics far from (0, 1), so the normalisation shows
        vae.bn.running_mean.copy_(torch.randn(4 * LATENT_CHANNELS))
        vae.bn.running_var.copy_(torch.rand(4 * LATENT_CHANNELS) * 3 + 0.5)
    text = MistralConfig(vocab_size=272, hidden_size=TEXT, intermediate_size=16, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=1024)
    vision = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=4, image_size=28, patch_size=14)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision)).eval()
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return dict(transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=tokenizer)


def feature_model(parts: dict):
    from diffusion_feature.engine.model import FeatureModel

    return FeatureModel(F2, parts["transformer"], parts["vae"], [parts["text_encoder"]], [parts["tokenizer"]],
                        get_family(F2).config("scheduler", "scheduler_config.json"), source="tiny")


def pipeline(parts: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    cfg = get_family(F2).config("scheduler", "scheduler_config.json")
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(cfg), **parts)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(scope="module")
def flux2(parts):
    return feature_model(parts)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, H, W, 3)).astype(np.float32) / 255)


def pipeline_embeddings(parts: dict, prompts):
    with torch.no_grad():
        return pipeline(parts).encode_prompt(prompts, device=torch.device("cpu"))


def test_prompts_equal_the_pipelines_encode_prompt(parts, flux2):
    from diffusion_feature.engine.prompts import encode_prompt

    prompts = ["a photo of a red house", "a cat [IMG]"]
    cond = encode_prompt(flux2, prompts)
    embeds, _ = pipeline_embeddings(parts, prompts)
    assert cond.encoder_hidden_states.shape == (2, 512, 3 * TEXT)
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, atol=1e-6, rtol=1e-5)


def hand_run(parts, image, prompt: str, sigma: float, seed: int, guidance: float | None = 4.0, ids=IDS, pipe=None):
    """The transformer run as Flux2Pipeline (or `pipe`, Flux2KleinPipeline: no guidance) calls it: its own
    encode_prompt and text ids, the latent normalised in its patchified space by the VAE's batch-norm statistics
    (its _encode_vae_image), x_t built here on the latent grid, then its _patchify_latents / _pack_latents /
    _prepare_latent_ids, timestep sigma, guidance."""
    pipe = pipe or pipeline(parts)
    net, vae = parts["transformer"], parts["vae"]
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(prompt, device=torch.device("cpu"))
        pixels = ((image * 255).round() / 127.5 - 1).permute(0, 3, 1, 2).contiguous()
        patched = pipe._patchify_latents(vae.encode(pixels).latent_dist.mean)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        x0 = pipe._unpatchify_latents((patched - mean) / std)
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        x_t = pipe._patchify_latents((1 - sigma) * x0 + sigma * eps)
        kwargs = dict(hidden_states=pipe._pack_latents(x_t), timestep=torch.tensor([sigma]),
                      guidance=None if guidance is None else torch.tensor([guidance]),
                      encoder_hidden_states=embeds, txt_ids=text_ids,
                      img_ids=pipe._prepare_latent_ids(x_t))
        with FeatureCapture(net, taps_of(net, ids), token_grid=tuple(x0.shape[-2:])) as capture:
            capture.run(**kwargs)
    return capture.features


def test_extraction_equals_a_hand_run_of_the_transformer(parts, flux2, image):
    got = extract(flux2, image, "a red house", IDS, t=600, seed=4, vae_sample=False)
    want = hand_run(parts, image, "a red house", 0.6, seed=4)
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert got.tensors["dit-in"].shape == (1, 16, 4, 8)  # the pipeline's patchified latent, ComfyUI's Flux.2 latent
    assert got.tensors["vit-block1-cross-map"].shape[-1] == 512
    assert (got.meta["t"], got.meta["sigma"], got.meta["shift"], got.meta["guidance"]) == (600, 0.6, None, 4.0)
    other = extract(flux2, image, "a red house", ["vit-block2-in"], t=600, seed=4, vae_sample=False, guidance=2.5)
    torch.testing.assert_close(other.tensors["vit-block2-in"],
                               hand_run(parts, image, "a red house", 0.6, 4, guidance=2.5)["vit-block2-in"],
                               atol=1e-6, rtol=1e-5)


def test_latents_round_trip_through_the_batch_norm(parts):
    from diffusion_feature.engine import latent_scaling

    z = torch.randn(2, LATENT_CHANNELS, 8, 12)
    x = latent_scaling.to_denoiser(parts["vae"], z)
    assert not torch.allclose(x, z, atol=0.1)
    torch.testing.assert_close(latent_scaling.to_vae(parts["vae"], x), z, atol=1e-5, rtol=1e-5)


def test_generation_equals_the_pipeline_from_the_same_noise(parts, flux2):
    """Flux2Pipeline from our seeded noise (its latents= argument, patchified as it draws them): its empirical mu,
    linspace sigmas, guidance 4, the batch-norm undone before decoding. The pipeline draws its noise in the
    patchified shape, so the same seed alone gives other noise: the noise is handed over."""
    from diffusion_feature.engine.generation import generate

    steps, seed = 2, 5
    gen = generate(flux2, "a red house", steps=steps, cfg=1.0, seed=seed, width=W, height=H,
                   layers=["dit-out"], capture_steps="all")
    noise = torch.randn(1, LATENT_CHANNELS, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    pipe = pipeline(parts)
    want = pipe(prompt="a red house", height=H, width=W, num_inference_steps=steps,
                latents=pipe._patchify_latents(noise), output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    assert gen.features.meta["guidance"] == 4.0 and gen.features.tensors["dit-out"].shape == (2, 16, 4, 8)


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    """The tiny model as Flux2Pipeline.save_pretrained writes it (model_index.json, tokenizer/, text_encoder/...)."""
    folder = tmp_path_factory.mktemp("flux2") / "tiny-flux2"
    pipeline(parts).save_pretrained(folder)
    return folder


def test_a_saved_folder_loads_and_extracts_as_the_model_it_was_saved_from(flux2, saved, image):
    from diffusion_feature.engine.loading import load_model

    loaded = load_model(saved)
    assert loaded.family == F2 and type(loaded.text_encoders[0]).__name__ == "Mistral3ForConditionalGeneration"
    ids = ["vit-block0-txt-q", "vit-block2-cross-map", "vit-block3-out"]
    got = extract(loaded, image, "a red house", ids, t=600, seed=4, vae_sample=False)
    want = extract(flux2, image, "a red house", ids, t=600, seed=4, vae_sample=False)
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=0, rtol=0, msg=k)


def test_a_text_encoder_of_another_family_is_refused_in_one_line(saved, tmp_path):
    import json
    import shutil

    from diffusion_feature.engine.checkpoint_files import CheckpointError
    from diffusion_feature.engine.loading import load_model

    folder = shutil.copytree(saved, tmp_path / "foreign")
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"],
                                                                     "model_type": "t5", "d_model": 8}))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert str(err.value).startswith("'foreign'/text_encoder is a T5EncoderModel (t5), not flux2's text encoder: "
                                     "flux2 takes a Mistral3ForConditionalGeneration (mistral3) or a qwen3 model")
    assert "\n" not in str(err.value)


def test_random_weights_name_the_missing_mistral_tokenizer_before_building():
    """No host ships Mistral's tokenizer: random:flux2 stops at once (before building 56B parameters), saying where
    a tokenizer can come from."""
    from diffusion_feature.engine.loading import RandomWeightsWarning, load_model
    from diffusion_feature.engine.tokenizers import TokenizerMissingError

    with pytest.warns(RandomWeightsWarning), pytest.raises(TokenizerMissingError) as err:
        load_model("random:flux2")
    assert str(err.value) == ("flux2 needs its Mistral3 tokenizer: load it from a diffusers folder that has "
                              "tokenizer/. It is never downloaded.")


def test_the_shipped_configs_build_flux2_dev():
    """The shipped configs are FLUX.2-dev's (diffusers' scripts/convert_flux2_to_diffusers.py flux2-dev and the
    default AutoencoderKLFlux2; Mistral Small 3.1/3.2's text config without a sliding window, its SiLU vision
    tower): built without memory (meta tensors), the parameter counts are the published 32B / 24B, the text
    encoder's three layers side by side are the transformer's text width, the latent the transformer's input."""
    import diffusers
    import transformers

    fam = get_family(F2)
    with torch.device("meta"):
        net = diffusers.Flux2Transformer2DModel.from_config(fam.denoiser_config())
        vae = diffusers.AutoencoderKLFlux2.from_config(fam.config("vae"))
        config = transformers.AutoConfig.from_pretrained(str(fam.config_dir / "text_encoder"))
        encoder = transformers.Mistral3ForConditionalGeneration._from_config(config)
    billions = [sum(p.numel() for p in m.parameters()) / 1e9 for m in (net, encoder)]
    assert 32.0 < billions[0] < 32.5 and 23.9 < billions[1] < 24.1, billions
    assert config.text_config.sliding_window is None and config.vision_config.hidden_act == "silu"
    assert not config.tie_word_embeddings  # its own lm_head: the 0.67B that make 24B
    assert net.config.joint_attention_dim == fam.text_width == 3 * config.text_config.hidden_size
    assert net.config.in_channels == 4 * vae.config.latent_channels and vae.bn.num_features == net.config.in_channels
    assert len(fam.text_encoders[0].layers) == 3 and max(fam.text_encoders[0].layers) <= config.text_config.num_hidden_layers


# ---- Flux.2 Klein: the same family, chosen by its Qwen3 text encoder ---------------------------------------------
def klein_parts(vae) -> dict:
    """A tiny Flux.2 Klein: Qwen3ForCausalLM (27 layers: the pipeline reads 9, 18, 27), no guidance embedding."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    transformer = Flux2Transformer2DModel(in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * TEXT,
                                          timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                          guidance_embeds=False).eval()
    encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=272, hidden_size=TEXT, intermediate_size=16,
                                           num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=4, max_position_embeddings=1024)).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=tiny_qwen_tokenizer())


def klein_pipeline(parts: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    cfg = get_family(F2).config("scheduler", "scheduler_config.json")
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(cfg), **parts)


@pytest.fixture(scope="module")
def klein(parts, tmp_path_factory):
    """(its parts, the FeatureModel loaded from its Flux2KleinPipeline.save_pretrained folder, that folder)."""
    from diffusion_feature.engine.loading import load_model

    kparts = klein_parts(parts["vae"])
    folder = tmp_path_factory.mktemp("klein") / "tiny-klein"
    klein_pipeline(kparts).save_pretrained(folder)
    return kparts, load_model(folder), folder


def test_klein_loads_as_flux2_by_its_qwen3_text_encoder(klein):
    _, model, _ = klein
    assert model.family == F2 and type(model.text_encoders[0]).__name__ == "Qwen3ForCausalLM"
    spec = get_family(F2).encoders_of(model.text_encoders)[0]
    assert (spec.kind, spec.layers, spec.thinking, spec.keep_padding) == ("qwen3", (9, 18, 27), False, True)


def test_klein_prompts_equal_its_pipelines_encode_prompt(klein):
    from diffusion_feature.engine.prompts import encode_prompt

    kparts, model, _ = klein
    prompts = ["a photo of a red house", "a cat"]
    cond = encode_prompt(model, prompts)
    with torch.no_grad():
        embeds, _ = klein_pipeline(kparts).encode_prompt(prompts, device=torch.device("cpu"))
    assert cond.encoder_hidden_states.shape == (2, 512, 3 * TEXT) and cond.encoder_attention_mask is None
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, atol=1e-6, rtol=1e-5)


def test_klein_extraction_equals_a_hand_run_of_its_pipeline(klein, image):
    kparts, model, _ = klein
    got = extract(model, image, "a red house", IDS, t=600, seed=4, vae_sample=False)
    want = hand_run(kparts, image, "a red house", 0.6, seed=4, guidance=None, pipe=klein_pipeline(kparts))
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert got.meta["guidance"] is None and got.tensors["vit-block1-cross-map"].shape[-1] == 512


def test_nodes_load_a_klein_folder_extract_save_and_read_back(klein, image, tmp_path, monkeypatch):
    """The ComfyUI graph in-process: DFLoadDiffusers (the folder in models/diffusers) -> DFEncodePrompt ->
    DFAttachHooks -> DFExtractFeatures -> DFSaveFeatures -> DFLoadFeatures: the file read back holds the engine's
    extraction of the same model."""
    import shutil

    from diffusion_feature import NODE_CLASS_MAPPINGS
    from diffusion_feature.engine.extraction import extract as engine_extract

    _, model, folder = klein
    monkeypatch.setenv("DF_DIFFUSERS_DIR", str(tmp_path / "diffusers"))
    monkeypatch.setenv("DF_OUTPUT_DIR", str(tmp_path / "output"))
    shutil.copytree(folder, tmp_path / "diffusers" / "klein")
    N = {name: cls() for name, cls in NODE_CLASS_MAPPINGS.items()}
    (loaded,) = N["DFLoadDiffusers"].load(model_path="klein", dtype="float32", device="cpu")
    (cond,) = N["DFEncodePrompt"].encode(loaded, "a red house")
    (hooked,) = N["DFAttachHooks"].attach(loaded, "vit-block0-txt-q\nvit-block3-out", "none")
    (features,) = N["DFExtractFeatures"].extract(hooked, image, cond, 600, 4, resize="stretch")
    out = N["DFSaveFeatures"].save(features, "klein/house", "safetensors", "per-sample")
    assert [e["filename"] for e in out["ui"]["features"]] == ["house_00001_.safetensors"]
    (back,) = N["DFLoadFeatures"].load("klein/house_00001_.safetensors")
    want = engine_extract(model, image, "a red house", ["vit-block0-txt-q", "vit-block3-out"], t=600, seed=4,
                          resize="stretch")
    assert set(back.tensors) == set(want.tensors) == {"vit-block0-txt-q", "vit-block3-out"}
    for k, tensor in want.tensors.items():
        torch.testing.assert_close(back.tensors[k], tensor, atol=1e-6, rtol=1e-5, msg=k)


def klein_noise(seed: int) -> torch.Tensor:
    return torch.randn(1, LATENT_CHANNELS, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_klein_generation_equals_its_pipeline_with_true_cfg(klein):
    """Flux2KleinPipeline from our seeded noise: Flux2Pipeline's sampling (empirical mu, linspace sigmas) without
    the guidance embedding, and its guidance_scale as true classifier-free guidance over the empty prompt, which
    is our cfg (here one batched forward of both branches, there two)."""
    from diffusion_feature.engine.generation import generate

    kparts, model, _ = klein
    steps, seed = 2, 5
    gen = generate(model, "a red house", steps=steps, cfg=3.0, seed=seed, width=W, height=H,
                   layers=["vit-block3-out"], capture_steps="all", capture_branch="both")
    pipe = klein_pipeline(kparts)
    want = pipe(prompt="a red house", height=H, width=W, num_inference_steps=steps, guidance_scale=3.0,
                latents=pipe._patchify_latents(klein_noise(seed)), output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    assert gen.features.meta["guidance"] is None
    assert [(r["step"], r["branch"]) for r in gen.features.meta["rows"]] == [
        (0, "uncond"), (0, "cond"), (1, "uncond"), (1, "cond")]


def test_klein_defaults_are_its_pipelines_and_the_distilled_models_its_model_cards(klein, tmp_path):
    """Without steps / cfg, a Klein base folder samples as Flux2KleinPipeline's own __call__ defaults (50 steps,
    guidance_scale 4 as true CFG: two branches); a folder whose model_index.json says is_distilled takes the
    step-distilled model card's 4 steps at guidance 1 (one branch), as that pipeline does given them. An explicit
    cfg wins."""
    import json
    import shutil

    from diffusion_feature.engine.generation import generate
    from diffusion_feature.engine.loading import load_model

    kparts, model, folder = klein
    seed = 7
    gen = generate(model, "a red house", seed=seed, width=W, height=H, layers=["dit-out"], capture_steps="last",
                   capture_branch="both")
    pipe = klein_pipeline(kparts)
    want = pipe(prompt="a red house", height=H, width=W, latents=pipe._patchify_latents(klein_noise(seed)),
                output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    meta = gen.features.meta
    assert (meta["steps"], meta["cfg"]) == (50, 4.0) and [r["branch"] for r in meta["rows"]] == ["uncond", "cond"]

    distilled = shutil.copytree(folder, tmp_path / "klein-distilled")
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    fast = load_model(distilled)
    gen = generate(fast, "a red house", seed=seed, width=W, height=H, layers=["dit-out"], capture_steps="all")
    pipe = klein_pipeline(kparts)
    pipe.register_to_config(is_distilled=True)
    want = pipe(prompt="a red house", height=H, width=W, num_inference_steps=4, guidance_scale=1.0,
                latents=pipe._patchify_latents(klein_noise(seed)), output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    meta = gen.features.meta
    assert (meta["steps"], meta["cfg"]) == (4, 1.0) and "distilled" in meta["sampling_defaults"]["model"]
    assert [(r["step"], r["branch"]) for r in meta["rows"]] == [(i, "cond") for i in range(4)]
    guided = generate(fast, "a red house", cfg=2.0, seed=seed, width=W, height=H, layers=["dit-out"],
                      capture_steps="last", capture_branch="both").features.meta
    assert (guided["steps"], guided["cfg"], guided["sampling_defaults"]["used"]) == (4, 2.0, ["steps"])
    assert len(guided["rows"]) == 2

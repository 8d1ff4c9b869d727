"""Z-Image on DF_MODEL (the diffusers backend), as Flux and SD3 are: prompts equal ZImagePipeline.encode_prompt (Qwen3's
chat template with thinking enabled, its second-to-last hidden states, real tokens only), extraction equals a
hand-run of the transformer on the pipeline's own embeddings (lists of latents and captions, t = 1 - sigma),
generation equals the pipeline (linspace sigmas with the static shift, its guidance_scale g as cfg g + 1, the negated
output stepped), loading (a ZImagePipeline folder, random weights from the shipped configs) and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_feature.layer_catalog import FeatureCapture, get_family, taps_of
from test_dit_z_image import CAP, tiny_z_image
from test_flux_engine import extract, tiny_flow_vae, tiny_shipped_configs

ZI = "z-image"
H, W = 64, 128  # pixels: a non-square 8x16 latent, a 4x8 token grid
IDS = ["dit-in", "dit-embed", "vit-refiner0-out", "vit-refiner1-txt-out", "vit-refiner1-self-map", "vit-block0-out",
       "vit-block1-txt-q", "vit-block1-cross-map", "dit-out"]


def tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer of Qwen's kind (its byte alphabet, a few merges, Qwen's chat special tokens, padding
    with <|endoftext|>) with a Qwen3-style chat template that reacts to enable_thinking."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from diffusion_feature.engine.lm_prompts.qwen3 import CHAT_TEMPLATE
    from diffusion_feature.engine.tokenizers import _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges = [("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("e", "d")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_qwen3(seed: int = 1, width: int = CAP):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(Qwen3Config(vocab_size=272, hidden_size=width, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=1024)).eval()


def tiny_parts(seed: int = 0) -> dict:
    """Z-Image's components at a tiny size: test_dit_z_image's transformer (2 refiner pairs, 2 layers, captions 32
    wide), a 3-layer Qwen3 32 wide, a 16-channel VAE with Z-Image's (Flux's) shift and scale."""
    return dict(transformer=tiny_z_image(seed), vae=tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611),
                text_encoder=tiny_qwen3(), tokenizer=tiny_qwen_tokenizer())


def feature_model(parts: dict):
    from diffusion_feature.engine.model import FeatureModel

    return FeatureModel(ZI, parts["transformer"], parts["vae"], [parts["text_encoder"]], [parts["tokenizer"]],
                        get_family(ZI).config("scheduler", "scheduler_config.json"), source="tiny")


def pipeline(parts: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    cfg = get_family(ZI).config("scheduler", "scheduler_config.json")
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(cfg), **parts)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(scope="module")
def zimage(parts):
    return feature_model(parts)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, H, W, 3)).astype(np.float32) / 255)


def pipeline_embeddings(parts: dict, prompts) -> list:
    with torch.no_grad():
        embeds, _ = pipeline(parts).encode_prompt(prompts, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
    return embeds


def test_prompts_equal_the_pipelines_encode_prompt(parts, zimage):
    """The real tokens of each prompt, at their own lengths (zero-padded to the longest, the mask marking them)."""
    from diffusion_feature.engine.prompts import encode_prompt

    prompts = ["a photo of a red house", "a cat"]
    cond = encode_prompt(zimage, prompts)
    want = pipeline_embeddings(parts, list(prompts))
    lengths = [len(w) for w in want]
    assert lengths[0] > lengths[1] and cond.encoder_hidden_states.shape == (2, lengths[0], CAP)
    assert cond.encoder_attention_mask.sum(1).tolist() == lengths
    for i, w in enumerate(want):
        torch.testing.assert_close(cond.encoder_hidden_states[i, :lengths[i]], w, atol=1e-6, rtol=1e-5)
        assert not cond.encoder_hidden_states[i, lengths[i]:].any()
    template = parts["tokenizer"].apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=True)
    assert lengths[1] == len(parts["tokenizer"](template).input_ids)  # thinking on: no empty think block


def hand_run(parts, image, prompt: str, sigma: float, seed: int, ids=IDS):
    """The transformer run by hand as ZImagePipeline calls it (lists of (C, 1, H, W) latents and of captions, t =
    (1000 - 1000 sigma) / 1000) on the pipeline's own embeddings and x_t = (1 - sigma) x0 + sigma eps built here."""
    net, vae = parts["transformer"], parts["vae"]
    embeds = pipeline_embeddings(parts, [prompt])
    with torch.no_grad():
        pixels = ((image * 255).round() / 127.5 - 1).permute(0, 3, 1, 2).contiguous()
        x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        x_t = (1 - sigma) * x0 + sigma * eps
        with FeatureCapture(net, taps_of(net, ids), token_grid=tuple(x0.shape[-2:])) as capture:
            out = capture.run(x=list(x_t.unsqueeze(2)), t=(1000 - torch.tensor([sigma * 1000])) / 1000,
                              cap_feats=embeds, return_dict=False)
    return capture.features, x_t, out[0]


def test_extraction_equals_a_hand_run_of_the_transformer(parts, zimage, image):
    got = extract(zimage, image, "a red house", IDS, t=600, seed=4, vae_sample=False)
    want, _, _ = hand_run(parts, image, "a red house", 0.6, seed=4)
    assert sorted(got.tensors) == sorted(IDS)
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    tokens = len(pipeline_embeddings(parts, ["a red house"])[0])
    assert got.tensors["dit-in"].shape == (1, 16, 8, 16) and got.tensors["vit-block0-out"].shape == (1, 64, 4, 8)
    assert got.tensors["vit-block1-cross-map"].shape[-1] == tokens  # the caption's real tokens, no padding
    assert (got.meta["t"], got.meta["sigma"], got.meta["shift"], got.meta["guidance"]) == (600, 0.6, None, None)
    shifted = extract(zimage, image, "a red house", ["vit-block0-out"], t=600, seed=4, vae_sample=False, shift=3.0)
    sigma = 3 * 0.6 / (1 + 2 * 0.6)  # the scheduler's own shift, as an option
    assert shifted.meta["sigma"] == pytest.approx(sigma) and shifted.meta["shift"] == 3.0
    torch.testing.assert_close(shifted.tensors["vit-block0-out"],
                               hand_run(parts, image, "a red house", shifted.meta["sigma"], 4)[0]["vit-block0-out"],
                               atol=1e-6, rtol=1e-5)


def test_generation_equals_the_pipeline(parts, zimage):
    """Text-to-image as ZImagePipeline samples it: sigmas linspace(1, 1 / steps) under the static shift 3, the same
    seeded noise, t = 1 - sigma, the negated output stepped. Turbo's recipe (guidance_scale 0) is cfg 1 here, and the
    captured dit-out is the network's own output, the negative of each Euler step's velocity; guidance_scale g is
    cfg g + 1 (the pipeline's pos + g (pos - neg) over the empty prompt)."""
    from diffusion_feature.engine.generation import generate

    steps, seed = 2, 5
    gen = generate(zimage, "a red house", steps=steps, cfg=1.0, seed=seed, width=W, height=H,
                   layers=["dit-out", "vit-block1-out"], capture_steps="all")
    want = pipeline(parts)("a red house", height=H, width=W, num_inference_steps=steps, guidance_scale=0.0,
                           generator=torch.Generator().manual_seed(seed), output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    sched = pipeline(parts).scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    assert sched.sigmas[1] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # linspace, then the static shift
    x = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    out = gen.features.tensors["dit-out"]
    assert [r["step"] for r in gen.features.meta["rows"]] == [0, 1] and gen.features.meta["guidance"] is None
    for i in range(steps):
        x = x - (sched.sigmas[i + 1] - sched.sigmas[i]) * out[i:i + 1]
    torch.testing.assert_close(gen.latents, x, atol=1e-5, rtol=1e-5)
    assert gen.features.tensors["vit-block1-out"].shape == (2, 64, 4, 8)
    guided = generate(zimage, "a red house", steps=steps, cfg=3.0, seed=seed, width=W, height=H)
    want = pipeline(parts)("a red house", height=H, width=W, num_inference_steps=steps, guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(seed), output_type="pt")
    torch.testing.assert_close(guided.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)


def test_turbo_defaults_reach_the_sampler_from_the_library_and_the_node(parts, zimage):
    """Without steps / cfg, a Z-Image Turbo (its scheduler's shift 3, as shipped) samples with its recipe, 8 steps at
    cfg 1 (guidance_scale 0): the image equals ZImagePipeline's with those values, one conditional row per step, the
    defaults recorded; DFGenerate's steps 0 / cfg -1 mean the same. An explicit value wins over its default; the
    base model (another shift) takes ZImagePipeline's __call__ defaults."""
    from diffusion_feature import NODE_CLASS_MAPPINGS
    from diffusion_feature.engine.generation import generate, sampling_defaults
    from diffusion_feature.engine.prompts import encode_prompt

    seed = 5
    gen = generate(zimage, "a red house", seed=seed, width=W, height=H, layers=["dit-out"], capture_steps="all")
    want = pipeline(parts)("a red house", height=H, width=W, num_inference_steps=8, guidance_scale=0.0,
                           generator=torch.Generator().manual_seed(seed), output_type="pt")
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    meta = gen.features.meta
    assert (meta["steps"], meta["cfg"], meta["sampling_defaults"]["used"]) == (8, 1.0, ["steps", "cfg"])
    assert "Turbo" in meta["sampling_defaults"]["model"]
    assert [(r["step"], r["branch"]) for r in meta["rows"]] == [(i, "cond") for i in range(8)]
    image, features = NODE_CLASS_MAPPINGS["DFGenerate"]().run(
        zimage.clone(layers=["dit-out"]), encode_prompt(zimage, "a red house"), seed, 0, -1.0, "euler", W, H, 1,
        "last", "cond")
    torch.testing.assert_close(image, gen.images, atol=0, rtol=0)
    assert (features.meta["steps"], features.meta["cfg"]) == (8, 1.0)
    explicit = generate(zimage, "a red house", steps=3, seed=seed, width=W, height=H, layers=["dit-out"],
                        capture_steps="all").features.meta
    assert (explicit["steps"], explicit["cfg"], explicit["sampling_defaults"]["used"]) == (3, 1.0, ["cfg"])
    assert len(explicit["rows"]) == 3
    base = zimage.clone(scheduler_config={**zimage.scheduler_config, "shift": 6.0})
    assert (sampling_defaults(base).steps, sampling_defaults(base).cfg) == (50, 6.0)  # guidance_scale 5 = cfg 6


def test_refusals_name_what_would_be_valid(zimage, image):
    from diffusion_feature.engine.generation import generate

    with pytest.raises(ValueError, match=r"guidance applies to the families with a guidance embedding \(.*\), not "
                                         r"z-image; leave it unset$"):
        extract(zimage, image, "", ["dit-in"], t=100, guidance=3.5)
    with pytest.raises(ValueError, match=r"shift 'resolution' is the image-size shift of .*, not z-image: give a "
                                         r"number \(its scheduler shifts by 3.0\) or leave it unset$"):
        extract(zimage, image, "", ["dit-in"], t=100, shift="resolution")
    with pytest.raises(ValueError, match=r"z-image takes 2x2 latent patches: the image's sides must be multiples of "
                                         r"16 pixels, got 64x72$"):
        extract(zimage, image, "", ["dit-in"], t=100, size=(72, 64))
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16 pixels for z-image, got 72"):
        generate(zimage, "a cat", steps=2, width=64, height=72)
    with pytest.raises(ValueError, match=r"image-to-image generation works on the sd15, .* families, not z-image$"):
        generate(zimage, "a cat", steps=2, image=image)


def test_a_zimage_pipeline_folder_loads_offline_and_a_foreign_text_encoder_is_refused(tmp_path, parts, zimage,
                                                                                       image):
    """ZImagePipeline.save_pretrained's folder (text_encoder Qwen3Model, its tokenizer with the chat template) loads
    as the in-memory model; the same folder with a T5 as its text encoder is refused in one line."""
    import json
    import shutil

    from transformers import T5Config, T5EncoderModel

    from diffusion_feature.engine.loading import detect_folder_family, load_model

    folder = tmp_path / "tiny-z-image"
    pipeline(parts).save_pretrained(folder)
    assert detect_folder_family(folder) == ZI
    loaded = load_model(folder)
    assert loaded.family == ZI and type(loaded.text_encoders[0]).__name__ == "Qwen3Model"
    ids = ["vit-refiner0-txt-out", "vit-block1-out"]
    got, want = (extract(m, image, "a photo of a cat", ids, t=250, seed=0) for m in (loaded, zimage))
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    shutil.rmtree(foreign / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=16, d_model=CAP, d_ff=16, d_kv=8, num_heads=2, num_layers=1)).save_pretrained(
        foreign / "text_encoder")
    index = json.loads((foreign / "model_index.json").read_text())
    (foreign / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers",
                                                                                    "T5EncoderModel"]}))
    with pytest.raises(ValueError, match=r"^'foreign'/text_encoder is a T5EncoderModel \(t5\), not z-image's text "
                                         r"encoder: z-image takes a \w+ \(qwen3\)$"):
        load_model(foreign)


def test_random_z_image_builds_from_the_shipped_configs(tmp_path, monkeypatch, image):
    """load_model("random:z-image") builds the shipped architecture (shrunk here): the pipeline's Qwen3Model (not the
    config's causal LM), the host's Qwen tokenizer with Qwen3's template, the VAE's and scheduler's settings. The
    full-size configs agree with each other and with the family (caption width, patch, the text encoder's width)."""
    import transformers

    from diffusion_feature.engine.loading import RandomWeightsWarning, load_model

    fam = get_family(ZI)
    full = transformers.AutoConfig.from_pretrained(str(fam.config_dir / "text_encoder"), local_files_only=True)
    assert full.model_type == "qwen3" and full.hidden_size == fam.text_encoders[0].width
    assert fam.denoiser_config()["cap_feat_dim"] == full.hidden_size
    assert fam.config(".", "model_index.json")["text_encoder"] == ["transformers", "Qwen3Model"]
    tiny_shipped_configs(tmp_path, monkeypatch, ZI, {
        "transformer": dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=CAP,
                            axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]),
        "vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1),
        "text_encoder": dict(vocab_size=272, hidden_size=CAP, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16)})
    tiny_qwen_tokenizer().save_pretrained(tmp_path / "qwen25_tokenizer")
    with pytest.warns(RandomWeightsWarning):
        model = load_model("random:z-image")
    assert type(model.text_encoders[0]).__name__ == "Qwen3Model"
    assert model.vae.config.shift_factor == 0.1159 and model.scheduler_config["shift"] == 3.0
    got = extract(model, image, "a red house", ["vit-block1-cross-map", "dit-out"], t=500, seed=0)
    assert got.meta["sigma"] == 0.5 and torch.isfinite(got.tensors["dit-out"]).all()
    assert got.tensors["dit-out"].shape == (1, 16, 8, 16)

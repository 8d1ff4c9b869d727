"""Qwen-Image on DF_MODEL (the diffusers backend): prompts as QwenImagePipeline.encode_prompt, flow extraction
equal to a hand-run of the transformer on the pipeline's own inputs, generation equal to QwenImagePipeline (true
CFG), loading (diffusers folder, single transformer file with components, random weights from the shipped configs)
and the one-line refusals (another family's text encoder, Edit folders, the UNet-only tools)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffusion_feature.layer_catalog import FeatureCapture, get_family, taps_of
from test_flux_engine import extract, tiny_shipped_configs

QWEN = "qwen-image"
IDS = ["dit-in", "vit-block0-out", "vit-block0-txt-q", "vit-block1-cross-map", "vit-block1-self-map", "dit-out"]
H, W = 64, 128  # pixels: a non-square 8x16 latent, 4x8 packed patches
MROPE = [1, 1, 2]  # Qwen2.5-VL's rotary sections (t, h, w) at a head width of 8
TINY_LM = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=2048, rope_scaling={"type": "mrope",
                                                                                  "mrope_section": MROPE})
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                   fullatt_block_indexes=[0])
TINY_VAE = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def tiny_qwen_tokenizer():
    """A byte-level BPE without merges (every byte one token) with Qwen's chat and padding specials, as a
    Qwen2TokenizerFast: what the pipeline's tokenizer does to the template, at a vocabulary of 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=tk, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_qwen_parts(seed: int = 0) -> dict:
    """Qwen-Image's components at a tiny size: 2 double blocks, a Qwen-Image VAE with per-channel statistics, a
    2-layer Qwen2.5-VL, the byte-level tokenizer."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():  # diffusers zero-initialises parts of it: no term left out
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKLQwenImage(z_dim=16, temperal_downsample=[False, True, True],
                                 latents_mean=[0.1 * i - 0.8 for i in range(16)],
                                 latents_std=[1 + 0.1 * i for i in range(16)], **TINY_VAE).eval()
    config = Qwen2_5_VLConfig(text_config=dict(TINY_LM, vocab_size=len(tokenizer)), vision_config=TINY_VISION)
    return dict(transformer=transformer, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                tokenizer=tokenizer)


def feature_model(parts: dict):
    from diffusion_feature.engine.model import FeatureModel

    return FeatureModel(QWEN, parts["transformer"], parts["vae"], [parts["text_encoder"]], [parts["tokenizer"]],
                        get_family(QWEN).config("scheduler", "scheduler_config.json"), source="tiny")


def pipeline(parts: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(get_family(QWEN).config("scheduler",
                                                                                   "scheduler_config.json"))
    return QwenImagePipeline(scheduler=scheduler, **parts)


@pytest.fixture(scope="module")
def parts():
    return tiny_qwen_parts()


@pytest.fixture(scope="module")
def qwen(parts):
    return feature_model(parts)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, H, W, 3)).astype(np.float32) / 255)


def hand_run(parts, image, prompts, t: int, seed: int, ids=IDS, sigma: float | None = None):
    """The transformer run by hand as QwenImagePipeline prepares its inputs (its own encode_prompt and
    _pack_latents, img_shapes, timestep / 1000), on x_t built here from the VAE's 5-D posterior mean standardised
    by latents_mean / latents_std, captured with FeatureCapture."""
    pipe = pipeline(parts)
    net, vae = parts["transformer"], parts["vae"]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
        pixels = (image.permute(0, 3, 1, 2) * 2 - 1)[:, :, None]
        z = vae.encode(pixels).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
        x0 = ((z - mean) / std)[:, :, 0]
        sigma = t / 1000 if sigma is None else sigma
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        x_t = ((1 - sigma) * x0 + sigma * eps).expand(embeds.shape[0], -1, -1, -1)
        b, h, w = x_t.shape[0], x0.shape[-2], x0.shape[-1]
        kwargs = dict(hidden_states=pipe._pack_latents(x_t, b, 16, h, w), timestep=torch.full((b,), sigma),
                      encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                      img_shapes=[[(1, h // 2, w // 2)]] * b)
        with FeatureCapture(net, taps_of(net, ids), token_grid=(h, w)) as capture:
            capture.run(**kwargs)
    return capture.features, embeds, mask


def test_prompts_are_the_pipelines_encode_prompt(parts, qwen):
    from diffusion_feature.engine.prompts import encode_prompt

    pipe, spec = pipeline(parts), get_family(QWEN).text_encoders[0]
    assert (spec.template, spec.drop) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    long = "a red house " * 60  # 720 byte tokens: cut to max_sequence_length 512
    for prompts in (["a red house"], ["a red house", "a cat"], [long, "a cat"]):
        got = encode_prompt(qwen, prompts)
        want, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
        torch.testing.assert_close(got.encoder_hidden_states, want)
        if mask is None:
            assert got.encoder_attention_mask is None  # one length: no mask, as the pipeline drops it
        else:
            assert torch.equal(got.encoder_attention_mask, mask)
    assert got.encoder_hidden_states.shape[1] == 512 and got.encoder_attention_mask[1].sum() < 512


def test_extraction_equals_a_hand_run_of_the_transformer(parts, qwen, image):
    from diffusion_feature.engine.prompts import encode_prompt

    got = extract(qwen, image, "a red house", IDS, t=600, seed=4, vae_sample=False)
    want, embeds, _ = hand_run(parts, image, ["a red house"], t=600, seed=4)
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert got.tensors["dit-in"].shape == (1, 16, 8, 16) and got.tensors["vit-block0-out"].shape[-2:] == (4, 8)
    # cross-map columns: the prompt's own tokens (no padding for one prompt), rows with the self-map summing to 1
    cross, own = got.tensors["vit-block1-cross-map"], got.tensors["vit-block1-self-map"]
    assert cross.shape[-1] == embeds.shape[1]
    torch.testing.assert_close(cross.sum(-1) + own.sum(-1), torch.ones_like(cross.sum(-1)))
    meta = got.meta
    assert (meta["family"], meta["t"], meta["sigma"], meta["shift"], meta["guidance"]) == (QWEN, 600, 0.6, None,
                                                                                            None)
    # two prompts of different lengths: padded to the longer with a mask that reaches the network
    two = torch.cat([image, image])
    cond = encode_prompt(qwen, ["a red house", "a cat"])
    got = extract(qwen, two, cond, IDS, t=600, seed=4, vae_sample=False)
    want, _, mask = hand_run(parts, image, ["a red house", "a cat"], t=600, seed=4)
    assert mask is not None and not mask[1].all()
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    padded = got.tensors["vit-block1-cross-map"][1][..., ~mask[1].bool()]
    assert padded.abs().max() == 0  # padded text keys get no probability
    shifted = extract(qwen, image, "a red house", ["dit-out"], t=600, seed=4, vae_sample=False, shift="resolution")
    cfg = qwen.scheduler_config
    mu = cfg["base_shift"] + (cfg["max_shift"] - cfg["base_shift"]) * (32 - cfg["base_image_seq_len"]) / (
        cfg["max_image_seq_len"] - cfg["base_image_seq_len"])  # the pipeline's calculate_shift at 4x8 tokens
    assert shifted.meta["mu"] == pytest.approx(mu)
    want, _, _ = hand_run(parts, image, ["a red house"], t=600, seed=4, ids=["dit-out"], sigma=shifted.meta["sigma"])
    torch.testing.assert_close(shifted.tensors["dit-out"], want["dit-out"], atol=1e-6, rtol=1e-5)


def test_generation_equals_the_pipeline(parts, qwen):
    from diffusion_feature.engine.generation import generate

    pipe = pipeline(parts)
    for cfg, negative in ((4.0, " "), (1.0, None)):  # true CFG over a negative prompt; none
        want = pipe("a red house", negative_prompt=negative, true_cfg_scale=cfg, height=H, width=W,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="pt").images
        gen = generate(qwen, "a red house", negative, steps=2, cfg=cfg, seed=5, width=W, height=H,
                       layers=["vit-block1-out"], capture_steps="all", capture_branch="cond")
        torch.testing.assert_close(gen.images.permute(0, 3, 1, 2), want.clamp(0, 1), atol=1e-5, rtol=1e-5)
        assert gen.features.tensors["vit-block1-out"].shape[0] == 2  # both steps' conditional rows
        assert gen.features.meta["guidance"] is None


def test_the_unet_only_tools_say_which_families_they_support(qwen, image):
    from diffusion_feature.engine.inversion import InversionError, invert
    from diffusion_feature.engine.pnp import PnPError, translate

    with pytest.raises(InversionError, match=r"DDIM inversion works on the sd15, .* families, not qwen-image$"):
        invert(qwen, image, "", 2)
    with pytest.raises(PnPError, match=r"Plug-and-Play runs on sd15, .* UNets, not qwen-image$"):
        translate(qwen, None, ["a cat"])
    with pytest.raises(ValueError, match=r"guidance applies to the families with a guidance embedding \(flux, flux2\), "
                                         r"not qwen-image; leave it unset$"):
        extract(qwen, image, "", ["dit-in"], t=100, guidance=2.0)
    with pytest.raises(ValueError, match=r"multiples of 16 pixels, got 64x72"):
        extract(qwen, image, "", ["dit-in"], t=100, size=(72, 64))


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, parts):
    folder = tmp_path_factory.mktemp("tiny-qwen")
    pipeline(parts).save_pretrained(folder)
    return folder


def test_a_diffusers_folder_and_a_single_transformer_file_load_offline(tmp_path, qwen_folder, parts, qwen, image):
    from safetensors.torch import save_file

    from diffusion_feature.engine.checkpoint_files import CheckpointError
    from diffusion_feature.engine.loading import detect_folder_family, load_model

    assert detect_folder_family(qwen_folder) == QWEN
    loaded = load_model(qwen_folder)
    assert type(loaded.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(loaded.text_encoders[0]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    ids = ["vit-block0-txt-out", "vit-block1-out"]
    want = extract(qwen, image, "a photo of a cat", ids, t=250, seed=0)
    for k in ids:
        torch.testing.assert_close(extract(loaded, image, "a photo of a cat", ids, t=250, seed=0).tensors[k],
                                   want.tensors[k], atol=1e-6, rtol=1e-5)
    # ComfyUI's qwen_image*.safetensors: the transformer in diffusers' names under its prefix
    path = tmp_path / "qwen_image_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in parts["transformer"].state_dict().items()},
              path)
    shutil.copytree(qwen_folder, tmp_path / "qwen_image_tiny.config")
    for components in (None, {"vae": path}):
        with pytest.raises(CheckpointError, match=r"^'.*qwen_image_tiny.safetensors' is read for its qwen-image "
                                                  r"transformer only: give components= \(the CLI's --components\) as "
                                                  r"a qwen-image diffusers folder .* \(its component files one by one "
                                                  r"are not read\)$"):
            load_model(path, components=components)
    single = load_model(path, components=qwen_folder)
    assert single.family == QWEN and single.source == str(path)
    for k in ids:
        torch.testing.assert_close(extract(single, image, "a photo of a cat", ids, t=250, seed=0).tensors[k],
                                   want.tensors[k], atol=1e-6, rtol=1e-5)
    # another family's text encoder in the folder
    wrong = tmp_path / "wrong"
    shutil.copytree(qwen_folder, wrong)
    from transformers import T5Config, T5EncoderModel
    shutil.rmtree(wrong / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=16, d_model=8, d_ff=8, d_kv=4, num_heads=2, num_layers=1)).save_pretrained(
        wrong / "text_encoder")
    with pytest.raises(CheckpointError, match=r"^'wrong'/text_encoder is a T5EncoderModel \(t5\), not qwen-image's "
                                              r"text encoder: qwen-image takes a Qwen2_5_VLForConditionalGeneration "
                                              r"\(qwen2_5_vl\)$"):
        load_model(wrong)
    # an Edit folder: refused in one line pointing at the native backend
    edit = tmp_path / "edit"
    shutil.copytree(qwen_folder, edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps(dict(index, _class_name="QwenImageEditPlusPipeline")))
    with pytest.raises(CheckpointError, match=r"^'edit': a QwenImageEditPlusPipeline folder \(Qwen-Image-Edit\) "
                                              r"needs its reference image .* use DFExtractNative, which takes Edit "
                                              r"references; DF_MODEL loads Qwen-Image \(QwenImagePipeline\) folders$"):
        load_model(edit)


def test_random_qwen_image_builds_from_the_shipped_configs(tmp_path, monkeypatch, image):
    from diffusion_feature.engine.loading import RandomWeightsWarning, load_model

    tokenizer = tiny_qwen_tokenizer()
    tiny = {"transformer": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                axes_dims_rope=[4, 6, 6]),
            "vae": TINY_VAE,
            "text_encoder": dict(TINY_LM, vocab_size=len(tokenizer), vision_config=TINY_VISION)}
    tiny_shipped_configs(tmp_path, monkeypatch, QWEN, tiny)
    tokenizer.save_pretrained(tmp_path / "qwen25_tokenizer")  # the host's (ComfyUI bundles one)
    with pytest.warns(RandomWeightsWarning):
        model = load_model("random:qwen-image")
    assert type(model.vae).__name__ == "AutoencoderKLQwenImage" and model.vae.config.latents_std[0] == 2.8184
    got = extract(model, image, "a red house", ["vit-block1-cross-map", "dit-out"], t=500, seed=1)
    assert got.tensors["dit-out"].shape == (1, 16, 8, 16) and got.meta["family"] == QWEN

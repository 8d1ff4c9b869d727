"""Flux on DF_MODEL (the diffusers backend): prompts, rectified-flow noise, packed inputs and guidance, checked
against diffusers' own FluxPipeline pieces and a hand-run of the transformer; loading (diffusers folder, random
weights from the shipped configs); the CLI; clear errors where the UNet-only tools are asked for."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_feature.layer_catalog import FeatureCapture, get_family, modulation_taps, taps_of

FLUX = "flux"
IDS = ["dit-in", "vit-block0-out", "vit-block0-txt-q", "vit-block1-cross-map", "vit-block2-in", "vit-block3-txt-out",
       "dit-out"]
H, W = 64, 128  # pixels: a non-square 8x16 latent, 4x8 packed patches


def tiny_t5_tokenizer():
    """A word-level stand-in for T5's tokenizer that, like T5's, appends </s> to what it encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "photo", "of", "the", "red", "house"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_flow_vae(**factors):
    """A tiny 16-channel VAE (Flux's and SD3's kind) with the family's shift and scaling factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=16, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False, **factors).eval()


def tiny_flux_parts(seed: int = 0) -> dict:
    """Flux's components at a tiny size: 2 double + 2 single blocks, a 16-channel VAE with Flux's shift and scale,
    a tiny CLIP-L (pooled) and T5, the real CLIP tokenizer."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from conftest import tiny_clip
    from diffusion_feature.engine.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    vae = tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611)
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=12, d_ff=16, d_kv=6, num_heads=2, num_layers=1)).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=tiny_clip(32), tokenizer=clip_tokenizer(),
                text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer())


def feature_model(parts: dict):
    from diffusion_feature.engine.model import FeatureModel

    return FeatureModel(FLUX, parts["transformer"], parts["vae"], [parts["text_encoder"], parts["text_encoder_2"]],
                        [parts["tokenizer"], parts["tokenizer_2"]], get_family(FLUX).config("scheduler",
                                                                                             "scheduler_config.json"),
                        source="tiny")


def pipeline(parts: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(get_family(FLUX).config("scheduler",
                                                                                   "scheduler_config.json"))
    return FluxPipeline(scheduler=scheduler, **parts)


@pytest.fixture(scope="module")
def parts():
    return tiny_flux_parts()


@pytest.fixture(scope="module")
def flux(parts):
    return feature_model(parts)


@pytest.fixture(scope="module")
def image():
    """A ComfyUI IMAGE of 8-bit values, H x W (prepared exactly, without a resize)."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (1, H, W, 3)).astype(np.float32) / 255)


def extract(model, images, prompt, ids, **kw):
    """engine.extraction.extract at the test's size unless given (no resize: the IMAGE is H x W)."""
    from diffusion_feature.engine.extraction import extract

    return extract(model, images, prompt, ids, **{"size": (H, W), **kw})


def hand_run(parts, image, prompt: str, t: int, seed: int, guidance: float = 3.5, sigma: float | None = None,
             ids=IDS, modulations: bool = False):
    """The transformer run by hand as FluxPipeline prepares its inputs (its own encode_prompt, _pack_latents and
    _prepare_latent_image_ids), on x_t = (1 - sigma) x0 + sigma eps built here, captured with FeatureCapture.
    modulations: also each block input's companion modulation (what DiTF's transform needs)."""
    pipe = pipeline(parts)
    net, vae = parts["transformer"], parts["vae"]
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device=torch.device("cpu"),
                                                      max_sequence_length=512)
        pixels = image.permute(0, 3, 1, 2) * 2 - 1
        x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        sigma = t / 1000 if sigma is None else sigma
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        x_t = (1 - sigma) * x0 + sigma * eps
        h, w = x0.shape[-2:]
        kwargs = dict(hidden_states=pipe._pack_latents(x_t, 1, x0.shape[1], h, w), timestep=torch.tensor([sigma]),
                      guidance=torch.tensor([guidance]), pooled_projections=pooled, encoder_hidden_states=embeds,
                      txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu",
                                                                                torch.float32))
        taps = taps_of(net, ids) + (modulation_taps(net, ids) if modulations else [])
        with FeatureCapture(net, taps, token_grid=(h, w)) as capture:
            capture.run(**kwargs)
    return capture.features


TOKEN_RANGES = [{"part": "text", "start": 0, "stop": 512},
                {"part": "image", "start": 512, "stop": 512 + 32, "grid": [H // 16, W // 16]}]


def test_extraction_equals_a_hand_run_of_the_transformer(parts, flux, image):

    got = extract(flux, image, "a red house", IDS, t=600, seed=4, vae_sample=False)
    want = hand_run(parts, image, "a red house", t=600, seed=4)
    assert sorted(got.tensors) == sorted(IDS)
    for k in IDS:
        torch.testing.assert_close(got.tensors[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert got.tensors["dit-in"].shape == (1, 16, 8, 16)  # unpacked onto the non-square latent grid
    assert got.tensors["vit-block0-out"].shape == (1, 16, 4, 8)  # 2x2 patches: a 4x8 token grid
    assert got.tensors["vit-block1-cross-map"].shape[-1] == 512  # T5's 512 tokens for dev
    meta = got.meta
    assert (meta["t"], meta["sigma"], meta["shift"], meta["guidance"]) == (600, 0.6, None, 3.5)
    assert meta["tokens"] == TOKEN_RANGES  # the joint sequence's parts: T5's 512 tokens, then the 4x8 image


def test_shift_and_guidance_are_inputs_recorded_in_the_metadata(parts, flux, image):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift


    ids = ["vit-block2-in"]
    got = extract(flux, image, "a cat", ids, t=300, seed=1, vae_sample=False, guidance=5.0, shift="resolution")
    cfg = flux.scheduler_config
    mu = calculate_shift(32, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                         cfg["max_shift"])  # 4x8 packed tokens
    sigma = float(FlowMatchEulerDiscreteScheduler.from_config(cfg).time_shift(mu, 1.0, torch.tensor(0.3)))
    assert got.meta["guidance"] == 5.0 and got.meta["shift"] == "resolution"
    assert got.meta["mu"] == pytest.approx(mu) and got.meta["sigma"] == pytest.approx(sigma)
    want = hand_run(parts, image, "a cat", t=300, seed=1, guidance=5.0, sigma=got.meta["sigma"])
    torch.testing.assert_close(got.tensors[ids[0]], want[ids[0]], atol=1e-6, rtol=1e-5)
    static = extract(flux, image, "a cat", ids, t=300, seed=1, vae_sample=False, shift=3.0)
    assert static.meta["sigma"] == pytest.approx(3 * 0.3 / (1 + 2 * 0.3)) and static.meta["shift"] == 3.0
    plain = extract(flux, image, "a cat", ids, t=300, seed=1, vae_sample=False)
    assert not torch.allclose(plain.tensors[ids[0]], got.tensors[ids[0]])  # both inputs reach the network


def test_seeded_ensemble_batch_and_resize_as_for_the_unets(flux, image):
    from conftest import InputRecorder
    from diffusion_feature.engine.extraction import extract_in_batches, extract_timesteps
    from diffusion_feature.engine.prompts import encode_prompt

    ids = ["vit-block1-out", "vit-block3-txt-in"]
    one = extract(flux, image, "a dog", ids, t=500, seed=2)
    two = torch.cat([image, image.flip(2)])
    batched = extract_in_batches(flux, two, "a dog", ids, t=500, seed=2, batch_size=1, size=(H, W))
    for k in ids:
        torch.testing.assert_close(batched.tensors[k][:1], one.tensors[k], atol=1e-6, rtol=1e-5)
    cond = encode_prompt(flux, ["a dog", "a cat"])  # one prompt per image: each chunk takes its own pooled row
    per_image = extract_in_batches(flux, two, cond, ids, t=500, seed=2, batch_size=1, size=(H, W))
    cat = extract(flux, image.flip(2), "a cat", ids, t=500, seed=2)
    for k in ids:
        torch.testing.assert_close(per_image.tensors[k][1:], cat.tensors[k], atol=1e-6, rtol=1e-5)
    mean = dict(t=500, vae_sample=False)  # the VAE's draw follows `seed` alone; the ensemble's noise seed + k
    ens = extract(flux, image, "a dog", ids, seed=2, ensemble=2, **mean)
    draws = [extract(flux, image, "a dog", ids, seed=s, **mean).tensors[ids[0]] for s in (2, 3)]
    torch.testing.assert_close(ens.tensors[ids[0]], (draws[0] + draws[1]) / 2)
    pooled = extract(flux, image, "a dog", ids, t=500, seed=2, feature_resize=2)
    assert pooled.tensors[ids[0]].shape == (1, 16, 2, 4)
    torch.testing.assert_close(pooled.tensors[ids[0]], torch.nn.functional.avg_pool2d(one.tensors[ids[0]], 2))
    several = extract_timesteps(flux, image, "a dog", ids, [100, 500], seed=2, size=(H, W))
    assert [f.meta["sigma"] for f in several] == [0.1, 0.5]
    torch.testing.assert_close(several[1].tensors[ids[1]], one.tensors[ids[1]])
    recorder = InputRecorder(flux.denoiser, ["transformer_blocks.1", "single_transformer_blocks.0"])
    try:
        extract(flux, image, "a dog", ["vit-block0-out"], t=500, seed=2)  # early exit after the first block
        early = list(recorder.inputs)
        extract(flux, image, "a dog", ["dit-out"], t=500, seed=2)
    finally:
        recorder.close()
    assert early == [] and sorted(recorder.inputs) == ["single_transformer_blocks.0", "transformer_blocks.1"]


def test_the_unet_only_tools_say_which_families_they_support(flux, image):
    from diffusion_feature.engine.generation import generate
    from diffusion_feature.engine.inversion import InversionError, invert

    from diffusion_feature.engine.pnp import PnPError, translate

    with pytest.raises(InversionError, match=r"DDIM inversion works on the sd15, .* families, not flux$"):
        invert(flux, image, "", 2)
    with pytest.raises(PnPError, match=r"Plug-and-Play runs on sd15, .* UNets, not flux$"):
        translate(flux, None, ["a cat"])
    with pytest.raises(ValueError, match=r"image-to-image generation works on the sd15, .* families, not flux$"):
        generate(flux, "a cat", steps=2, image=image)
    with pytest.raises(ValueError, match=r"flux samples with flow-match Euler: scheduler must be one of euler, "):
        generate(flux, "a cat", steps=2, width=64, height=64, scheduler="ddim")
    with pytest.raises(ValueError, match=r"denoise_from .* works on the sd15.* not flux$"):
        extract(flux, image, "", ["dit-in"], t=100, denoise_from=300)
    with pytest.raises(ValueError, match=r"shift must be a number > 0 or 'resolution'"):
        extract(flux, image, "", ["dit-in"], t=100, shift=-1)
    with pytest.raises(ValueError, match=r"multiples of 16 pixels, got 64x72"):
        extract(flux, image, "", ["dit-in"], t=100, size=(72, 64))


def test_shift_and_guidance_are_refused_for_a_unet(tiny_sd15, image):

    with pytest.raises(ValueError, match=r"guidance applies to the families with a guidance embedding "
                                         r"\(flux, flux2\), not sd15"):
        extract(tiny_sd15, image, "", ["mid-repeat0-res-out"], t=100, guidance=2.0)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory, parts):
    """The tiny Flux written by diffusers' FluxPipeline.save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-flux")
    pipeline(parts).save_pretrained(folder)
    return folder


def test_a_diffusers_flux_folder_loads_offline(flux_folder, flux, image):
    from diffusion_feature.engine.loading import detect_folder_family, load_model

    folder = flux_folder
    assert detect_folder_family(folder) == FLUX  # not the other transformer family (PixArt)
    loaded = load_model(folder)
    assert loaded.family == FLUX and loaded.vae.config.shift_factor == 0.1159
    ids = ["vit-block0-txt-out", "vit-block2-out"]
    got, want = (extract(m, image, "a photo of a cat", ids, t=250, seed=0) for m in (loaded, flux))
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)


def tiny_shipped_configs(tmp_path, monkeypatch, name: str, tiny: dict):
    """The shipped configs with family `name`'s components changed by `tiny` (component -> config changes), in
    place of the shipped ones for this test; the host's T5 tokenizer (ComfyUI bundles one) a tiny stand-in."""
    import json
    import shutil

    from diffusion_feature.engine import tokenizers
    from diffusion_feature.layer_catalog.families import family

    root = tmp_path / "configs"
    shutil.copytree(family.CONFIG_ROOT, root)
    for part, changes in tiny.items():
        path = root / name / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    monkeypatch.setattr(family, "CONFIG_ROOT", root)
    tiny_t5_tokenizer().save_pretrained(tmp_path / "t5_tokenizer")
    monkeypatch.setattr(tokenizers, "host_tokenizer_dir", lambda folder: tmp_path / folder)
    return root


@pytest.fixture()
def random_flux(tmp_path, monkeypatch):
    """load_model("random:flux") builds from the shipped configs (the real code path), shrunk to a tiny size here;
    its T5 tokenizer is the host's (ComfyUI bundles one), here a tiny stand-in."""
    tiny = {"transformer": dict(num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=12, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4]),
            "vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1),
            "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 projection_dim=32),
            "text_encoder_2": dict(vocab_size=16, d_model=12, d_ff=16, d_kv=6, num_heads=2, num_layers=1)}
    return tiny_shipped_configs(tmp_path, monkeypatch, FLUX, tiny)


def test_random_flux_builds_from_the_shipped_configs_and_the_cli_extracts(tmp_path, random_flux, image,
                                                                         tiny_ditf_preset):
    from PIL import Image

    from conftest import run_cli
    from diffusion_feature.engine.features_io import load_features
    from diffusion_feature.engine.loading import RandomWeightsWarning, load_model

    with pytest.warns(RandomWeightsWarning):
        model = load_model("random:flux")
    assert type(model.text_encoders[1]).__name__ == "T5EncoderModel" and model.vae.config.latent_channels == 16
    assert model.denoiser.config.guidance_embeds and model.vae.config.shift_factor == 0.1159
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(folder / "a.png")
    out = tmp_path / "features"
    ids = "vit-block1-out,vit-block3-txt-q"
    run = run_cli("extract", "--model", "random:flux", "--layers", ids, "--input", folder, "--output", out,
                  "--t", 700, "--seed", 1, "--prompt", "a red house", "--size", f"{W}x{H}", "--shift", 3,
                  "--guidance", 4)
    assert run.returncode == 0, run.stderr
    assert "RANDOM WEIGHTS" in run.stderr
    saved = load_features(out / "a.safetensors")
    assert (saved.meta["t"], saved.meta["shift"], saved.meta["guidance"]) == (700, 3.0, 4.0)
    assert saved.meta["sigma"] == pytest.approx(3 * 0.7 / (1 + 2 * 0.7))
    want = extract(model, folder / "a.png", "a red house", ids.split(","), t=700, seed=1, shift=3.0, guidance=4.0)
    assert saved.meta["tokens"] == want.meta["tokens"] == TOKEN_RANGES  # saved with the features
    for k in want.tensors:
        torch.testing.assert_close(saved.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)
    # the ditf preset: DiTF's feature (the same as the library's), its transform and channels in the saved file
    run = run_cli("extract", "--model", "random:flux", "--layers", "ditf", "--input", folder, "--output",
                  tmp_path / "ditf", "--t", 700, "--seed", 1, "--prompt", "a red house", "--size", f"{W}x{H}")
    assert run.returncode == 0, run.stderr
    saved = load_features(tmp_path / "ditf" / "a.safetensors")
    want = extract(model, folder / "a.png", "a red house", "ditf", t=700, seed=1)
    assert list(saved.tensors) == ["vit-block2-in"] and saved.meta["transform"] == "ditf"
    assert saved.meta["massive_channels"] == want.meta["massive_channels"]  # random weights: likely none
    torch.testing.assert_close(saved.tensors["vit-block2-in"], want.tensors["vit-block2-in"], atol=1e-6, rtol=1e-5)
    bad = run_cli("extract", "--model", "random:flux", "--layers", ids, "--input", folder, "--output",
                  tmp_path / "bad", "--shift", "dynamic")
    assert bad.returncode == 2 and "--shift must be a number > 0 or 'resolution', got 'dynamic'" in bad.stderr


def to_original_layout(transformer) -> dict:
    """The transformer's weights in Black Forest Labs' layout (flux1-dev.safetensors), by ComfyUI's own map of
    the two layouts (comfy.utils.flux_to_diffusers), read backwards."""
    cfg = transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    return by_comfy_key_map(transformer, lambda utils: utils.flux_to_diffusers(
        {"depth": cfg.num_layers, "depth_single_blocks": cfg.num_single_layers, "hidden_size": inner}))


def by_comfy_key_map(transformer, key_map_of) -> dict:
    """The transformer's weights in the original layout of ComfyUI's key map key_map_of(comfy.utils) (diffusers
    name -> original name, a (name, slice) piece of a fused tensor, or (name, None, function)), read backwards."""
    import native_comfy

    try:
        key_map = key_map_of(native_comfy.use_comfy("0.3.64").utils)
    finally:
        native_comfy.release()
    state, out, pieces = transformer.state_dict(), {}, {}
    for name, target in key_map.items():
        if name not in state:
            continue
        if isinstance(target, str):
            out[target] = state[name]
        elif target[1] is None:  # (name, None, function): ComfyUI's swap of the final modulation's halves
            out[target[0]] = target[2](state[name])
        else:
            pieces.setdefault(target[0], []).append((target[1][1], state[name]))
    for target, parts in pieces.items():
        out[target] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    assert set(state) <= set(key_map)  # every weight has its place in the original layout
    return out


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory, flux_folder, parts):
    """The tiny transformer as a single file in the original layout, with its configs beside it (a non-standard
    size) as flux1-tiny.config/."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("flux-file")
    path = folder / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_original_layout(parts["transformer"]).items()}, path)
    shutil.copytree(flux_folder, folder / "flux1-tiny.config")
    return path


def test_a_single_file_flux_transformer_loads_with_its_components_folder(tmp_path, flux_folder, flux_file, flux,
                                                                         image):
    from PIL import Image

    from conftest import run_cli
    from diffusion_feature.engine.checkpoint_files import CheckpointError
    from diffusion_feature.engine.features_io import load_features
    from diffusion_feature.engine.loading import load_model

    folder, path = flux_folder, flux_file
    with pytest.raises(CheckpointError, match="is read for its flux transformer only: give components="):
        load_model(path)
    loaded = load_model(path, components=folder)
    assert loaded.family == FLUX and loaded.source == str(path)
    ids = ["vit-block1-txt-attn-out", "vit-block3-out", "dit-out"]
    got, want = (extract(m, image, "a photo", ids, t=400, seed=0) for m in (loaded, flux))
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(images / "a.png")
    run = run_cli("extract", "--model", path, "--components", folder, "--layers", ids[0], "--input", images,
                  "--output", tmp_path / "features", "--t", 400, "--seed", 0, "--prompt", "a photo", "--size",
                  f"{W}x{H}")
    assert run.returncode == 0, run.stderr
    torch.testing.assert_close(load_features(tmp_path / "features" / "a.safetensors").tensors[ids[0]],
                               got.tensors[ids[0]], atol=1e-6, rtol=1e-5)


def test_a_single_file_flux_transformer_loads_with_component_files(tmp_path, flux_file, parts, flux, image,
                                                                    monkeypatch):
    """The files ComfyUI users have: ae.safetensors (the VAE's original layout), clip_l and t5xxl (transformers'
    layout), beside the transformer file; configs from its .config/ folder, tokenizers bundled or the host's."""
    from PIL import Image
    from safetensors.torch import save_file

    from conftest import run_cli
    from diffusion_feature.engine import tokenizers
    from diffusion_feature.engine.checkpoint_files import CheckpointError
    from diffusion_feature.engine.loading import load_model
    from ldm_export import vae_to_ldm

    path = flux_file
    tiny_t5_tokenizer().save_pretrained(tmp_path / "t5_tokenizer")
    monkeypatch.setattr(tokenizers, "host_tokenizer_dir", lambda name: tmp_path / name)
    files = {"vae": tmp_path / "ae.safetensors", "text_encoder": tmp_path / "clip_l.safetensors",
             "text_encoder_2": tmp_path / "t5xxl.safetensors"}
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(parts["vae"]).items()},
              files["vae"])
    save_file({(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
               for k, v in parts["text_encoder"].state_dict().items()}, files["text_encoder"])
    save_file({k: v.contiguous() for k, v in parts["text_encoder_2"].state_dict().items()
               if k != "encoder.embed_tokens.weight"}, files["text_encoder_2"])  # tied to shared.weight
    with pytest.raises(CheckpointError, match=r"component files are vae=FILE, text_encoder=FILE, text_encoder_2="
                                              r"FILE; missing text_encoder_2$"):
        load_model(path, components={"vae": files["vae"], "text_encoder": files["text_encoder"]})
    # another model's encoder file where CLIP-L belongs (its weights' names all differ): refused, not loaded random
    with pytest.raises(CheckpointError, match=r"t5xxl.safetensors' is not a CLIPTextModel \(text_encoder\): \d+ of "
                                              r"its \d+ weights are not in the file; give the CLIPTextModel file"):
        load_model(path, components={**files, "text_encoder": files["text_encoder_2"]})
    loaded = load_model(path, components=files)
    ids = ["vit-block0-txt-in", "vit-block3-out"]
    got, want = (extract(m, image, "a red house", ids, t=400, seed=0) for m in (loaded, flux))
    for k in ids:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)
    (tmp_path / "images").mkdir()
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "images" / "a.png")
    bad = run_cli("extract", "--model", path, "--components", files["vae"], "clip_l.safetensors", "--layers",
                  ids[0], "--input", tmp_path / "images", "--output", tmp_path / "features")
    assert bad.returncode == 2 and "--components takes one diffusers folder or NAME=FILE items" in bad.stderr


def test_generation_equals_flux_pipeline_and_captures_the_velocity_it_steps_with(parts, flux):
    """Text-to-image as FluxPipeline samples it (flow-match Euler, resolution shift, guidance embedding, the same
    seeded noise), and the captured dit-out is the velocity of each Euler step: x_{i+1} = x_i + (s_{i+1} - s_i) v_i."""
    from diffusion_feature.engine.generation import generate

    steps, seed = 3, 5
    gen = generate(flux, "a red house", steps=steps, cfg=1.0, seed=seed, width=W, height=H,
                   layers=["dit-out", "vit-block2-out"], capture_steps="all")
    want = pipeline(parts)("a red house", height=H, width=W, num_inference_steps=steps, guidance_scale=3.5,
                           generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=512)
    torch.testing.assert_close(gen.images, want.images.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    sched = pipeline(parts).scheduler
    mu = (sched.config.base_shift + (sched.config.max_shift - sched.config.base_shift) * (32 - 256) / (4096 - 256))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    v = gen.features.tensors["dit-out"]
    assert [r["step"] for r in gen.features.meta["rows"]] == [0, 1, 2] and gen.features.meta["guidance"] == 3.5
    assert all(r["tokens"] == TOKEN_RANGES for r in gen.features.meta["rows"])  # each row says where its tokens are
    for i in range(steps):
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v[i:i + 1]
    torch.testing.assert_close(gen.latents, x, atol=1e-5, rtol=1e-5)
    assert gen.features.tensors["vit-block2-out"].shape == (3, 16, 4, 8)


def test_the_nodes_extract_flux_as_the_library_does(flux, image, monkeypatch):
    """DFEncodePrompt -> DFAttachHooks -> DFExtractFeatures on a Flux DF_MODEL: the library's features (at a
    native side of 128 here: the node resizes to the native area, and Flux's 1024 costs seconds even when tiny)."""
    from diffusion_feature import NODE_CLASS_MAPPINGS as N
    from diffusion_feature.engine.model import FeatureModel

    monkeypatch.setattr(FeatureModel, "native_size", property(lambda self: 128))

    ids = ["vit-block0-out", "vit-block2-txt-in"]
    (cond,) = N["DFEncodePrompt"]().encode(flux, "a photo of a dog")
    (hooked,) = N["DFAttachHooks"]().attach(flux, "\n".join(ids), "none")
    (features,) = N["DFExtractFeatures"]().extract(hooked, image, cond, 300, 2, resize="keep-aspect", batch_size=1)
    want = extract(flux, image, "a photo of a dog", ids, t=300, seed=2, size=None)
    assert features.meta["guidance"] == 3.5 and features.meta["sigma"] == 0.3 and features.meta["width"] == 192
    for k in ids:
        torch.testing.assert_close(features.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)


@pytest.fixture()
def tiny_ditf_preset(monkeypatch):
    """The ditf preset on the tiny Flux: its first single block's input (Flux.1's is block 28, which it lacks)."""
    from diffusion_feature.layer_catalog import resolver

    real = resolver.preset_ids
    monkeypatch.setattr(resolver, "preset_ids",
                        lambda family, name: ["vit-block2-in"] if name == "ditf" else real(family, name))


@pytest.fixture()
def tiny_ditf(tiny_ditf_preset, parts):
    """The tiny Flux's parts with a copy of its transformer whose image stream carries two massive-activation
    channels (planted in the patch embedding's bias, so every image token has them in every block's residual)."""
    import copy

    planted = copy.deepcopy(parts["transformer"])
    with torch.no_grad():
        planted.x_embedder.bias[[3, 11]] += torch.tensor([3000.0, -1500.0])
    return {**parts, "transformer": planted}


def test_the_ditf_preset_extracts_ditfs_feature(tiny_ditf, flux, image, tmp_path, monkeypatch):
    """extract with the ditf preset: per image, apply_ditf of a plain capture of the block input and its
    modulation; other ids untouched; the companions dropped; the transform and the channels found in the metadata
    (and in saved files); feature_resize pools the transformed feature; an ensemble averages transformed draws;
    batches merge their channels; generation's capture transforms its rows; DFAttachHooks keeps the request,
    DFExtractFeatures extracts it."""
    from diffusion_feature import NODE_CLASS_MAPPINGS as N
    from diffusion_feature.engine.dit_transforms import apply_ditf
    from diffusion_feature.engine.extraction import extract_in_batches
    from diffusion_feature.engine.features_io import load_features, save_features
    from diffusion_feature.engine.model import FeatureModel

    model = feature_model(tiny_ditf)
    two = torch.cat([image, image.flip(2)])
    kw = dict(t=600, seed=4, vae_sample=False)
    got = extract(model, two, "a red house", "ditf, vit-block0-out", **kw)
    assert list(got.tensors) == ["vit-block2-in", "vit-block0-out"]
    ids = ["vit-block2-in", "vit-block0-out"]
    for i, img in enumerate((image, image.flip(2))):  # each image on its own: the transform is per sample
        hand = hand_run(tiny_ditf, img, "a red house", t=600, seed=4, ids=ids, modulations=True)
        want, found = apply_ditf(hand)
        assert found["vit-block2-in"].channels == (3, 11)
        torch.testing.assert_close(got.tensors["vit-block2-in"][i:i + 1], want["vit-block2-in"], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(got.tensors["vit-block0-out"][i:i + 1], hand["vit-block0-out"], atol=1e-6,
                                   rtol=1e-5)
    assert got.meta["transform"] == "ditf" and got.meta["massive_channels"] == {"vit-block2-in": [3, 11]}
    plain = extract(model, two, "a red house", ids, **kw)
    assert "transform" not in plain.meta
    assert not torch.allclose(plain.tensors["vit-block2-in"], got.tensors["vit-block2-in"], atol=1e-2)

    pooled = extract(model, two, "a red house", "ditf", feature_resize=2, **kw)
    assert pooled.tensors["vit-block2-in"].shape == (2, 16, 2, 4)
    torch.testing.assert_close(pooled.tensors["vit-block2-in"],
                               torch.nn.functional.avg_pool2d(got.tensors["vit-block2-in"], 2), atol=1e-5, rtol=1e-5)
    ens = extract(model, image, "a red house", "ditf", ensemble=2, **{**kw, "seed": 4})
    draws = [extract(model, image, "a red house", "ditf", **{**kw, "seed": s}).tensors["vit-block2-in"]
             for s in (4, 5)]
    torch.testing.assert_close(ens.tensors["vit-block2-in"], (draws[0] + draws[1]) / 2, atol=1e-5, rtol=1e-5)
    batched = extract_in_batches(model, two, "a red house", "ditf", batch_size=1, size=(H, W), **kw)
    assert batched.meta["massive_channels"] == {"vit-block2-in": [3, 11]}
    torch.testing.assert_close(batched.tensors["vit-block2-in"], got.tensors["vit-block2-in"], atol=1e-5, rtol=1e-5)

    (path, *_) = save_features(got, tmp_path, ["a", "b"])
    saved = load_features(path)
    assert saved.meta["transform"] == "ditf" and saved.meta["massive_channels"] == {"vit-block2-in": [3, 11]}

    # generation's capture: with no massive channel (the unplanted network) DiTF's feature is the block's norm-out
    from diffusion_feature.engine.generation import generate

    for net, channels in ((flux, []), (model, [3, 11])):
        gen = generate(net, "a red house", steps=2, cfg=1.0, seed=5, width=W, height=H,
                       layers="ditf, vit-block2-norm-out", capture_steps="all").features
        assert list(gen.tensors) == ["vit-block2-in", "vit-block2-norm-out"] and len(gen.meta["rows"]) == 2
        assert gen.meta["transform"] == "ditf" and gen.meta["massive_channels"] == {"vit-block2-in": channels}
        same = torch.allclose(gen.tensors["vit-block2-in"], gen.tensors["vit-block2-norm-out"], atol=1e-5, rtol=1e-4)
        assert same == (not channels)

    monkeypatch.setattr(FeatureModel, "native_size", property(lambda self: 128))
    (hooked,) = N["DFAttachHooks"]().attach(model, "vit-block0-out", "ditf")
    (cond,) = N["DFEncodePrompt"]().encode(model, "a red house")
    (features,) = N["DFExtractFeatures"]().extract(hooked, image, cond, 600, 4, resize="keep-aspect", batch_size=1)
    want = extract(model, image, "a red house", "ditf, vit-block0-out", t=600, seed=4, size=None)
    assert features.meta["massive_channels"] == want.meta["massive_channels"] == {"vit-block2-in": [3, 11]}
    for k in ids:
        torch.testing.assert_close(features.tensors[k], want.tensors[k], atol=1e-6, rtol=1e-5)

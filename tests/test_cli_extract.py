"""The CLI commands end to end on a tiny diffusers folder (extract, pca, generate, pnp) and on random weights
(random:FAMILY, the demo); its one-line errors; image inputs and the resize policy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from diffusion_feature.engine import cli
from diffusion_feature.engine.dataset import index
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.features_io import Features, load_features, save_features, size_meta
from diffusion_feature.engine.images import ImageInputError, open_image, target_size


@pytest.fixture(scope="module")
def model(tiny_sd15):
    return tiny_sd15


@pytest.fixture(scope="module")
def folder(sd15_folder):
    return sd15_folder


@pytest.fixture()
def images(tmp_path):
    g = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (w, h) in {"a": (96, 64), "b": (96, 64), "c": (64, 64)}.items():
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _main(*args) -> int:
    """The CLI in this process: its exit status (bad input exits 2 through SystemExit)."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


_cli = run_cli


def test_cli_extract_then_pca(tmp_path, folder, images, model):
    out = tmp_path / "features"
    ids = "up-level2-repeat1-vit-block0-cross-q,mid-repeat0-res-out"
    run = _cli("extract", "--model", folder, "--layers", ids, "--input", images, "--output", out, "--t", 50,
               "--seed", 3, "--prompt", "a photo", "--size", "96x64", "--batch-size", 2)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                     "df_index"]  # the run's index (tests/test_dataset_run.py)
    saved = load_features(out / "b.safetensors")
    assert saved.meta["t"] == 50 and saved.meta["seed"] == 3 and (saved.meta["width"], saved.meta["height"]) == (96, 64)
    assert "size" not in saved.meta  # --size is WxH: the file names its sides rather than holding an [H, W] pair
    want = extract(model, [images / "b.png"], "a photo", ids, t=50, seed=3, size=(64, 96))
    for k in want.tensors:
        torch.testing.assert_close(saved.tensors[k], want.tensors[k], atol=1e-5, rtol=1e-5)
    again = _cli("extract", "--model", folder, "--layers", ids, "--input", images, "--output", out)
    assert again.returncode == 2 and "never overwritten" in again.stderr and "Traceback" not in again.stderr
    png = tmp_path / "pca" / "b.png"
    pca = _cli("pca", "--features", out / "b.safetensors", "--layer", "up-level2-repeat1-vit-block0-cross-q",
               "--output", png, "--scale", 4)
    assert pca.returncode == 0, pca.stderr
    assert Image.open(png).size == (6 * 4, 4 * 4)  # up-level2 of a 4-level UNet on an 8x12 latent: 4x6
    default = tmp_path / "pca" / "b-full.png"
    assert _cli("pca", "--features", out / "b.safetensors", "--layer", "mid-repeat0-res-out", "--output",
                default).returncode == 0
    assert Image.open(default).size == (96, 64)  # by default, the size of the image the model saw
    joint = _cli("pca", "--features", out / "a.safetensors", out / "c.safetensors", "--layer", "mid-repeat0-res-out",
                 "--output", tmp_path / "joint", "--joint")
    assert joint.returncode == 0, joint.stderr
    assert len(list((tmp_path / "joint").glob("*.png"))) == 2


def test_cli_generate_pnp_lora_and_denoise_from(tmp_path, folder, images, model):
    from safetensors.torch import save_file

    from diffusion_feature.engine.generation import generate
    from diffusion_feature.engine.inversion import invert
    from diffusion_feature.engine.pnp import translate

    out = tmp_path / "gen"
    run = _cli("generate", "--model", folder, "--prompt", "a red house", "--output", out, "--steps", 3, "--size",
               "96x64", "--seed", 5, "--scheduler", "ddim", "--layers", "mid-repeat1-res-out", "--capture-steps",
               "all")
    assert run.returncode == 0, run.stderr
    # no --cfg on either side: the CLI takes the library's default for the model (StableDiffusionPipeline's 7.5)
    want = generate(model, "a red house", steps=3, seed=5, width=96, height=64, scheduler="ddim")
    got = torch.from_numpy(np.asarray(Image.open(out / "gen_000.png"))).float() / 255
    assert (got - want.images[0]).abs().max() <= 1 / 255 + 1e-6  # the same image, to 8-bit rounding
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        f"gen_step{s:03d}_cond_000.safetensors" for s in range(3)]
    assert load_features(out / "features" / "gen_step002_cond_000.safetensors").meta["step"] == 2
    pnp = _cli("pnp", "--model", folder, "--image", images / "a.png", "--prompts", "a cat", "a dog", "--output",
               tmp_path / "pnp", "--steps", 3, "--size", "96x64")
    assert pnp.returncode == 0, pnp.stderr
    names = sorted(p.name for p in (tmp_path / "pnp").iterdir())
    assert names == ["a_00_a_cat.png", "a_01_a_dog.png", "a_pnp.json", "a_reconstruction.png"]
    report = json.loads((tmp_path / "pnp" / "a_pnp.json").read_text())
    inv = invert(model, images / "a.png", "", 3, size="96x64")
    assert report["reconstruction_error"]["psnr"] == pytest.approx(inv.error["psnr"], rel=1e-4)
    want = translate(model, inv, ["a cat", "a dog"])
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "pnp" / "a_01_a_dog.png"))).float() / 255
    assert (got - want.images[1]).abs().max() <= 1 / 255 + 1e-6
    # a LoRA from the command line changes the features; denoise_from is passed through
    lora = tmp_path / "style.safetensors"
    q = model.denoiser.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.ones(1, q.in_features), f"{key}.lora_up.weight":
               torch.ones(q.out_features, 1)}, str(lora))
    args = ["--model", folder, "--layers", "up-level1-repeat1-res-out", "--input", images / "a.png", "--size", "96x64"]
    plain, styled, denoised = tmp_path / "plain", tmp_path / "styled", tmp_path / "denoised"
    assert _cli("extract", *args, "--output", plain).returncode == 0
    assert _cli("extract", *args, "--output", styled, "--lora", f"{lora}:0.5").returncode == 0
    assert _cli("extract", *args, "--output", denoised, "--denoise-from", 70, "--denoise-steps", 2).returncode == 0
    layer = "up-level1-repeat1-res-out"
    a, b, c = (load_features(d / "a.safetensors") for d in (plain, styled, denoised))
    assert not torch.allclose(a.tensors[layer], b.tensors[layer]) and not torch.allclose(a.tensors[layer],
                                                                                         c.tensors[layer])
    assert c.meta["denoise_from"] == 70 and c.meta["denoise_steps"] == 2
    # a colon inside the LoRA's path (C:\loras\... on Windows) stays in the path: only a number after the last
    # colon is a strength
    drive = tmp_path / "C:loras"
    drive.mkdir()
    (drive / "style.safetensors").write_bytes(lora.read_bytes())
    again = tmp_path / "styled-again"
    assert _cli("extract", *args, "--output", again, "--lora", f"{drive / 'style.safetensors'}:0.5").returncode == 0
    assert torch.equal(load_features(again / "a.safetensors").tensors[layer], b.tensors[layer])
    bad = _cli("pnp", "--model", folder, "--image", images / "a.png", "--prompts", "x", "--output", tmp_path / "p2",
               "--steps", 2, "--feature-threshold", 2)
    assert bad.returncode == 2 and "feature_threshold must be a fraction" in bad.stderr


def test_cli_errors_are_one_sentence(tmp_path, folder, images):
    cases = [
        (["--layers", "up-level9-repeat0-res-out"], "nearest valid ids"),
        (["--layers", "vit-block3-out"], "pixart-sigma"),
        (["--layers", "practical", "--t", "1000"], "t must be an integer training timestep"),
    ]
    for extra, message in cases:
        run = _cli("extract", "--model", folder, "--input", images, "--output", tmp_path / "o", *extra)
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr
    missing = _cli("extract", "--model", tmp_path / "nope.safetensors", "--layers", "practical", "--input", images,
                   "--output", tmp_path / "o")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_images = _cli("extract", "--model", folder, "--layers", "practical", "--input", tmp_path / "none" / "*.png",
                     "--output", tmp_path / "o")
    assert no_images.returncode == 2 and "no image files match" in no_images.stderr


def test_bad_images(tmp_path, model):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        open_image(fake)
    with pytest.raises(ImageInputError, match="does not exist"):
        open_image(tmp_path / "missing.png")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (100000, 1)).save(wide)
    with pytest.raises(ImageInputError, match="100000x1 pixels"):
        open_image(wide)
    with pytest.raises(ImageInputError, match="at least 1 pixel"):
        extract(model, [Image.new("RGB", (0, 0))], "", ["unet-out"])
    with pytest.raises(ImageInputError, match="cannot use a int"):
        extract(model, [3], "", ["unet-out"])
    with pytest.raises(ImageInputError, match="share a size"):
        extract(model, [Image.new("RGB", (96, 64)), Image.new("RGB", (64, 96))], "", ["unet-out"])


def test_keep_aspect_resize_policy():
    assert target_size(640, 480, 512) == (576, 448)  # area ~512^2, sides multiples of 64
    assert target_size(480, 640, 512) == (448, 576)
    assert target_size(1024, 1024, 512) == (512, 512)
    assert target_size(3000, 100, 512) == (2816, 64)  # very wide: never below 64
    assert target_size(640, 480, 512, "stretch") == (512, 512)
    with pytest.raises(ValueError, match="unknown resize mode"):
        target_size(64, 64, 512, "fit")


def test_center_crop_and_comfy_images(model):
    img = Image.new("RGB", (96, 64))
    img.paste((255, 0, 0), (0, 0, 16, 64))  # a red band on the left that the crop removes
    from diffusion_feature.engine.images import prepare, prepare_comfy
    cropped = prepare(img, 64, "center-crop")
    assert cropped.size == (64, 64) and cropped.getpixel((0, 0)) == (0, 0, 0)
    comfy = torch.rand(2, 64, 96, 3)
    comfy[:, :, :16] = torch.tensor([1.0, 0.0, 0.0])  # the same band in an IMAGE: cropped in floats
    assert torch.equal(prepare_comfy(comfy, 64, "center-crop"), comfy[:, :, 16:80].permute(0, 3, 1, 2) * 2 - 1)
    feats = extract(model, comfy, "", ["mid-repeat0-res-out"], size=(64, 96))
    assert feats.tensors["mid-repeat0-res-out"].shape == (2, 32, 1, 2)


def test_show_layers_of_a_loaded_model(model):
    shapes = model.show_layers((64, 96))
    assert shapes["mid-repeat0-res-out"] == [32, 1, 2]
    assert shapes["up-level3-repeat0-vit-block0-self-map"] == [2, 96, 96]
    assert next(model.denoiser.parameters()).device.type == "cpu"  # the model itself is untouched


def test_demo_sample_images_ship_with_the_package():
    from diffusion_feature.engine.commands import SAMPLES

    files = sorted(p.name for p in Path(SAMPLES).glob("*.jpg"))
    assert files == ["cat.jpg", "fruit.jpg", "house.jpg"]
    assert json.loads(json.dumps(files))


def test_every_command_runs_offline_on_random_weights(tmp_path, images, capsys, tiny_random_weights):
    """--model random:FAMILY: no checkpoint needed to try extract, generate and pnp; each run says loudly that its
    weights are random."""
    rand = ["--model", "random:sd15"]
    assert _main("extract", *rand, "--layers", "practical", "--input", images, "--output", tmp_path / "feats",
                 "--size", "96x64") == 0
    assert "RANDOM WEIGHTS of the real sd15 architecture" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "feats").glob("*.safetensors")) == ["a.safetensors", "b.safetensors",
                                                                                  "c.safetensors"]
    assert _main("generate", *rand, "--prompt", "a house", "--output", tmp_path / "gen", "--steps", 2, "--size", 64,
                 "--layers", "mid-repeat0-res-out", "--capture-steps", "last") == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    assert Image.open(tmp_path / "gen" / "gen_000.png").size == (64, 64)
    assert (tmp_path / "gen" / "features" / "gen_step001_cond_000.safetensors").is_file()
    assert _main("pnp", *rand, "--image", images / "a.png", "--prompts", "a cat", "--output", tmp_path / "pnp",
                 "--steps", 2, "--size", "96x64") == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    assert Image.open(tmp_path / "pnp" / "a_00_a_cat.png").size == (96, 64)
    assert tiny_random_weights == ["sd15", "sd15", "sd15"]
    assert _main("extract", "--model", "random:sd16", "--layers", "practical", "--input", images, "--output",
                 tmp_path / "x") == 2
    assert "unknown family 'sd16'; valid: random:sd15, random:sd21, random:sdxl" in _one_line_error(capsys)
    assert _main("extract", *rand, "--family", "sdxl", "--layers", "practical", "--input", images, "--output",
                 tmp_path / "x") == 2
    assert "'random:sd15' was given with family 'sdxl'" in _one_line_error(capsys)
    assert tiny_random_weights == ["sd15", "sd15", "sd15"] and not (tmp_path / "x").exists()


def test_demo_numbers_a_second_output_folder_from_one(tmp_path, capsys, tiny_random_weights):
    base = tmp_path / "demo_output"
    assert _main("demo", "--output", base) == 0 and _main("demo", "--output", base) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_output", "demo_output-1"]
    for folder in tmp_path.iterdir():
        assert len(list(folder.glob("*.safetensors"))) == 3 and len(list((folder / "pca").glob("*.png"))) == 12
        # the demo is a dataset run, the engine `extract` runs: its index records every image with its file
        done = {r["image"]: [o["path"] for o in r["outputs"]] for r in index.read_records(folder)
                if r["status"] == "done"}
        assert done == {f"{n}.jpg": [f"{n}.safetensors"] for n in ("cat", "fruit", "house")}
    err = capsys.readouterr().err
    assert err.count("RANDOM WEIGHTS of the real sd15 architecture") == 2
    assert err.count("reminder: these features come from random weights") == 2


def test_a_device_this_torch_cannot_use_is_a_one_line_error(tmp_path, images, folder, capsys, monkeypatch):
    """Not torch's assertion from deep inside the first .to(), after the weights were read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = ["extract", "--model", folder, "--layers", "unet-out", "--input", images, "--output", tmp_path / "o"]
    assert _main(*run, "--device", "cuda") == 2
    message = _one_line_error(capsys)
    assert "device 'cuda':" in message and "use device cpu, or install a CUDA build of torch" in message
    assert _main(*run, "--device", "gpu") == 2
    assert "device 'gpu' is not a torch device; valid: cpu, cuda, cuda:N, mps" in _one_line_error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _main(*run, "--device", "cuda:2") == 2
    assert "this machine has 2 CUDA device(s); valid: cuda, cuda:0..cuda:1" in _one_line_error(capsys)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_pca_refuses_attention_maps_and_points_to_their_views(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    self_map, spatial = "up-level1-repeat0-vit-block0-self-map", "up-level1-repeat1-res-out"
    feats = Features({self_map: torch.softmax(torch.randn(1, 2, 24, 24, generator=g), -1),
                      spatial: torch.randn(1, 4, 4, 6, generator=g)}, size_meta(32, 48))
    (path,) = save_features(feats, tmp_path, ["x"])
    assert _main("pca", "--features", path, "--layer", self_map, "--output", tmp_path / "map.png") == 2
    message = _one_line_error(capsys)
    assert "is an attention map (heads x queries x keys)" in message
    assert "self_attention_pca" in message and "DFAttentionMap" in message
    assert not (tmp_path / "map.png").exists()
    assert _main("pca", "--features", path, "--layer", spatial, "--output", tmp_path / "spatial.png") == 0
    assert Image.open(tmp_path / "spatial.png").size == (48, 32)  # the recorded width x height


def test_a_misspelt_preset_is_suggested_as_the_preset(tmp_path, images, capsys, tiny_random_weights, model):
    from diffusion_feature.layer_catalog import LayerIdError, resolve_layers, resolve_taps

    assert _main("extract", "--model", "random:sd15", "--layers", "practicle", "--input", images, "--output",
                 tmp_path / "o") == 2
    message = _one_line_error(capsys)
    assert "'practicle' is neither a layer id nor a preset of" in message
    assert "did you mean the preset 'practical'? (presets: practical, legacy, full)" in message
    assert "nearest valid ids" not in message
    with pytest.raises(LayerIdError, match=r"did you mean the preset 'legacy'\?"):
        resolve_layers("mid-repeat0-res-out, Legasy", "sd15")
    with pytest.raises(LayerIdError, match=r"did you mean the preset 'full'\?"):
        resolve_taps("ful", model.denoiser, family="sd15")
    with pytest.raises(LayerIdError, match="nearest valid ids: up-level1-repeat1-res-out"):  # an id's typo: ids
        resolve_layers("up-level1-repeat1-res-outt", "sd15")

"""Grammar, shipped catalogs, presets, the resolver's errors, and the `layers` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_pixart, tiny_sd15_unet
from diffusion_feature.layer_catalog import (FAMILIES, LayerIdError, LayerIdSyntaxError, build_catalog,
                                             enumerate_ids, family_ids, family_shapes, format_id, load_catalog,
                                             meta_denoiser, parse_id, parse_size, preset_ids, resolve_layers,
                                             resolve_taps)

# Flux: dit-in, dit-embed, dit-out, and per block (19 double + 38 single) 8 image + 8 text taps and two maps.
# SD3 (SD3.5 large, 38 joint blocks): the three ends, 18 per block for 37 blocks, and for the last ("context
# pre-only": no text attn-out, ffn-inner or out) 8 image + 5 text taps and two maps.
# Flux.2 dev: the three ends, and per block (8 double + 48 single) 8 image + 8 text taps and two maps, as Flux.1.
COUNTS = {"sd15": 197, "sd21": 197, "sdxl": 612, "playground-v2": 612, "pixart-sigma": 224, "flux": 3 + 57 * 18,
          "sd3": 3 + 37 * 18 + 15,
          # 60 double-stream blocks: 8 suffixes per stream, image and text, plus the two maps
          "qwen-image": 3 + 60 * 18, "flux2": 3 + 56 * 18,
          # dit-in/embed/out; 2 refiners of 17 ids (9 image incl. the self-map + 8 text); 30 layers of 18 ids
          "z-image": 3 + 2 * 17 + 30 * 18}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shipped_catalog_equals_regeneration(family):
    shipped = load_catalog(family)
    assert build_catalog(family) == shipped
    assert len(shipped["layers"]) == COUNTS[family]


def test_catalog_shapes_of_design_table():
    sd15 = family_shapes("sd15")
    assert sd15["down-level0-repeat0-res-out"] == [320, 64, 64]
    assert sd15["down-level3-repeat1-res-out"] == [1280, 8, 8]
    assert sd15["mid-repeat1-res-out"] == [1280, 8, 8]
    assert sd15["up-level0-repeat2-res-out"] == [1280, 8, 8]
    assert sd15["up-level0-upsampler-out"] == [1280, 16, 16]
    assert sd15["up-level2-repeat0-vit-out"] == [640, 32, 32]
    assert sd15["down-level0-repeat0-vit-block0-ffn-inner"] == [1280, 64, 64]
    assert sd15["down-level0-repeat0-vit-block0-self-map"] == [8, 4096, 4096]
    assert sd15["up-level1-repeat0-vit-block0-cross-map"] == [8, 256, 77]
    assert family_shapes("sd21")["up-level1-repeat0-vit-block0-cross-map"] == [20, 576, 77]  # 768 px; mirrors down-level2: 20 heads
    assert family_shapes("sd21")["down-level0-repeat0-vit-block0-self-map"] == [5, 9216, 9216]
    assert family_shapes("pixart-sigma")["vit-block5-cross-map"] == [16, 4096, 300]
    channels = lambda fam, preset: sum(family_shapes(fam)[i][0] for i in preset_ids(fam, preset))  # noqa: E731
    assert channels("sd15", "practical") == 3520 and channels("sdxl", "practical") == 3840  # the paper's totals


def test_full_size_meta_enumeration_equals_catalog_ids():
    for family in ("sd15", "pixart-sigma"):
        assert enumerate_ids(meta_denoiser(family)) == family_ids(family)


def test_every_id_round_trips_through_the_grammar():
    for family in FAMILIES:
        for layer_id in family_ids(family):
            assert format_id(parse_id(layer_id)) == layer_id


@pytest.mark.parametrize("bad", ["", "up-level1", "up-level1-repeat1-vit-block0-cross-k", "mid-level0-repeat0-res-out",
                                 "down-level0-upsampler-out", "unet-middle", "vit-block-out"])
def test_grammar_rejects_non_ids(bad):
    with pytest.raises(LayerIdSyntaxError):
        parse_id(bad)


def test_presets_and_mixed_specs(tmp_path):
    assert resolve_layers("practical", "sd15") == preset_ids("sd15", "practical")
    assert len(resolve_layers("full", "sdxl")) == 612
    mixed = resolve_layers("legacy, up-level1-repeat1-res-out\nup-level0-upsampler-out", "sd15")
    assert mixed == preset_ids("sd15", "legacy") + ["up-level1-repeat1-res-out"]  # order kept, no duplicates
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"up-level1-repeat1-vit-block0-cross-q": True, "up-level2-upsampler-out": False,
                                  "up-level2-repeat1-vit-block0-cross-map": True}))
    assert resolve_layers(str(config), "sd15") == ["up-level1-repeat1-vit-block0-cross-q",
                                                   "up-level2-repeat1-vit-block0-cross-map"]
    assert resolve_layers(["unet-out", {"unet-in": True}], "sd15") == ["unet-out", "unet-in"]


def test_unknown_id_names_family_and_nearest_ids():
    with pytest.raises(LayerIdError) as err:
        resolve_layers("up-level1-repeat1-vit-block0-cross-qq", "sd15")
    msg = str(err.value)
    assert "sd15" in msg and "up-level1-repeat1-vit-block0-cross-q" in msg
    with pytest.raises(LayerIdError) as err:  # sd15's level 1 has one transformer block
        resolve_layers("up-level1-repeat0-vit-block5-out", "sd15")
    assert "does not exist in sd15" in str(err.value) and "up-level1-repeat0-vit-block0-out" in str(err.value)


def test_id_of_another_family_says_so():
    with pytest.raises(LayerIdError, match=r"is a layer id of pixart-sigma, flux, sd3, qwen-image, flux2 and z-image, "
                                           r"not of sd15"):
        resolve_layers("vit-block3-out", "sd15")
    with pytest.raises(LayerIdError, match=r"is a layer id of z-image, not of flux"):  # refiners: Z-Image's only
        resolve_layers("vit-refiner1-txt-out", "flux")
    with pytest.raises(LayerIdError, match=r"sdxl and playground-v2, not of sd15"):
        resolve_layers("up-level0-repeat0-vit-block7-out", "sd15")


def test_bad_layer_files_and_specs(tmp_path):
    with pytest.raises(LayerIdError, match="does not exist"):
        resolve_layers(str(tmp_path / "missing.json"), "sd15")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LayerIdError, match="not valid JSON"):
        resolve_layers(str(broken), "sd15")
    with pytest.raises(LayerIdError, match="empty"):
        resolve_layers(" , ", "sd15")
    with pytest.raises(LayerIdError, match="cannot read layers from a int"):
        resolve_layers([3], "sd15")
    with pytest.raises(ValueError, match="unknown family 'sd4'"):
        resolve_layers("practical", "sd4")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_ids("sd15", "fastest")


def test_resolve_taps_checks_the_loaded_model():
    unet = tiny_sd15_unet()
    taps = resolve_taps("practical", unet, family="sd15")
    assert [t.module_path for t in taps] == [
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q", "up_blocks.1.resnets.2",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k"]
    with pytest.raises(LayerIdError, match="this sd15 model"):
        resolve_taps("down-level3-repeat0-vit-out", unet, family="sd15")  # level 3 has no transformer
    with pytest.raises(LayerIdError, match="PixArtTransformer2DModel"):
        resolve_taps("unet-out", tiny_pixart())


@pytest.mark.parametrize("size,want", [(512, (512, 512)), ("768x512", (512, 768)), ((64, 96), (64, 96))])
def test_parse_size(size, want):
    assert parse_size(size) == want


@pytest.mark.parametrize("size", [100, "0", "12x8", "axb", -64])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "diffusion_feature", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_layers_json_lists_612_sdxl_ids():
    out = _cli("layers", "--family", "sdxl", "--json")
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout)
    assert len(layers) == 612
    assert layers[0] == {"id": "unet-in", "shape": [4, 128, 128]}
    assert {tuple(layer) for layer in layers} == {("id", "shape")}


def test_cli_layers_text_and_size():
    from conftest import run_cli as _cli  # in this process: the test above runs the entry point for real
    out = _cli("layers", "--family", "sd15", "--size", "768x512")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines() if not line.startswith("#"))
    assert len(lines) == 197
    assert lines["unet-in"].strip() == "4 x 64 x 96"
    assert lines["up-level1-repeat0-vit-block0-cross-map"].strip() == "8 x 384 x 77"
    bad = _cli("layers", "--family", "sd15", "--size", "100")
    assert bad.returncode == 2 and "multiples of 8" in bad.stderr and "Traceback" not in bad.stderr


def test_id_a_shallow_checkpoint_of_the_family_lacks_says_so():
    """A two-level sd15 UNet (a pruned or test checkpoint) lacks the standard sd15's level 3: the error says the id
    is sd15's but this model's depth differs, never that the id belongs only to other families."""
    from diffusers import UNet2DConditionModel

    from diffusion_feature.layer_catalog import resolve_taps

    unet = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2, layers_per_block=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    with pytest.raises(LayerIdError) as err:
        resolve_taps("down-level3-repeat0-res-out", unet, "sd15")
    msg = str(err.value)
    assert "is a sd15 id that this sd15 model lacks" in msg and "another depth" in msg
    assert "down-level1-repeat0-res-out" in msg  # nearest ids are this model's own
    assert "not of" not in msg
    # `full` on a loaded model means every id of that model, not the standard family's (which it partly lacks)
    from diffusion_feature.layer_catalog.taps import enumerate_ids

    full = [t.id for t in resolve_taps("full", unet, "sd15")]
    assert full == enumerate_ids(unet) and "down-level1-repeat0-res-out" in full
    assert len(full) < len(resolve_layers("full", "sd15"))

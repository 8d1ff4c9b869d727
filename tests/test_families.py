"""The family table: each family is one entry with every fact the pack asks about it, so a family added to the
table is served everywhere without its name appearing in code."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusion_feature.layer_catalog import FAMILIES, UnknownFamilyError, get_family
from diffusion_feature.layer_catalog.families import (denoiser_from_config, family_of_checkpoint,
                                                      family_of_comfy_config, family_of_unet)


@pytest.fixture
def toy_xl(monkeypatch):
    """A family added to the table for one test: SDXL's facts under a new name, ComfyUI class, single-file mark
    and Plug-and-Play layer."""
    fam = dataclasses.replace(get_family("sdxl"), name="toy-xl", comfy_configs=("ToyXL",),
                              checkpoint_marks=(r"toy\.marker$",), pnp_feature_layers=("up-level0-repeat0-res-out",))
    monkeypatch.setitem(FAMILIES, fam.name, fam)
    return fam


def test_a_family_added_to_the_table_is_served_everywhere(toy_xl, sdxl):
    from diffusion_feature.engine.generation import _negative
    from diffusion_feature.engine.loading import default_tokenizers
    from diffusion_feature.engine.pnp import PnPError, default_feature_layers
    from diffusion_feature.engine.prompts import encode_prompt
    from diffusion_feature.native.names import unsupported_message

    toy = sdxl.clone(family="toy-xl")
    got, want = encode_prompt(toy, "a cat"), encode_prompt(sdxl, "a cat")  # two encoders, penultimate, pooled
    assert torch.equal(got.encoder_hidden_states, want.encoder_hidden_states)
    assert torch.equal(got.added_cond_kwargs["text_embeds"], want.added_cond_kwargs["text_embeds"])
    assert not _negative(toy, None, got).encoder_hidden_states.any()  # SDXL's zero negative
    assert [t.pad_token for t in default_tokenizers("toy-xl")] == ["<|endoftext|>", "!"]
    assert default_feature_layers("toy-xl") == ["up-level0-repeat0-res-out"]
    with pytest.raises(PnPError, match=r"runs on sd15, sd21, sdxl, playground-v2 and toy-xl UNets, not pixart"):
        default_feature_layers("pixart-sigma")
    assert family_of_comfy_config("ToyXL") == "toy-xl"
    assert family_of_checkpoint({"toy.marker": (1,)}) == "toy-xl"
    assert "playground-v2 and toy-xl" in unsupported_message("a thing")


def test_the_lookups_answer_from_the_table():
    assert [family_of_unet(768, False), family_of_unet(1024, False), family_of_unet(2048, True)] == \
        ["sd15", "sd21", "sdxl"]  # playground-v2 shares sdxl's UNet: never the answer
    assert family_of_unet(32, False) is None and family_of_unet(32, False, exact=False) == "sd15"
    assert family_of_unet(32, True, exact=False) == "sdxl" and family_of_unet(4096, False) is None
    assert [family_of_comfy_config(c) for c in ("SD15", "SD20", "SSD1B", "PixArtSigma", "SD3", "QwenImage", "Flux",
                                                "Flux2", "ZImage", "Lumina2", "SDXLRefiner")] == \
        ["sd15", "sd21", "sdxl", "pixart-sigma", "sd3", "qwen-image", "flux", "flux2", "z-image", None, None]
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (1,)}
    assert family_of_checkpoint({**unet, "cond_stage_model.transformer.x": (1,)}) == "sd15"
    assert family_of_checkpoint({**unet, "cond_stage_model.model.x": (1,)}) == "sd21"
    assert family_of_checkpoint({**unet, "model.diffusion_model.label_emb.0.0.weight": (1,)}) == "sdxl"
    assert family_of_checkpoint({"transformer.x_embedder.proj.weight": (1,)}) == "pixart-sigma"
    assert family_of_checkpoint({"model.diffusion_model.x_embedder.proj.weight": (1,),
                                 "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (1,)}) == "sd3"
    assert family_of_checkpoint({"x_embedder.proj.weight": (1,),  # a bare SD3 diffusion model has PixArt's mark too
                                 "joint_blocks.0.context_block.attn.qkv.weight": (1,)}) == "sd3"
    qwen = {"model.diffusion_model.txt_norm.weight": (1,), "model.diffusion_model.img_in.weight": (1,),
            "model.diffusion_model.transformer_blocks.0.img_mod.1.weight": (1,)}
    assert family_of_checkpoint(qwen) == "qwen-image"
    assert family_of_checkpoint({k[len("model.diffusion_model."):]: v for k, v in qwen.items()}) == "qwen-image"
    # a diffusers PixArt / Flux / SD3 transformer has transformer_blocks.0 but no txt_norm: not Qwen-Image
    assert family_of_checkpoint({"transformer_blocks.0.img_mod.1.weight": (1,)}) is None
    flux1 = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (1,)}
    assert family_of_checkpoint(flux1) == "flux"  # Flux.2 files have Flux.1's double blocks and a shared modulation:
    assert family_of_checkpoint({**flux1, "model.diffusion_model.double_stream_modulation_img.lin.weight": (1,)}) \
        == "flux2"  # the family with more marks, all matching, is the more specific one
    assert family_of_checkpoint({"double_blocks.0.img_attn.qkv.weight": (1,),
                                 "double_stream_modulation_img.lin.weight": (1,)}) == "flux2"  # a bare diffusion model
    refiners = {"context_refiner.0.attention.qkv.weight": (1,), "noise_refiner.0.attention.qkv.weight": (1,)}
    assert family_of_checkpoint({**refiners, "x_pad_token": (1,)}) == "z-image"  # ComfyUI's file
    assert family_of_checkpoint({"model.diffusion_model.x_pad_token": (1,),  # the original / diffusers names
                                 "model.diffusion_model.context_refiner.0.attention.to_q.weight": (1,)}) == "z-image"
    assert family_of_checkpoint(refiners) is None  # Lumina2: refiners, no pad tokens
    assert family_of_checkpoint({"cond_stage_model.model.x": (1,)}) is None  # a text encoder alone
    assert get_family("playground-v2").denoiser_family == "sdxl" and get_family("sd21").denoiser_family == "sd21"
    assert [get_family(f).controlnet for f in FAMILIES] == [True, True, True] + [False] * 7


def test_bad_family_names_and_denoiser_classes_get_the_valid_ones():
    for bad in ("wan", ["sd15"], None):
        with pytest.raises(UnknownFamilyError, match="valid families: sd15, sd21, sdxl, playground-v2, pixart-sigma, "
                                                     "flux, sd3, qwen-image, flux2, z-image"):
            get_family(bad)
    with pytest.raises(ValueError, match="'WanTransformer3DModel' is not one of the families' "
                                         r"\(Flux2Transformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, "
                                         r"QwenImageTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, "
                                         r"ZImageTransformer2DModel\)"):
        denoiser_from_config({"_class_name": "WanTransformer3DModel"})

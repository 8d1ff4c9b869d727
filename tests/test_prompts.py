"""Prompt encoding per family against the text encoders called by hand; long prompts; PixArt end to end."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_pixart_model
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.prompts import encode_prompt
from diffusion_feature.engine.tokenizers import clip_tokenizer

LONG = " ".join(["a red house with a green door"] * 15)  # 105 words: more than one 75-token window


def test_bundled_clip_tokenizer_matches_clip():
    assert clip_tokenizer()("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer("!").pad_token_id == 0 and clip_tokenizer().pad_token_id == 49407


def test_sd15_short_prompt_equals_the_standard_77_token_encoding(sd15):
    tok, enc = sd15.tokenizers[0], sd15.text_encoders[0]
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = enc(ids)[0]
    cond = encode_prompt(sd15, "a photo of a cat")
    assert cond.encoder_hidden_states.shape == (1, 77, 32)
    torch.testing.assert_close(cond.encoder_hidden_states, want)


def test_sd15_long_prompt_is_chunked_not_truncated(sd15):
    tok, enc = sd15.tokenizers[0], sd15.text_encoders[0]
    body = tok(LONG, add_special_tokens=False).input_ids
    assert 75 < len(body) <= 150
    windows = [[49406, *body[:75], 49407], [49406, *body[75:], 49407] + [49407] * (150 - len(body))]
    with torch.no_grad():
        want = torch.cat([enc(torch.tensor([w]))[0] for w in windows], dim=1)
    cond = encode_prompt(sd15, LONG)
    assert cond.encoder_hidden_states.shape == (1, 154, 32)
    torch.testing.assert_close(cond.encoder_hidden_states, want)


def test_prompts_of_one_batch_get_the_same_length(sd15):
    cond = encode_prompt(sd15, ["a cat", LONG])
    assert cond.encoder_hidden_states.shape == (2, 154, 32)
    short = encode_prompt(sd15, "a cat").encoder_hidden_states
    empty = encode_prompt(sd15, "").encoder_hidden_states
    torch.testing.assert_close(cond.encoder_hidden_states[:1], torch.cat([short, empty], dim=1))


def test_sdxl_uses_both_encoders_penultimate_layers_and_the_pooled_projection(sdxl):
    (tok1, tok2), (enc1, enc2) = sdxl.tokenizers, sdxl.text_encoders
    ids1 = tok1("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = tok2("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids2[0, -1] == 0 and ids1[0, -1] == 49407  # OpenCLIP pads with '!'
    with torch.no_grad():
        out1, out2 = enc1(ids1, output_hidden_states=True), enc2(ids2, output_hidden_states=True)
    cond = encode_prompt(sdxl, "a photo of a cat")
    want = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(cond.encoder_hidden_states, want)
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], out2.text_embeds)


def test_sdxl_long_prompt_keeps_both_encoders_and_the_pooled_embedding(sdxl):
    cond = encode_prompt(sdxl, LONG)
    assert cond.encoder_hidden_states.shape == (1, 154, 80)  # 32 + 48 channels, two windows
    assert cond.added_cond_kwargs["text_embeds"].shape == (1, 48)
    g = torch.Generator().manual_seed(0)
    from PIL import Image
    img = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    feats = extract(sdxl, [img], LONG, ["up-level0-repeat0-vit-block1-cross-map"], t=100, size=64)
    assert feats.tensors["up-level0-repeat0-vit-block1-cross-map"].shape == (1, 4, 4, 154)


def test_sdxl_time_ids_come_from_the_real_image_size(sdxl):
    from PIL import Image

    seen = {}
    hook = sdxl.denoiser.add_embedding.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        extract(sdxl, [Image.new("RGB", (96, 64))], "a cat", ["down-level0-repeat0-res-out"], t=10, size=(64, 96))
    finally:
        hook.remove()
    pooled = encode_prompt(sdxl, "a cat").added_cond_kwargs["text_embeds"]
    time_embeds = sdxl.denoiser.add_time_proj(torch.tensor([64.0, 96, 0, 0, 64, 96])).reshape(1, -1)
    torch.testing.assert_close(seen["x"], torch.cat([pooled, time_embeds], dim=-1))


def test_bad_prompts(sd15):
    with pytest.raises(ValueError, match="prompt must be a string"):
        encode_prompt(sd15, [1, 2])
    with pytest.raises(ValueError, match="prompt must be a string"):
        encode_prompt(sd15, [])


def test_pixart_t5_mask_and_batch_of_two():
    model = tiny_pixart_model()
    cond = encode_prompt(model, ["a photo of a cat", "the red house"])
    assert cond.encoder_hidden_states.shape == (2, 300, 12)
    assert cond.encoder_attention_mask.tolist()[0][:7] == [1, 1, 1, 1, 1, 1, 0]  # 5 words + </s>, then padding
    assert int(cond.encoder_attention_mask[1].sum()) == 4
    ids = torch.tensor([[3, 6, 7, 3, 4, 1] + [0] * 294])
    with torch.no_grad():
        want = model.text_encoders[0](ids, attention_mask=(ids != 0).long())[0]
    torch.testing.assert_close(cond.encoder_hidden_states[:1], want)
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(64, 96, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    feats = extract(model, imgs, ["a photo of a cat", "the red house"],
                    ["vit-block0-out", "vit-block2-cross-map"], t=500, size=(64, 96))
    assert feats.tensors["vit-block0-out"].shape == (2, 16, 4, 6)
    maps = feats.tensors["vit-block2-cross-map"]
    assert maps.shape == (2, 2, 24, 300)
    assert float(maps[0, :, :, 6:].abs().max()) == 0.0  # masked (padding) tokens get no attention
    assert float(maps[1, :, :, 4:].abs().max()) == 0.0
    long = encode_prompt(model, " ".join(["a cat"] * 200))  # 400 words: two T5 windows
    assert long.encoder_hidden_states.shape == (1, 600, 12)

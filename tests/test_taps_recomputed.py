"""Every tap kind equals an independent computation of the same tensor.

The test records module inputs with hooks of its own, recomputes each tap from them by hand (F.conv2d, F.linear,
an explicit softmax...) and compares with what FeatureCapture captured, for every id of three tiny models, on a
square and a non-square latent.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import InputRecorder, inputs_for, tiny_pixart, tiny_sd15_unet, tiny_sdxl_unet
from diffusion_feature.layer_catalog import FeatureCapture, enumerate_ids, parse_id, resolve_taps

ATOL, RTOL = 1e-5, 1e-4


def _arg(call, index, name):
    args, kwargs = call
    return args[index] if len(args) > index else kwargs.get(name)


def _tokens_to_grid(x, h, w):
    b, n, c = x.shape
    assert n == h * w
    return x.permute(0, 2, 1).reshape(b, c, h, w)


def _resnet_by_hand(resnet, x, temb):
    """ResnetBlock2D (no up/down sampling, default time-embedding norm): (increment, out)."""
    h = F.silu(F.group_norm(x, resnet.norm1.num_groups, resnet.norm1.weight, resnet.norm1.bias, resnet.norm1.eps))
    h = F.conv2d(h, resnet.conv1.weight, resnet.conv1.bias, padding=1)
    h = h + F.linear(F.silu(temb), resnet.time_emb_proj.weight, resnet.time_emb_proj.bias)[:, :, None, None]
    h = F.silu(F.group_norm(h, resnet.norm2.num_groups, resnet.norm2.weight, resnet.norm2.bias, resnet.norm2.eps))
    increment = F.conv2d(h, resnet.conv2.weight, resnet.conv2.bias, padding=1)
    skip = x if resnet.conv_shortcut is None else F.conv2d(x, resnet.conv_shortcut.weight, resnet.conv_shortcut.bias)
    return increment, (skip + increment) / resnet.output_scale_factor


def _attention_probs(attn, hidden, context):
    """softmax(q k^T / sqrt(d)) per head, (B, heads, Nq, Nk), from the attention module's inputs."""
    q = F.linear(hidden, attn.to_q.weight, attn.to_q.bias)
    k = F.linear(context, attn.to_k.weight, attn.to_k.bias)
    b, nq, inner = q.shape
    d = inner // attn.heads
    q = q.reshape(b, nq, attn.heads, d).transpose(1, 2)
    k = k.reshape(b, k.shape[1], attn.heads, d).transpose(1, 2)
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / d**0.5, dim=-1)


def _ffn_inner_by_hand(ff, x):
    act = ff.net[0]
    y = F.linear(x, act.proj.weight, act.proj.bias)
    if type(act).__name__ == "GEGLU":
        a, gate = y.chunk(2, dim=-1)
        return a * F.gelu(gate)
    return F.gelu(y, approximate=act.approximate)


def _expected(model, lid, path_of, rec, output, kwargs):
    """The value a tap must have, computed from recorded inputs without the module's own forward."""
    modules = dict(model.named_modules())
    sample = kwargs.get("sample", kwargs.get("hidden_states"))
    if lid.part == "unet":
        if lid.suffix == "in":
            return sample
        if lid.suffix == "after-conv-in":
            return F.conv2d(sample, model.conv_in.weight, model.conv_in.bias, padding=1)
        return output
    if lid.part == "res":
        resnet_path = path_of.replace(".conv2", "")
        call = rec.inputs[resnet_path]
        inc, out = _resnet_by_hand(modules[resnet_path], _arg(call, 0, "input_tensor"), _arg(call, 1, "temb"))
        return inc if lid.suffix == "increment" else out
    if lid.part == "sampler":
        mod, x = modules[path_of], _arg(rec.inputs[path_of], 0, "hidden_states")
        if lid.suffix == "downsampler":
            return F.conv2d(x, mod.conv.weight, mod.conv.bias, stride=2, padding=1)
        size = _arg(rec.inputs[path_of], 1, "output_size")
        up = F.interpolate(x, size=size, mode="nearest") if size is not None else F.interpolate(x, scale_factor=2.0)
        return F.conv2d(up, mod.conv.weight, mod.conv.bias, padding=1)

    # transformer taps
    if lid.stage is None:  # PixArt
        transformer_path, transformer = "", model
        h, w = (s // model.config.patch_size for s in sample.shape[-2:])
    else:
        transformer_path = path_of.split(".transformer_blocks.")[0]
        transformer = modules[transformer_path]
        h, w = _arg(rec.inputs[transformer_path], 0, "hidden_states").shape[-2:]
    prefix = f"{transformer_path}." if transformer_path else ""
    if lid.part == "vit":
        x = _arg(rec.inputs[transformer_path], 0, "hidden_states")
        inner = _arg(rec.inputs[f"{prefix}proj_out"], 0, "input")
        if inner.ndim == 3:
            projected = _tokens_to_grid(F.linear(inner, transformer.proj_out.weight, transformer.proj_out.bias), h, w)
        else:
            projected = F.conv2d(inner, transformer.proj_out.weight, transformer.proj_out.bias)
        return projected + x
    block_path = f"{prefix}transformer_blocks.{lid.block}"
    block = modules[block_path]
    if lid.suffix == "out":
        following = f"{prefix}transformer_blocks.{lid.block + 1}"
        if following not in modules:
            following = f"{prefix}proj_out" if lid.stage is not None else "norm_out"
        nxt = _arg(rec.inputs[following], 0, "hidden_states" if "blocks" in following else "input")
        return nxt if nxt.ndim == 4 else _tokens_to_grid(nxt, h, w)
    if lid.suffix == "ffn-inner":
        return _tokens_to_grid(_ffn_inner_by_hand(block.ff, _arg(rec.inputs[f"{block_path}.ff"], 0, "hidden_states")),
                               h, w)
    attn_name = "attn1" if lid.suffix.startswith("self") else "attn2"
    attn = getattr(block, attn_name)
    call = rec.inputs[f"{block_path}.{attn_name}"]
    hidden = _arg(call, 0, "hidden_states")
    context = _arg(call, 1, "encoder_hidden_states")
    context = hidden if context is None else context
    what = lid.suffix.split("-")[1]
    if what == "map":
        return _attention_probs(attn, hidden, context)
    proj = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v}[what]
    return _tokens_to_grid(F.linear(hidden if what == "q" else context, proj.weight, proj.bias), h, w)


@pytest.mark.parametrize("make", [tiny_sd15_unet, tiny_sdxl_unet, tiny_pixart], ids=["sd15", "sdxl", "pixart"])
@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 12)], ids=["square", "non-square"])
def test_every_tap_equals_independent_recomputation(make, latent_hw):
    model = make()
    ids = enumerate_ids(model)
    taps = resolve_taps(ids, model)
    kwargs = inputs_for(model, latent_hw, batch=2, tokens=5)
    recorded = [n for n, _ in model.named_modules()]
    rec = InputRecorder(model, recorded)
    try:
        with torch.no_grad(), FeatureCapture(model, taps) as cap:
            output = cap.run(**kwargs)[0]
    finally:
        rec.close()
    assert list(cap.features) == ids
    kinds_seen = set()
    for tap in taps:
        lid = parse_id(tap.id)
        want = _expected(model, lid, tap.module_path, rec, output, kwargs)
        got = cap.features[tap.id]
        assert got.shape == want.shape, tap.id
        torch.testing.assert_close(got, want.to(got.dtype), atol=ATOL, rtol=RTOL, msg=lambda m: f"{tap.id}: {m}")
        kinds_seen.add(tap.kind)
    pixart = make is tiny_pixart
    assert kinds_seen == ({"tokens", "map"} if pixart else {"input", "spatial", "tokens", "map"})


def test_self_q_is_to_q_of_layer_norm_of_block_input(sd15_unet):
    """The issue's own formula, with the LayerNorm computed by hand: self-q == to_q(norm1(x))."""
    path = "down_blocks.1.attentions.0.transformer_blocks.0"
    block = dict(sd15_unet.named_modules())[path]
    kwargs = inputs_for(sd15_unet, (8, 12))
    rec = InputRecorder(sd15_unet, [path, "down_blocks.1.attentions.0"])
    try:
        with torch.no_grad(), FeatureCapture(sd15_unet, resolve_taps("down-level1-repeat0-vit-block0-self-q",
                                                                     sd15_unet)) as cap:
            cap.run(**kwargs)
    finally:
        rec.close()
    x = _arg(rec.inputs[path], 0, "hidden_states")
    h, w = _arg(rec.inputs["down_blocks.1.attentions.0"], 0, "hidden_states").shape[-2:]
    assert (h, w) == (4, 6)
    normed = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    want = _tokens_to_grid(F.linear(normed, block.attn1.to_q.weight), h, w)
    torch.testing.assert_close(cap.features["down-level1-repeat0-vit-block0-self-q"], want, atol=ATOL, rtol=RTOL)


def test_pixart_cross_map_honours_the_text_padding_mask(pixart):
    """PixArt's T5 padding is masked out of its cross-attention: the map, rebuilt from the module's q and k, adds
    the same bias, so padding keys get no probability and the rest is softmax over the real tokens only."""
    lid = "vit-block1-cross-map"
    kwargs = inputs_for(pixart, (8, 8), batch=2, tokens=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kwargs["encoder_attention_mask"] = mask
    path = "transformer_blocks.1.attn2"
    rec = InputRecorder(pixart, [path])
    try:
        with torch.no_grad(), FeatureCapture(pixart, resolve_taps(lid, pixart)) as cap:
            cap.run(**kwargs)
    finally:
        rec.close()
    got = cap.features[lid]
    call = rec.inputs[path]
    attn = dict(pixart.named_modules())[path]
    q = F.linear(_arg(call, 0, "hidden_states"), attn.to_q.weight, attn.to_q.bias)
    k = F.linear(_arg(call, 1, "encoder_hidden_states"), attn.to_k.weight, attn.to_k.bias)
    d = q.shape[-1] // attn.heads
    q, k = (x.reshape(2, x.shape[1], attn.heads, d).transpose(1, 2) for x in (q, k))
    bias = (1 - mask.float()) * -10000.0  # diffusers' own reading of a 0/1 mask
    want = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + bias[:, None, None, :], dim=-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got[0, ..., 3:].max() < 1e-6 and got[1, ..., 3:].min() > 0  # image 0's padding gets nothing

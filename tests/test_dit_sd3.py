"""The sd3 family's taps (SD3 / SD3.5 MMDiT) on both backends, in-process on tiny models.

diffusers: every id of a tiny SD3Transformer2DModel equals a recomputation of the joint blocks written here from
the module weights (patch and position embedding, AdaLN modulation, QK-norm, joint softmax over [text, image],
gates, MLPs, the last block's pre-only text stream, SD3.5 medium's second image attention), on a non-square latent.
The maps also satisfy the attention-output identity (cross-map @ text v + self-map @ image v, through the output
projection, is attn-out) and their rows sum to 1.
ComfyUI v0.3.64: its MMDiT, built from the config ComfyUI detects in the diffusers weights converted by ComfyUI's
own conversion, gives every id equal to diffusers' within 1e-5 relative (float32), maps included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import native_comfy as nc
from diffusion_feature.layer_catalog import (FeatureCapture, LayerIdSyntaxError, enumerate_ids, format_id, parse_id,
                                             residue, taps_of)
from diffusion_feature.layer_catalog.families import denoiser_from_config, get_family

LATENT = (8, 12)  # non-square: a 4 x 6 token grid, which sqrt(N) could not give
TOKENS = 5
# Tiny twins ComfyUI can build: its MMDiT has 64-channel heads, depth heads and 64 * depth channels.
VARIANTS = {"sd3.5": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),  # SD3.5 medium's kind of block 0
            "sd3": dict(qk_norm=None, dual_attention_layers=())}


def tiny_sd3(variant: str, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                                  attention_head_dim=64, num_attention_heads=3, joint_attention_dim=32,
                                  caption_projection_dim=192, pooled_projection_dim=24, pos_embed_max_size=16,
                                  **VARIANTS[variant]).eval()
    with torch.no_grad():  # no weight at its trivial initial value (norm scales of 1, zero biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, *LATENT, generator=g), torch.randn(batch, TOKENS, 32, generator=g),
            torch.randn(batch, 24, generator=g), torch.full((batch,), 421.0))


def _capture(model, ids, *args, **kwargs):
    """One forward of `model` with every id of `ids` captured; no hook is left behind."""
    with torch.no_grad(), FeatureCapture(model, taps_of(model, ids)) as cap:
        cap.run(*args, **kwargs)
    assert residue(model) == {"forward_hooks": 0, "forward_pre_hooks": 0}
    return cap.features


def _diffusers_features(model, ids):
    x, ctx, pooled, t = _inputs()
    return _capture(model, ids, hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)


# ---- an independent forward of diffusers' SD3 from its weights ---------------------------------------------------
def _lin(x, linear):
    return F.linear(x, linear.weight, linear.bias)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _heads(x, n):
    b, tokens, c = x.shape
    return x.reshape(b, tokens, n, c // n).transpose(1, 2)


def _merge(x):
    return x.transpose(1, 2).flatten(2)


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _qkv(attn, x, n, to=("to_q", "to_k", "to_v"), norms=("norm_q", "norm_k")):
    q, k, v = (_heads(_lin(x, getattr(attn, name)), n) for name in to)
    if getattr(attn, norms[0]) is not None:
        q, k = _rms(q, getattr(attn, norms[0])), _rms(k, getattr(attn, norms[1]))
    return q, k, v


def _softmax(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def reference(model, x, ctx, pooled, t) -> dict:
    """Every id's tensor, as (B, N, C) image tokens, (B, T, C) text tokens, (B, heads, N, keys) maps, (B, C, H, W)
    ends; each block recomputed from its weights (the time/pooled-text embedding is the model's own module)."""
    cfg = model.config
    p, n, m = cfg.patch_size, cfg.num_attention_heads, cfg.pos_embed_max_size
    b, _, height, width = x.shape
    h, w = height // p, width // p
    img = F.conv2d(x, model.pos_embed.proj.weight, model.pos_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    top, left = (m - h) // 2, (m - w) // 2  # the centre crop of the max-size position embedding
    img = img + model.pos_embed.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)
    cond = F.silu(model.time_text_embed(t, pooled))
    txt = _lin(ctx, model.context_embedder)
    T = txt.shape[1]
    r = {"dit-in": x, "dit-embed": img}
    for i, block in enumerate(model.transformer_blocks):
        attn, pre = block.attn, f"vit-block{i}-"
        r[pre + "in"], r[pre + "txt-in"] = img, txt
        mods = _lin(cond, block.norm1.linear)[:, None].chunk(9 if block.use_dual_attention else 6, dim=-1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = _ln(img)
        r[pre + "norm-out"] = img_n = normed * (1 + scale) + shift
        if block.context_pre_only:  # AdaLayerNormContinuous: scale, then shift
            c_scale, c_shift = _lin(cond, block.norm1_context.linear)[:, None].chunk(2, dim=-1)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
                _lin(cond, block.norm1_context.linear)[:, None].chunk(6, dim=-1)
        r[pre + "txt-norm-out"] = txt_n = _ln(txt) * (1 + c_scale) + c_shift
        q, k, v = _qkv(attn, img_n, n)
        tq, tk, tv = _qkv(attn, txt_n, n, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
        for name, value in (("q", q), ("k", k), ("v", v), ("txt-q", tq), ("txt-k", tk), ("txt-v", tv)):
            r[pre + name] = _merge(value)
        probs = _softmax(torch.cat([tq, q], 2), torch.cat([tk, k], 2))
        r[pre + "cross-map"], r[pre + "self-map"] = probs[:, :, T:, :T], probs[:, :, T:, T:]
        out = _merge(probs @ torch.cat([tv, v], 2))
        r[pre + "attn-out"] = attn_out = _lin(out[:, T:], attn.to_out[0])
        new = img + gate * attn_out
        if block.use_dual_attention:  # a second, image-only attention on a second modulation of the block input
            shift2, scale2, gate2 = mods[6:]
            r[pre + "attn2-norm-out"] = normed * (1 + scale2) + shift2
            q2, k2, v2 = _qkv(block.attn2, r[pre + "attn2-norm-out"], n)
            r[pre + "attn2-q"], r[pre + "attn2-k"], r[pre + "attn2-v"] = _merge(q2), _merge(k2), _merge(v2)
            r[pre + "attn2-self-map"] = probs2 = _softmax(q2, k2)
            r[pre + "attn2-attn-out"] = _lin(_merge(probs2 @ v2), block.attn2.to_out[0])
            new = new + gate2 * r[pre + "attn2-attn-out"]
        r[pre + "ffn-inner"] = inner = F.gelu(_lin(_ln(new) * (1 + scale_mlp) + shift_mlp, block.ff.net[0].proj),
                                              approximate="tanh")
        r[pre + "out"] = img = new + gate_mlp * _lin(inner, block.ff.net[2])
        if not block.context_pre_only:
            r[pre + "txt-attn-out"] = txt_out = _lin(out[:, :T], attn.to_add_out)
            txt = txt + c_gate * txt_out
            r[pre + "txt-ffn-inner"] = inner = F.gelu(
                _lin(_ln(txt) * (1 + c_scale_mlp) + c_shift_mlp, block.ff_context.net[0].proj), approximate="tanh")
            r[pre + "txt-out"] = txt = txt + c_gate_mlp * _lin(inner, block.ff_context.net[2])
    scale, shift = _lin(cond, model.norm_out.linear)[:, None].chunk(2, dim=-1)
    y = _lin(_ln(img) * (1 + scale) + shift, model.proj_out)
    c = cfg.out_channels
    r["dit-out"] = y.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
    return r


def _as_captured(layer_id: str, x: torch.Tensor, grid) -> torch.Tensor:
    """A reference tensor in the layout the capture stores: image tokens on the grid, text tokens channel-first."""
    if layer_id.startswith("dit-") and layer_id != "dit-embed" or layer_id.endswith("-map"):
        return x
    if "-txt-" in layer_id:
        return x.transpose(1, 2)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def _close(a, b, what, rel=1e-5):
    assert a.shape == b.shape, (what, tuple(a.shape), tuple(b.shape))
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= rel, (what, err)


# ---- ids ------------------------------------------------------------------------------------------------------
def _expected_ids(blocks: int, dual=()) -> list[str]:
    ids = ["dit-in", "dit-embed"]
    for b in range(blocks):
        last = b == blocks - 1
        for s in ("in", "norm-out", "q", "k", "v", "cross-map", "self-map", "attn-out", "ffn-inner", "out"):
            ids.append(f"vit-block{b}-{s}")
            if not s.endswith("-map") and not (last and s in ("attn-out", "ffn-inner", "out")):
                ids.append(f"vit-block{b}-txt-{s}")
            if s == "attn-out" and b in dual:
                ids += [f"vit-block{b}-attn2-{t}" for t in ("norm-out", "q", "k", "v", "self-map", "attn-out")]
    return ids + ["dit-out"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ids_follow_the_loaded_blocks(variant):
    """Ids come from the blocks loaded: the last block's text stream only feeds the last attention (no txt
    attn-out / ffn-inner / out); a block with SD3.5 medium's second attention has its attn2- ids."""
    ids = enumerate_ids(tiny_sd3(variant))
    assert ids == _expected_ids(3, VARIANTS[variant]["dual_attention_layers"])
    assert all(format_id(parse_id(i)) == i for i in ids)
    assert [parse_id(i).is_map for i in ids].count(True) == 6 + len(VARIANTS[variant]["dual_attention_layers"])
    with pytest.raises(LayerIdSyntaxError):  # the second attention is image-only: no text-stream ids
        parse_id("vit-block0-txt-attn2-q")


@pytest.mark.parametrize("config", [
    # SD3 medium and SD3.5 medium (public transformer configs): 24 blocks, each its own ids
    dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
         qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))])
def test_other_sd3_depths_get_their_own_ids(config):
    base = get_family("sd3").denoiser_config()
    model = denoiser_from_config({**base, "qk_norm": None, **config}, "meta")
    assert enumerate_ids(model) == _expected_ids(24, config.get("dual_attention_layers", ()))


# ---- diffusers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_id_equals_a_recomputation_from_the_weights(variant):
    model = tiny_sd3(variant)
    ids = enumerate_ids(model)
    features = _diffusers_features(model, ids)
    with torch.no_grad():
        ref = reference(model, *_inputs())
    grid = (LATENT[0] // 2, LATENT[1] // 2)
    assert list(features) == ids and set(ref) == set(ids)
    assert features["vit-block1-v"].shape == (2, 192, *grid) and features["vit-block1-txt-v"].shape == (2, 192, TOKENS)
    assert features["vit-block2-cross-map"].shape == (2, 3, 24, TOKENS)
    for i in ids:
        _close(features[i], _as_captured(i, ref[i], grid), i)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_maps_give_the_attention_output_and_rows_sum_to_one(variant):
    model = tiny_sd3(variant)
    ids = enumerate_ids(model)
    f = _diffusers_features(model, ids)

    def heads(x):  # (B, C, h, w) or (B, C, T) -> (B, heads, N, d)
        return _heads(x.flatten(2).transpose(1, 2), 3)

    for b in range(3):
        cross, self_ = f[f"vit-block{b}-cross-map"], f[f"vit-block{b}-self-map"]
        assert torch.allclose(cross.sum(-1) + self_.sum(-1), torch.ones(()), atol=1e-6)
        out = _merge(cross @ heads(f[f"vit-block{b}-txt-v"]) + self_ @ heads(f[f"vit-block{b}-v"]))
        with torch.no_grad():
            out = model.transformer_blocks[b].attn.to_out[0](out)
        _close(out, f[f"vit-block{b}-attn-out"].flatten(2).transpose(1, 2), f"block {b}")
    for b in VARIANTS[variant]["dual_attention_layers"]:  # the second attention's map over the image keys alone
        probs = f[f"vit-block{b}-attn2-self-map"]
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
        with torch.no_grad():
            out = model.transformer_blocks[b].attn2.to_out[0](_merge(probs @ heads(f[f"vit-block{b}-attn2-v"])))
        _close(out, f[f"vit-block{b}-attn2-attn-out"].flatten(2).transpose(1, 2), f"block {b} attn2")


# ---- ComfyUI's MMDiT --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_new():
    yield nc.use_comfy("0.3.64")
    nc.release()


def comfy_mmdit(ns, model):
    """ComfyUI's SD3 network with the diffusers model's weights: converted by ComfyUI's own conversion of
    diffusers MMDiT weights (q/k/v into the fused qkv, scale/shift swapped), built from the config ComfyUI
    detects in them."""
    detection = nc.comfy_module("comfy.model_detection")
    mmdit = nc.comfy_module("comfy.ldm.modules.diffusionmodules.mmdit")
    # copies: the conversion edits the tensors it is given in place (the scale/shift swaps)
    state = detection.convert_diffusers_mmdit({k: v.clone() for k, v in model.state_dict().items()}, "")
    config = detection.detect_unet_config(state, "")
    net = mmdit.OpenAISignatureMMDITWrapper(**config, dtype=torch.float32, operations=ns.ops.disable_weight_init)
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_comfy_mmdit_every_id_equals_diffusers(comfy_new, variant):
    model = tiny_sd3(variant)
    net = comfy_mmdit(comfy_new, model)
    ids = enumerate_ids(model)
    assert enumerate_ids(net) == ids
    ref = _diffusers_features(model, ids)
    x, ctx, pooled, t = _inputs()
    features = _capture(net, ids, x, t, context=ctx, y=pooled)
    assert list(features) == ids
    for i in ids:
        _close(features[i], ref[i], i)

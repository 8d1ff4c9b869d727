"""The z-image family's taps (Z-Image's single-stream DiT with its refiners), in-process on tiny models.

diffusers: every id of a tiny ZImageTransformer2DModel equals a forward written here from the module weights (patch
embedding, pad tokens, the three-axis rotary embedding computed here from its angles, modulation, QK-norm, the
refiners' one-stream attention, the joint softmax over the padded [image, text] sequence, gates and post-norms,
SwiGLU, final layer), on a non-square latent whose image tokens and caption both need padding, so every span is
checked to exclude the pad tokens. Without padding the maps satisfy the attention-output identity and sum to 1.
ComfyUI: v0.3.64's NextDiT has none of Z-Image's options (pad tokens, its modulation and time widths, rope theta),
so it cannot build a Z-Image-shaped network and no native-vs-diffusers comparison is possible there; the native
layout is checked on what v0.3.64 can build, a Lumina2-shaped NextDiT (same module tree, [text, image] order, no
padding): every id equals the same hand-written forward with Lumina2's settings.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import native_comfy as nc
from diffusion_feature.layer_catalog import LayerIdSyntaxError, enumerate_ids, format_id, parse_id, residue
from diffusion_feature.layer_catalog.families import get_family
from test_dit_sd3 import _as_captured, _capture, _close, _lin, _merge  # the same checks as sd3's

HEADS, DIM, CAP = 2, 64, 32
AXES = (8, 12, 12)  # head width 32 split over (caption position, row, column)
PADDED = dict(latent=(8, 12), tokens=7)  # a 4 x 6 grid (24 tokens) and 7 caption tokens: both padded to 32
UNPADDED = dict(latent=(8, 16), tokens=32)  # 4 x 8 = 32 image tokens, 32 caption tokens: no pad token anywhere
# How the two networks differ where the reference below must know it.
ZIMAGE = dict(image_first=True, pad=32, cap_start=1, silu_mod=False, sign=1.0)
LUMINA2 = dict(image_first=False, pad=1, cap_start=0, silu_mod=True, sign=-1.0)


def _perturb(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():  # no weight at a trivial value (unit norm scales, zero pad tokens, uninitialised ops)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tiny_z_image(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    return _perturb(ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=DIM,
                                             n_layers=2, n_refiner_layers=2, n_heads=HEADS, n_kv_heads=HEADS,
                                             cap_feat_dim=CAP, axes_dims=list(AXES), axes_lens=[256, 64, 64]), seed)


def _inputs(case: dict, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, *case["latent"], generator=g), torch.randn(batch, case["tokens"], CAP, generator=g),
            torch.tensor([0.3, 0.8][:batch]))


def _diffusers_features(model, ids, case):
    x, caps, t = _inputs(case)
    return _capture(model, ids, x=list(x.unsqueeze(2)), t=t, cap_feats=list(caps))


# ---- an independent forward from the weights ------------------------------------------------------------------
def _rms(x, norm):
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def _heads(x):
    b, n, c = x.shape
    return x.reshape(b, n, HEADS, c // HEADS).transpose(1, 2)


def _rotate(x, angles):
    """Each pair of channels (x0, x1) of every head turned by its token's angle."""
    cos, sin = angles.cos()[:, None].float(), angles.sin()[:, None].float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


def _angles(positions, theta):
    """(B, N, d / 2) rotary angles of (B, N, 3) positions, axis by axis."""
    parts = []
    for axis, d in enumerate(AXES):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        parts.append(positions[..., axis, None].double() * freqs)
    return torch.cat(parts, -1)


def _pad(x, multiple, token=None):
    extra = -x.shape[1] % multiple
    return x if not extra else torch.cat([x, token.expand(x.shape[0], extra, -1)], 1)


def _block(r, pre, block, x, angles, mod, spans, net):
    """One block on sequence x; records its ids under `pre` for each (prefix, start, length) of `spans`."""
    attn = block.attention

    def keep(name, value):
        for prefix, start, length in spans:
            r[f"{pre}{prefix}{name}"] = value[:, start:start + length]

    keep("in", x)
    if mod is not None:
        chunks = _lin(F.silu(mod) if net["silu_mod"] else mod, block.adaLN_modulation[-1])[:, None].chunk(4, -1)
        scale, gate, scale_mlp, gate_mlp = 1 + chunks[0], chunks[1].tanh(), 1 + chunks[2], chunks[3].tanh()
    else:
        scale = gate = scale_mlp = gate_mlp = 1.0
    normed = _rms(x, block.attention_norm1) * scale
    keep("norm-out", normed)
    if hasattr(attn, "qkv"):  # ComfyUI: one fused linear, q then k then v
        q, k, v = F.linear(normed, attn.qkv.weight).chunk(3, -1)
        q_norm, k_norm, out_proj = attn.q_norm, attn.k_norm, attn.out
    else:
        q, k, v = _lin(normed, attn.to_q), _lin(normed, attn.to_k), _lin(normed, attn.to_v)
        q_norm, k_norm, out_proj = attn.norm_q, attn.norm_k, attn.to_out[0]
    q, k, v = _rms(_heads(q), q_norm), _rms(_heads(k), k_norm), _heads(v)
    for name, value in (("q", q), ("k", k), ("v", v)):
        keep(name, _merge(value))
    probs = torch.softmax(_rotate(q, angles) @ _rotate(k, angles).transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    attn_out = _lin(_merge(probs @ v), out_proj)
    keep("attn-out", attn_out)
    x = x + gate * _rms(attn_out, block.attention_norm2)
    ff = block.feed_forward
    hidden = _rms(x, block.ffn_norm1) * scale_mlp
    inner = F.silu(F.linear(hidden, ff.w1.weight)) * F.linear(hidden, ff.w3.weight)
    keep("ffn-inner", inner)
    x = x + gate_mlp * _rms(F.linear(inner, ff.w2.weight), block.ffn_norm2)
    keep("out", x)
    return x, probs


def reference(model, x, caps, adaln, net: dict, theta: float) -> dict:
    """Every id's tensor, as (B, N, C) image tokens, (B, T, C) caption tokens, (B, heads, N, keys) maps and
    (B, C, H, W) ends. adaln: the timestep embedding (the model's own module computes it)."""
    b, c, height, width = x.shape
    p, pad = 2, net["pad"]
    h, w, T = height // p, width // p, caps.shape[1]
    n = h * w
    embedder = getattr(model, "x_embedder", None) or model.all_x_embedder["2-1"]
    final = getattr(model, "final_layer", None) or model.all_final_layer["2-1"]
    tokens = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
    img = _pad(_lin(tokens, embedder), pad, getattr(model, "x_pad_token", None))
    cap = _pad(_lin(_rms(caps, model.cap_embedder[0]), model.cap_embedder[1]), pad,
               getattr(model, "cap_pad_token", None))
    ni, nc_ = img.shape[1], cap.shape[1]
    cap_pos = torch.zeros(b, nc_, 3)
    cap_pos[..., 0] = net["cap_start"] + torch.arange(nc_)
    img_pos = torch.zeros(b, ni, 3)  # pad tokens sit at (0, 0, 0)
    img_pos[:, :n, 0] = net["cap_start"] + nc_
    img_pos[:, :n, 1], img_pos[:, :n, 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    img_angles, cap_angles = _angles(img_pos, theta), _angles(cap_pos, theta)
    r = {"dit-in": x, "dit-embed": img[:, :n]}
    for i, (noise, context) in enumerate(zip(model.noise_refiner, model.context_refiner)):
        img, probs = _block(r, f"vit-refiner{i}-", noise, img, img_angles, adaln, [("", 0, n)], net)
        r[f"vit-refiner{i}-self-map"] = probs[:, :, :n, :n]
        cap, _ = _block(r, f"vit-refiner{i}-", context, cap, cap_angles, None, [("txt-", 0, T)], net)
    if net["image_first"]:
        seq, angles, image_at, text_at = torch.cat([img, cap], 1), torch.cat([img_angles, cap_angles], 1), 0, ni
    else:
        seq, angles, image_at, text_at = torch.cat([cap, img], 1), torch.cat([cap_angles, img_angles], 1), nc_, 0
    for i, layer in enumerate(model.layers):
        seq, probs = _block(r, f"vit-block{i}-", layer, seq, angles, adaln,
                            [("", image_at, n), ("txt-", text_at, T)], net)
        rows = probs[:, :, image_at:image_at + n]
        r[f"vit-block{i}-cross-map"], r[f"vit-block{i}-self-map"] = \
            rows[..., text_at:text_at + T], rows[..., image_at:image_at + n]
    img = seq[:, image_at:image_at + n]
    scale = 1 + _lin(F.silu(adaln), final.adaLN_modulation[1])[:, None]
    y = _lin(F.layer_norm(img, img.shape[-1:], eps=1e-6) * scale, final.linear)
    r["dit-out"] = net["sign"] * y.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
    return r


def _check_all(features, ref, ids, case):
    grid = (case["latent"][0] // 2, case["latent"][1] // 2)
    assert list(features) == ids and set(ref) == set(ids)
    for i in ids:
        _close(features[i], _as_captured(i, ref[i], grid), i)


# ---- ids ------------------------------------------------------------------------------------------------------
STREAM = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")


def _expected_ids(refiners: int, blocks: int) -> list[str]:
    ids = ["dit-in", "dit-embed"]
    for r in range(refiners):
        for s in STREAM[:5] + ("self-map",) + STREAM[5:]:
            ids += [f"vit-refiner{r}-{s}"] + ([] if s == "self-map" else [f"vit-refiner{r}-txt-{s}"])
    for b in range(blocks):
        for s in STREAM[:5] + ("cross-map", "self-map") + STREAM[5:]:
            ids += [f"vit-block{b}-{s}"] + ([] if s.endswith("-map") else [f"vit-block{b}-txt-{s}"])
    return ids + ["dit-out"]


def test_ids_follow_the_loaded_network():
    """Refiners get one-stream ids (image: noise refiner, with a self-map; txt-: context refiner, no map) before the
    joint layers' ids; the shipped catalog is the released config's (2 refiners, 30 layers)."""
    ids = enumerate_ids(tiny_z_image())
    assert ids == _expected_ids(2, 2)
    assert all(format_id(parse_id(i)) == i for i in ids)
    assert [parse_id(i).is_map for i in ids].count(True) == 2 + 2 * 2
    for bad in ("vit-refiner0-cross-map", "vit-refiner0-txt-self-map", "vit-refiner0-attn2-q"):
        with pytest.raises(LayerIdSyntaxError):  # a refiner sees one stream: no cross-map, no text map
            parse_id(bad)
    from diffusion_feature.layer_catalog.catalog import family_ids

    assert family_ids("z-image") == _expected_ids(2, 30)
    assert set(get_family("z-image").presets["sweep"]) <= set(family_ids("z-image"))


# ---- diffusers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [PADDED, UNPADDED], ids=["padded", "unpadded"])
def test_every_id_equals_a_recomputation_from_the_weights(case):
    model = tiny_z_image()
    ids = enumerate_ids(model)
    features = _diffusers_features(model, ids, case)
    x, caps, t = _inputs(case)
    with torch.no_grad():
        ref = reference(model, x, caps, model.t_embedder(t * model.t_scale), ZIMAGE, model.rope_theta)
    _check_all(features, ref, ids, case)
    grid, T = (case["latent"][0] // 2, case["latent"][1] // 2), case["tokens"]
    assert features["vit-block1-txt-v"].shape == (2, DIM, T) and features["vit-refiner0-v"].shape == (2, DIM, *grid)
    assert features["vit-block1-cross-map"].shape == (2, HEADS, grid[0] * grid[1], T)
    rows = features["vit-block1-cross-map"].sum(-1) + features["vit-block1-self-map"].sum(-1)
    if case is PADDED:  # the pad tokens' keys take part of each row, and no id includes them
        assert (rows < 1 - 1e-3).all()
    else:
        assert torch.allclose(rows, torch.ones(()), atol=1e-6)


def test_captions_of_two_lengths_in_one_batch_are_refused():
    """diffusers' Z-Image pads each caption apart (and masks the joint attention): one split cannot serve both."""
    from diffusion_feature.layer_catalog.hooks import TokenGridError

    model = tiny_z_image()
    x, caps, t = _inputs(PADDED)
    with pytest.raises(TokenGridError, match="captions of 5, 7 tokens in one batch"):
        _capture(model, ["vit-block0-txt-out"], x=list(x.unsqueeze(2)), t=t, cap_feats=[caps[0], caps[1, :5]])
    assert residue(model) == {"forward_hooks": 0, "forward_pre_hooks": 0}


def test_maps_give_the_attention_output():
    """Without padding: image rows of the maps times the values they weigh, through the output projection, are
    attn-out; a joint layer weighs the caption's values (cross-map) and the image's (self-map), a refiner the
    image's alone, and each row sums to 1."""
    model = tiny_z_image()
    f = _diffusers_features(model, enumerate_ids(model), UNPADDED)

    def heads(layer_id):  # a captured (B, C, h, w) or (B, C, T) tensor as (B, heads, N, d)
        return _heads(f[layer_id].flatten(2).transpose(1, 2))

    cases = [(f"vit-block{b}-", model.layers[b], ("cross-map", "txt-v"), ("self-map", "v")) for b in range(2)]
    cases += [(f"vit-refiner{r}-", model.noise_refiner[r], ("self-map", "v")) for r in range(2)]
    for pre, block, *pairs in cases:
        assert torch.allclose(sum(f[pre + m].sum(-1) for m, _ in pairs), torch.ones(()), atol=1e-6)
        weighed = sum(f[pre + m] @ heads(pre + v) for m, v in pairs)
        with torch.no_grad():
            out = block.attention.to_out[0](_merge(weighed))
        _close(out, f[pre + "attn-out"].flatten(2).transpose(1, 2), pre)


# ---- ComfyUI's NextDiT ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_new():
    yield nc.use_comfy("0.3.64")
    nc.release()


def test_v0364_nextdit_cannot_hold_z_image(comfy_new):
    """Why there is no native Z-Image comparison on v0.3.64: its NextDiT takes none of Z-Image's options."""
    import inspect

    lumina = nc.comfy_module("comfy.ldm.lumina.model")
    options = inspect.signature(lumina.NextDiT).parameters
    assert not {"pad_tokens_multiple", "z_image_modulation", "rope_theta", "time_scale"} & set(options)
    # and a Z-Image file (keys as ComfyUI's own z_image_turbo files name them; shapes of the released model) is
    # detected as Lumina2 with Lumina2's 2304 channels, which its 3840-wide weights do not fit: UNETLoader fails
    detection = nc.comfy_module("comfy.model_detection")
    state = {"x_pad_token": torch.empty(1, 3840), "cap_pad_token": torch.empty(1, 3840),
             "x_embedder.weight": torch.empty(3840, 64), "cap_embedder.1.weight": torch.empty(3840, 2560),
             **{f"layers.{i}.attention.qkv.weight": torch.empty(3 * 3840, 3840, device="meta") for i in range(30)}}
    config = detection.detect_unet_config(state, "")
    assert (config["image_model"], config["dim"], config["n_layers"]) == ("lumina2", 2304, 30)


def test_comfy_nextdit_every_id_equals_a_recomputation(comfy_new):
    """The native layout on ComfyUI v0.3.64's NextDiT built Lumina2-shaped: fused qkv, q_norm / k_norm, the
    [text, image] sequence; every id equal to the hand-written forward within 1e-5 relative."""
    lumina = nc.comfy_module("comfy.ldm.lumina.model")
    net = _perturb(lumina.NextDiT(patch_size=2, in_channels=16, dim=DIM, n_layers=2, n_refiner_layers=2,
                                  n_heads=HEADS, multiple_of=16, qk_norm=True, cap_feat_dim=CAP, axes_dims=AXES,
                                  dtype=torch.float32, operations=comfy_new.ops.disable_weight_init), 0)
    ids = enumerate_ids(net)
    assert ids == _expected_ids(2, 2)
    case = PADDED  # sizes that Z-Image would pad; Lumina2 does not
    x, caps, t = _inputs(case)
    features = _capture(net, ids, x, t, caps, caps.shape[1])
    with torch.no_grad():
        ref = reference(net, x, caps, net.t_embedder(1 - t, dtype=torch.float32), LUMINA2, 10000.0)
    _check_all(features, ref, ids, case)

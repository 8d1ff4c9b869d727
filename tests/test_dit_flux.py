"""Every Flux layer id is exact, on both backends.

diffusers: one tiny FluxTransformer2DModel (2 double + 2 single blocks, 2 heads) on a non-square latent; the test
records each block's inputs with hooks of its own and recomputes every id from the module weights by hand
(LayerNorm, AdaLN modulation, RMS QK-norm, a rotary embedding written here from the positions, an explicit
softmax), then checks the maps also through the attention-output identity (cross-map @ text v + self-map @ image v
is the attention's output) and their row sums.
Native: ComfyUI v0.3.64's own Flux (comfy.ldm.flux.model.Flux), built tiny in-process with the same weights placed by
ComfyUI's own key map (comfy.utils.flux_to_diffusers), gives every id equal to diffusers' within 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import InputRecorder
from diffusion_feature.engine.dit_transforms import (MassiveChannels, adaln, apply_ditf, detect_massive_channels,
                                                    ditf)
from diffusion_feature.layer_catalog import (FeatureCapture, LayerIdError, enumerate_ids, meta_denoiser,
                                             modulation_taps, resolve_layers, resolve_taps, taps_of)

LATENT = (8, 12)  # (H, W) of the latent, non-square on purpose: a 4x6 token grid of 2x2 patches
TOKENS, HEADS, HEAD_DIM, CTX, POOLED, AXES = 5, 2, 8, 12, 6, (2, 2, 4)
DOUBLE, SINGLE = 2, 2
ATOL, RTOL = 1e-5, 1e-4


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=DOUBLE, num_single_layers=SINGLE,
                                   attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CTX,
                                   pooled_projection_dim=POOLED, guidance_embeds=False, axes_dims_rope=AXES).eval()
    with torch.no_grad():  # no weight left at its initial ones / zeros: every term of every id counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latent -> (B, H/2 * W/2, C * 4) tokens, as diffusers' Flux pipeline packs it."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    h, w = LATENT
    latent = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, TOKENS, CTX, generator=g)
    pooled = torch.randn(batch, POOLED, generator=g)
    t = torch.tensor([0.26, 0.71])[:batch]  # two samples, two modulations
    return latent, ctx, pooled, t


def _positions():
    """[text, image] positions (axis 0 unused, 1 row, 2 column), as both backends build them."""
    h, w = LATENT[0] // 2, LATENT[1] // 2
    img = torch.zeros(h, w, 3)
    img[..., 1], img[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return torch.zeros(TOKENS, 3), img.reshape(-1, 3)


def _diffusers_kwargs(latent, ctx, pooled, t):
    txt_ids, img_ids = _positions()
    return dict(hidden_states=_pack(latent), encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                img_ids=img_ids, txt_ids=txt_ids)


@pytest.fixture(scope="module")
def flux():
    return _tiny_flux()


@pytest.fixture(scope="module")
def captured(flux):
    """Every id of the tiny Flux (and each block input's companion modulation), captured once, with the inputs each
    block and the model were called with."""
    ids = enumerate_ids(flux)
    latent, ctx, pooled, t = _inputs()
    kwargs = _diffusers_kwargs(latent, ctx, pooled, t)
    recorder = InputRecorder(flux, [f"transformer_blocks.{i}" for i in range(DOUBLE)] +
                             [f"single_transformer_blocks.{i}" for i in range(SINGLE)])
    try:
        taps = taps_of(flux, ids) + modulation_taps(flux, ids)
        with torch.no_grad(), FeatureCapture(flux, taps, token_grid=LATENT) as cap:
            out = cap.run(**kwargs)
    finally:
        recorder.close()
    return dict(ids=ids, features=cap.features, inputs=recorder.inputs, out=out.sample, latent=latent, kwargs=kwargs)


# ---- the computation by hand ------------------------------------------------------------------------------------
def _layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(x, weight):
    """RMS QK-norm over each head's channels, (B, N, heads * d) -> (B, heads, N, d)."""
    b, n, _ = x.shape
    x = x.reshape(b, n, HEADS, HEAD_DIM)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    return x.transpose(1, 2)


def _rope(x, pos=None):
    """Flux's rotary embedding on the joint [text, image] sequence (B, heads, N, d), written from the positions
    (default: _positions'; a Kontext run's include its reference's): each axis rotates its channel pairs (2i, 2i+1)
    by pos * theta^(-2i / dim)."""
    pos = torch.cat(_positions()) if pos is None else pos
    angles = []
    for axis, dim in enumerate(AXES):
        freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos[:, axis, None].double() * freq)
    angle = torch.cat(angles, dim=-1)  # (N, d / 2)
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _probs(q, k, pos=None):
    """softmax(q k^T / sqrt(d)) after the rotary embedding, image-query rows only: (cross, self)."""
    q, k = _rope(q, pos), _rope(k, pos)
    p = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM**0.5, dim=-1)[:, :, TOKENS:]
    return p[..., :TOKENS], p[..., TOKENS:]


def _merge(x):
    return x.transpose(1, 2).flatten(2)


def _call(recorded, name, position):
    args, kwargs = recorded
    return kwargs[name] if name in kwargs else args[position]


def _double_by_hand(block, recorded, pos=None) -> dict:
    x, c = _call(recorded, "hidden_states", 0), _call(recorded, "encoder_hidden_states", 1)
    temb = _call(recorded, "temb", 2)
    attn = block.attn
    mods = {}
    for name, norm in (("img", block.norm1), ("txt", block.norm1_context)):
        mods[name] = F.linear(F.silu(temb), norm.linear.weight, norm.linear.bias).chunk(6, dim=1)
    by = {}
    streams = {"img": (x, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k),
               "txt": (c, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)}
    for name, (h, to_q, to_k, to_v, nq, nk) in streams.items():
        shift, scale = mods[name][0], mods[name][1]
        n = _layer_norm(h) * (1 + scale[:, None]) + shift[:, None]
        by[name] = dict(n=n, q=_rms(F.linear(n, to_q.weight, to_q.bias), nq.weight),
                        k=_rms(F.linear(n, to_k.weight, to_k.bias), nk.weight),
                        v=F.linear(n, to_v.weight, to_v.bias))
    q = torch.cat([by["txt"]["q"], by["img"]["q"]], dim=2)
    k = torch.cat([by["txt"]["k"], by["img"]["k"]], dim=2)
    v = torch.cat([by["txt"]["v"], by["img"]["v"]], dim=1).reshape(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)
    p = torch.softmax(_rope(q, pos) @ _rope(k, pos).transpose(-1, -2) / HEAD_DIM**0.5, dim=-1)
    o = _merge(p @ v)
    outs = {"img": F.linear(o[:, TOKENS:], attn.to_out[0].weight, attn.to_out[0].bias),
            "txt": F.linear(o[:, :TOKENS], attn.to_add_out.weight, attn.to_add_out.bias)}
    result = {}
    for name, h, ff in (("img", x, block.ff), ("txt", c, block.ff_context)):
        _shift, _scale, gate, shift2, scale2, gate2 = mods[name]
        h1 = h + gate[:, None] * outs[name]
        m = _layer_norm(h1) * (1 + scale2[:, None]) + shift2[:, None]
        inner = F.gelu(F.linear(m, ff.net[0].proj.weight, ff.net[0].proj.bias), approximate="tanh")
        out = h1 + gate2[:, None] * F.linear(inner, ff.net[2].weight, ff.net[2].bias)
        s = by[name]
        pre = "" if name == "img" else "txt-"
        result.update({f"{pre}in": h, f"{pre}norm-out": s["n"], f"{pre}q": _merge(s["q"]), f"{pre}k": _merge(s["k"]),
                       f"{pre}v": s["v"], f"{pre}attn-out": outs[name], f"{pre}ffn-inner": inner, f"{pre}out": out})
    result["cross-map"], result["self-map"] = _probs(q, k, pos)
    return result


def _single_by_hand(block, recorded, pos=None) -> dict:
    x, c = _call(recorded, "hidden_states", 0), _call(recorded, "encoder_hidden_states", 1)
    temb = _call(recorded, "temb", 2)
    attn = block.attn
    joint = torch.cat([c, x], dim=1)
    shift, scale, gate = F.linear(F.silu(temb), block.norm.linear.weight, block.norm.linear.bias).chunk(3, dim=1)
    n = _layer_norm(joint) * (1 + scale[:, None]) + shift[:, None]
    inner = F.gelu(F.linear(n, block.proj_mlp.weight, block.proj_mlp.bias), approximate="tanh")
    q = _rms(F.linear(n, attn.to_q.weight, attn.to_q.bias), attn.norm_q.weight)
    k = _rms(F.linear(n, attn.to_k.weight, attn.to_k.bias), attn.norm_k.weight)
    v = F.linear(n, attn.to_v.weight, attn.to_v.bias)
    vh = v.reshape(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)
    o = _merge(torch.softmax(_rope(q, pos) @ _rope(k, pos).transpose(-1, -2) / HEAD_DIM**0.5, dim=-1) @ vh)
    out = joint + gate[:, None] * F.linear(torch.cat([o, inner], dim=-1), block.proj_out.weight, block.proj_out.bias)
    whole = {"in": joint, "norm-out": n, "q": _merge(q), "k": _merge(k), "v": v, "attn-out": o, "ffn-inner": inner,
             "out": out}
    result = {}
    for suffix, tensor in whole.items():
        result[suffix], result[f"txt-{suffix}"] = tensor[:, TOKENS:], tensor[:, :TOKENS]
    result["cross-map"], result["self-map"] = _probs(q, k, pos)
    return result


def _as_feature(suffix: str, x: torch.Tensor) -> torch.Tensor:
    """A token tensor by hand in the layout the capture stores: image (B, C, h, w), text (B, C, T)."""
    if suffix.endswith("map"):
        return x
    if suffix.startswith("txt-"):
        return x.transpose(1, 2)
    h, w = LATENT[0] // 2, LATENT[1] // 2
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


# ---- diffusers ----------------------------------------------------------------------------------------------------
def test_ids_are_every_tensor_of_every_block(captured):
    ids = captured["ids"]
    per_block = 2 + 2 * 8  # two maps, eight suffixes for each stream
    assert len(ids) == 3 + (DOUBLE + SINGLE) * per_block
    assert ids[:2] == ["dit-in", "dit-embed"] and ids[-1] == "dit-out"
    assert ids[2:8] == ["vit-block0-in", "vit-block0-txt-in", "vit-block0-norm-out", "vit-block0-txt-norm-out",
                        "vit-block0-q", "vit-block0-txt-q"]
    assert f"vit-block{DOUBLE + SINGLE - 1}-txt-out" in ids and f"vit-block{DOUBLE + SINGLE}-in" not in ids


def test_every_block_id_equals_the_computation_by_hand(flux, captured):
    f, checked = captured["features"], 0
    blocks = [(_double_by_hand, flux.transformer_blocks[i], f"transformer_blocks.{i}") for i in range(DOUBLE)]
    blocks += [(_single_by_hand, flux.single_transformer_blocks[i], f"single_transformer_blocks.{i}")
               for i in range(SINGLE)]
    with torch.no_grad():
        for b, (by_hand, block, path) in enumerate(blocks):
            for suffix, expected in by_hand(block, captured["inputs"][path]).items():
                got = f[f"vit-block{b}-{suffix}"]
                want = _as_feature(suffix, expected)
                assert got.shape == want.shape, (b, suffix, got.shape, want.shape)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"block {b} {suffix}: {m}")
                checked += 1
    assert checked == len(captured["ids"]) - 3


def test_ends_equal_the_computation_by_hand(flux, captured):
    f, (h, w) = captured["features"], LATENT
    torch.testing.assert_close(f["dit-in"], captured["latent"])  # the packed tokens unpacked: the latent itself
    with torch.no_grad():
        embed = F.linear(captured["kwargs"]["hidden_states"], flux.x_embedder.weight, flux.x_embedder.bias)
    torch.testing.assert_close(f["dit-embed"], _as_feature("embed", embed), atol=ATOL, rtol=RTOL)
    assert f["dit-out"].shape == (2, 4, h, w)
    torch.testing.assert_close(f["dit-out"], _unpack(captured["out"], h, w))
    # the unpacking is the inverse of the pipeline's packing, channel by channel (not a transposed grid)
    torch.testing.assert_close(_pack(f["dit-out"]), captured["out"])


def _heads(feature):
    """A captured (B, C, h, w) or (B, C, T) feature as (B, heads, N, d)."""
    x = feature.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def test_maps_give_the_attention_output_and_sum_to_one(flux, captured):
    """cross-map @ text v + self-map @ image v is the attention output of the image queries (through the output
    projection in double blocks), so the maps are the model's own probabilities, rotary embedding included."""
    f = captured["features"]
    for b in range(DOUBLE + SINGLE):
        cross, self_ = f[f"vit-block{b}-cross-map"], f[f"vit-block{b}-self-map"]
        assert cross.shape == (2, HEADS, 24, TOKENS) and self_.shape == (2, HEADS, 24, 24)
        torch.testing.assert_close((cross.sum(-1) + self_.sum(-1)), torch.ones(2, HEADS, 24), atol=1e-6, rtol=0)
        o = _merge(cross @ _heads(f[f"vit-block{b}-txt-v"]) + self_ @ _heads(f[f"vit-block{b}-v"]))
        with torch.no_grad():
            if b < DOUBLE:
                o = flux.transformer_blocks[b].attn.to_out[0](o)
        torch.testing.assert_close(o, f[f"vit-block{b}-attn-out"].flatten(2).transpose(1, 2), atol=ATOL, rtol=RTOL)


def test_an_id_of_another_family_gets_the_nearest_flux_ids(flux):
    with pytest.raises(LayerIdError) as e:
        resolve_taps("up-level1-repeat1-vit-block0-cross-q", flux, family="flux")
    message = str(e.value)
    assert "is a layer id of sd15" in message and "nearest this flux model ids: " in message
    nearest = message.split("nearest this flux model ids: ")[1].split(", ")
    assert nearest and all(n in enumerate_ids(flux) for n in nearest)
    # against the shipped catalog (Flux.1's 57 blocks): the same block's map comes first
    with pytest.raises(LayerIdError, match="not of flux; nearest flux ids: vit-block0-self-map, vit-block"):
        resolve_layers("vit-block3-out, mid-vit-block0-self-map", "flux")


# ---- native: ComfyUI's own Flux with the same weights -------------------------------------------------------------
def _comfy_state(utils, diffusers_state: dict) -> dict:
    """diffusers' weights under ComfyUI's names by ComfyUI's own map: q/k/v (and the single blocks' MLP input) go
    into slices of the fused linears, the final modulation's halves are swapped by the map's own function."""
    mapping = utils.flux_to_diffusers({"depth": DOUBLE, "depth_single_blocks": SINGLE, "hidden_size": HEADS * HEAD_DIM})
    missing = sorted(set(diffusers_state) - set(mapping))
    assert not missing, f"keys ComfyUI's map does not cover: {missing[:5]}"
    state: dict = {}
    fused: dict = {}
    for key, value in diffusers_state.items():
        target = mapping[key]
        if isinstance(target, str):
            state[target] = value.clone()
            continue
        name, where = target[0], target[1]
        if where is None:  # (name, None, function)
            state[name] = target[2](value.clone())
        else:
            fused.setdefault(name, []).append((where[1], value))
    for name, pieces in fused.items():
        state[name] = torch.cat([v for _, v in sorted(pieces, key=lambda p: p[0])], dim=0)
    return state


@pytest.fixture(scope="module")
def comfy_flux(flux):
    import native_comfy as nc

    try:
        ns = nc.use_comfy("0.3.64")
    except Exception as e:  # noqa: BLE001 - the prerequisites' own message says what is missing
        pytest.skip(f"ComfyUI v0.3.64 source not available: {e}")
    import diffusion_feature.native.comfy_model  # noqa: F401 - registers ComfyUI's rotary embedding ("comfy")
    from comfy.ldm.flux.model import Flux

    net = Flux(in_channels=4, out_channels=4, vec_in_dim=POOLED, context_in_dim=CTX, hidden_size=HEADS * HEAD_DIM,
               mlp_ratio=4.0, num_heads=HEADS, depth=DOUBLE, depth_single_blocks=SINGLE, axes_dim=list(AXES),
               theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False, dtype=torch.float32,
               operations=ns.ops.disable_weight_init)
    net.load_state_dict(_comfy_state(ns.utils, flux.state_dict()), strict=True)
    yield net.eval()
    nc.release()


def test_native_flux_ids_equal_diffusers_ids(flux, captured, comfy_flux):
    ids = enumerate_ids(comfy_flux)
    assert ids == captured["ids"]  # the same ids in the same forward order on both backends
    latent, ctx, pooled, t = _inputs()
    taps = taps_of(comfy_flux, ids) + modulation_taps(comfy_flux, ids)
    with torch.no_grad(), FeatureCapture(comfy_flux, taps) as cap:
        out = cap.run(latent, t, ctx, y=pooled)
    torch.testing.assert_close(out, _unpack(captured["out"], *LATENT), atol=1e-5, rtol=1e-5)
    assert list(cap.features) == list(captured["features"])  # the block inputs' modulations included
    for layer_id in cap.features:
        want, got = captured["features"][layer_id], cap.features[layer_id]
        assert got.shape == want.shape, (layer_id, got.shape, want.shape)
        error = float((got - want).abs().max() / want.abs().max())
        assert error <= 1e-5, f"{layer_id}: relative error {error:.2e}"


REFERENCE = (4, 8)  # a Kontext reference latent of another size than the generated one: a 2x4 token grid
REF_SUFFIXES = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")
REF_IDS = [f"vit-block{b}-ref0-{s}" for b in range(DOUBLE + SINGLE) for s in REF_SUFFIXES]


def _kontext(seed: int = 3):
    """The reference latent, and diffusers' inputs as its Kontext pipeline builds them: the reference's packed
    tokens after the generated image's, with positions (1, row, column); ComfyUI builds the same from ref_latents."""
    ref = torch.randn(2, 4, *REFERENCE, generator=torch.Generator().manual_seed(seed))
    latent, ctx, pooled, t = _inputs()
    kwargs = _diffusers_kwargs(latent, ctx, pooled, t)
    h, w = REFERENCE[0] // 2, REFERENCE[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 0], ids[..., 1], ids[..., 2] = 1, torch.arange(h)[:, None], torch.arange(w)[None]
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"], _pack(ref)], dim=1)
    kwargs["img_ids"] = torch.cat([kwargs["img_ids"], ids.reshape(-1, 3)])
    return ref, kwargs


@pytest.fixture(scope="module")
def kontext_captured(flux, captured):
    """Every id and the reference's ids (vit-block{B}-ref0-*) of a Kontext run, with each block's inputs."""
    ref, kwargs = _kontext()
    recorder = InputRecorder(flux, [f"transformer_blocks.{i}" for i in range(DOUBLE)] +
                             [f"single_transformer_blocks.{i}" for i in range(SINGLE)])
    try:
        with torch.no_grad(), FeatureCapture(flux, taps_of(flux, captured["ids"] + REF_IDS), token_grid=LATENT) as cap:
            out = cap.run(**kwargs).sample
    finally:
        recorder.close()
    features = {k: v for k, v in cap.features.items() if k not in REF_IDS}
    refs = {k: cap.features[k] for k in REF_IDS}
    return dict(ref=ref, features=features, refs=refs, out=out, inputs=recorder.inputs, kwargs=kwargs,
                tokens=cap.token_ranges())


def test_kontext_reference_tokens_are_not_the_images(captured, kontext_captured):
    """Image ids are the generated image's tokens only, whatever follows them in the sequence."""
    f, plain = kontext_captured["features"], captured["features"]
    assert list(f) == captured["ids"] and all(f[k].shape == plain[k].shape for k in f)
    torch.testing.assert_close(f["dit-in"], captured["latent"])
    n = (LATENT[0] // 2) * (LATENT[1] // 2)
    torch.testing.assert_close(f["dit-out"], _unpack(kontext_captured["out"][:, :n], *LATENT))
    assert not torch.allclose(f["vit-block1-out"], plain["vit-block1-out"], atol=1e-3)  # the reference took part


def test_kontext_reference_ids_equal_the_computation_by_hand(flux, kontext_captured):
    """vit-block{B}-ref0-*: the reference's tokens of each block's image stream (their slice after the generated
    image's, from the by-hand forward with the reference's positions) on its own 2x4 grid, read off img_ids (axis 0
    is 1 for the reference); the token ranges label the joint sequence."""
    f, n, grid = kontext_captured["refs"], 24, (REFERENCE[0] // 2, REFERENCE[1] // 2)
    pos = torch.cat([_positions()[0], kontext_captured["kwargs"]["img_ids"]])
    blocks = [(_double_by_hand, flux.transformer_blocks[i], f"transformer_blocks.{i}") for i in range(DOUBLE)]
    blocks += [(_single_by_hand, flux.single_transformer_blocks[i], f"single_transformer_blocks.{i}")
               for i in range(SINGLE)]
    with torch.no_grad():
        for b, (by_hand, block, path) in enumerate(blocks):
            whole = by_hand(block, kontext_captured["inputs"][path], pos)
            for suffix in REF_SUFFIXES:
                x = whole[suffix][:, n:]  # the image stream after the generated image's tokens: the reference's
                want, got = x.transpose(1, 2).reshape(x.shape[0], -1, *grid), f[f"vit-block{b}-ref0-{suffix}"]
                assert got.shape == want.shape, (b, suffix, got.shape, want.shape)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"block {b} {suffix}: {m}")
    assert kontext_captured["tokens"] == [
        {"part": "text", "start": 0, "stop": TOKENS}, {"part": "image", "start": TOKENS, "stop": TOKENS + n,
                                                       "grid": [LATENT[0] // 2, LATENT[1] // 2]},
        {"part": "ref0", "start": TOKENS + n, "stop": TOKENS + n + 8, "grid": list(grid)}]


def test_reference_ids_of_a_run_without_them_name_its_count(flux, captured):
    """A reference id asked of a run with fewer reference images: one line naming the id and the run's count."""
    from diffusion_feature.layer_catalog.hooks import ReferenceImageError

    _ref, kwargs = _kontext()
    with pytest.raises(ReferenceImageError, match=r"^vit-block3-ref1-q: this run has 1 reference image \(ref0\), "
                                                  "so there is no ref1$"):
        with torch.no_grad(), FeatureCapture(flux, taps_of(flux, ["vit-block3-ref1-q"]), token_grid=LATENT) as cap:
            cap.run(**kwargs)
    with pytest.raises(ReferenceImageError, match="^vit-block0-ref0-out: the network was called without reference"):
        with torch.no_grad(), FeatureCapture(flux, taps_of(flux, ["vit-block0-ref0-out"]), token_grid=LATENT) as cap:
            cap.run(**captured["kwargs"])
    with pytest.raises(LayerIdError, match="'vit-block3-ref0-q' is a reference-image id, but sd3 takes no reference "
                                           "images .*; its generated image's id is vit-block3-q"):
        resolve_layers("vit-block3-ref0-q", "sd3")
    assert resolve_layers("vit-block56-ref2-attn-out", "flux") == ["vit-block56-ref2-attn-out"]  # any I: run's
    with pytest.raises(LayerIdError, match="'vit-block57-ref0-out' does not exist in flux"):
        resolve_layers("vit-block57-ref0-out", "flux")


def test_native_kontext_ids_equal_diffusers_ids(comfy_flux, captured, kontext_captured):
    """Every id and the reference's ids on ComfyUI's Flux given ref_latents (the reference's grid from the latent's
    shape) equal diffusers'; ids of references the conditioning lacks get one line naming how many it has."""
    from diffusion_feature.layer_catalog.families import dit_layout
    from diffusion_feature.layer_catalog.hooks import ReferenceImageError

    latent, ctx, pooled, t = _inputs()
    taps = taps_of(comfy_flux, captured["ids"] + REF_IDS)
    with torch.no_grad(), FeatureCapture(comfy_flux, taps) as cap:
        cap.run(latent, t, ctx, y=pooled, ref_latents=[kontext_captured["ref"]])
    assert cap.token_ranges() == kontext_captured["tokens"]
    for layer_id, want in {**kontext_captured["features"], **kontext_captured["refs"]}.items():
        got = cap.features[layer_id]
        assert got.shape == want.shape, (layer_id, got.shape, want.shape)
        error = float((got - want).abs().max() / want.abs().max())
        assert error <= 1e-5, f"{layer_id}: relative error {error:.2e}"
    # an odd-sized reference is padded to the patch size by the network: its grid is the padded latent's
    with torch.no_grad(), FeatureCapture(comfy_flux, taps_of(comfy_flux, ["vit-block1-ref0-out"])) as cap:
        cap.run(latent, t, ctx, y=pooled, ref_latents=[kontext_captured["ref"][..., :3, :7]])
    assert cap.features["vit-block1-ref0-out"].shape == (2, HEADS * HEAD_DIM, 2, 4)
    with pytest.raises(ReferenceImageError, match="^vit-block1-ref0-out: this conditioning carries no reference "
                                                  "image; add one with ReferenceLatent / TextEncodeQwenImageEdit$"):
        with torch.no_grad(), FeatureCapture(comfy_flux, taps_of(comfy_flux, ["vit-block1-ref0-out"])) as cap:
            cap.run(latent, t, ctx, y=pooled)
    # the reference latents this Flux takes: 4 channels here (its patch embedding's input over 2x2 patches)
    dit_layout(comfy_flux).check_reference_latents([kontext_captured["ref"]], "the positive conditioning", "it")
    with pytest.raises(ReferenceImageError, match=r"^reference image 2 of the positive conditioning is a latent of "
                                                  r"shape \[1, 16, 8, 8\]: this flux model takes 4-channel reference "
                                                  r"latents .*, padded to a multiple of 2 latent pixels$"):
        dit_layout(comfy_flux).check_reference_latents([kontext_captured["ref"], torch.zeros(1, 16, 8, 8)],
                                                       "the positive conditioning", "this flux model")


# ---- DiTF: the preset and its transform -------------------------------------------------------------------------------
def test_ditf_preset_is_the_tenth_single_blocks_input():
    assert resolve_layers("ditf", "flux") == ["vit-block28-in"]
    full = meta_denoiser("flux")  # Flux.1's real depths: 19 double blocks, then the single ones
    (tap,) = taps_of(full, ["vit-block28-in"])
    assert tap.module_path == "single_transformer_blocks.9" and tap.item == ("hidden_states", 0)
    (companion,) = modulation_taps(full, ["vit-block28-in", "vit-block28-txt-in", "vit-block28-out"])
    assert companion.id == "vit-block28-in:modulation" and companion.module_path == "single_transformer_blocks.9.norm.linear"
    assert companion.columns == (0, 2 * 3072)
    with pytest.raises(LayerIdError, match="'ditf' is a preset of flux and flux2 only, not of sd15 .*practical, "
                                           "legacy, full"):
        resolve_layers("ditf", "sd15")
    assert resolve_layers("ditf", "flux2") == ["vit-block27-in"]  # Flux.2's at DiTF's relative depth


def test_massive_channels_are_detected_from_the_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 6, generator=g)
    x[:, 5] += 400.0  # massive in every token
    x[:, 9] -= 2000.0
    x[0, 7, 1, 2] = 1e4  # one outlier token does not make a channel massive
    found = detect_massive_channels(x)
    assert found.channels == (5, 9) and all(r >= 100 for r in found.ratios)
    assert str(found).startswith("massive-activation channels 5 (")
    assert detect_massive_channels(torch.randn(2, 16, 4, 6, generator=g)).channels == ()
    with pytest.raises(ValueError, match="ratio must be > 1"):
        detect_massive_channels(x, ratio=0.5)


def test_ditf_equals_the_computation_by_hand(flux, captured):
    """On a Flux whose image stream carries two massive channels (planted in the patch embedding's bias, so every
    image token has them in every block's residual), DiTF's feature of the first single block's input is: those two
    channels (detected) zeroed, LayerNorm, then that block's own (1 + scale) x + shift, computed here from temb."""
    import copy

    planted = copy.deepcopy(flux)
    with torch.no_grad():
        planted.x_embedder.bias[[3, 11]] += torch.tensor([3000.0, -1500.0])
    b = DOUBLE  # the first single block
    ids = [f"vit-block{b}-in", f"vit-block{b}-norm-out", "vit-block0-in"]
    recorder = InputRecorder(planted, ["single_transformer_blocks.0"])
    try:
        with torch.no_grad(), FeatureCapture(planted, taps_of(planted, ids) + modulation_taps(planted, ids),
                                             token_grid=LATENT) as cap:
            cap.run(**captured["kwargs"])
    finally:
        recorder.close()
    features, massive = apply_ditf(cap.features)
    assert list(features) == ids and set(massive) == {f"vit-block{b}-in", "vit-block0-in"}
    assert massive[f"vit-block{b}-in"].channels == (3, 11)
    args, kwargs = recorder.inputs["single_transformer_blocks.0"]
    x, temb, norm = kwargs["hidden_states"], kwargs["temb"], planted.single_transformer_blocks[0].norm
    with torch.no_grad():
        shift, scale, _gate = F.linear(F.silu(temb), norm.linear.weight, norm.linear.bias).chunk(3, dim=1)
    x = x.clone()
    x[..., [3, 11]] = 0
    want = _layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(features[f"vit-block{b}-in"], _as_feature("in", want), atol=ATOL, rtol=RTOL)
    # with nothing suppressed the transform is the block's own norm-out: the companion is the block's modulation
    raw = cap.features[f"vit-block{b}-in"]
    same, none = ditf(raw, cap.features[f"vit-block{b}-in:modulation"], channels=())
    assert none == MassiveChannels((), ())
    torch.testing.assert_close(same, cap.features[f"vit-block{b}-norm-out"], atol=ATOL, rtol=RTOL)
    assert torch.equal(features[f"vit-block{b}-norm-out"], cap.features[f"vit-block{b}-norm-out"])  # passed through


def test_ditf_errors_name_what_is_wrong(captured):
    f = captured["features"]
    with pytest.raises(ValueError, match=r"needs \[shift \| scale\] of shape \(2, 32\)"):
        adaln(f["vit-block2-in"], f["vit-block2-in:modulation"][:, :16])
    with pytest.raises(ValueError, match="channels \\[16\\] are not channels of a feature with 16"):
        ditf(f["vit-block2-in"], f["vit-block2-in:modulation"], channels=[16])
    with pytest.raises(ValueError, match="no feature has its block's modulation"):
        apply_ditf({"vit-block2-in": f["vit-block2-in"]})



def test_the_ditf_preset_needs_a_block_input(flux):
    """A ditf request whose ids hold no block input with a modulation (a hand-edited preset, another family's
    network) says what the transform needs instead of returning untransformed features."""
    from diffusion_feature.engine.dit_transforms import DitfRun, ditf_run

    assert ditf_run("vit-block2-in", flux, taps_of(flux, ["vit-block2-in"])) is None  # no preset: no transform
    with pytest.raises(ValueError, match=r"the ditf preset transforms block inputs \(vit-block\{B\}-in\)"):
        DitfRun(flux, taps_of(flux, ["vit-block2-out", "vit-block2-txt-in"]))

"""Every Flux.2 layer id is exact on diffusers' Flux2Transformer2DModel.

One tiny Flux2Transformer2DModel (2 double + 2 single blocks, 2 heads, 4 rotary axes) on a non-square latent, its
inputs built by Flux2Pipeline's own static helpers (2x2 patchify, flatten, 4-axis position ids). The test records
each block's inputs and the shared modulations' input (temb) with hooks of its own and recomputes every id from the
module weights by hand (LayerNorm, the shared AdaLN modulation, RMS QK-norm, a rotary embedding written here from the
positions, an explicit softmax, SwiGLU), checks the maps also through the attention-output identity, and the ends
against the pipeline's own unpacking. Reference images (Flux.2's editing input) are appended as the pipeline does.
Native: ComfyUI v0.3.64 has no Flux.2, so no native comparison runs here; only the dispatch of ComfyUI's shared
`Flux` class name between the flux and flux2 families is tested.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import InputRecorder
from test_dit_flux import HEAD_DIM, HEADS, TOKENS, _call, _heads, _layer_norm, _merge, _rms  # the same tiny widths
from diffusion_feature.engine.dit_transforms import ditf
from diffusion_feature.layer_catalog import (FeatureCapture, LayerIdError, enumerate_ids, modulation_taps,
                                             resolve_layers, taps_of)
from diffusion_feature.layer_catalog.families import dit_layout

LATENT = (8, 12)  # (H, W) of the VAE latent, non-square: a 4x6 token grid after the pipeline's 2x2 patchify
VAE_CHANNELS, CTX, AXES, THETA = 4, 12, (2, 2, 2, 2), 2000
DOUBLE, SINGLE = 2, 2
WIDTH = HEADS * HEAD_DIM
GRID = (LATENT[0] // 2, LATENT[1] // 2)
ATOL, RTOL = 1e-5, 1e-4


def _pipeline():
    from diffusers import Flux2Pipeline

    return Flux2Pipeline


def _tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(in_channels=4 * VAE_CHANNELS, num_layers=DOUBLE, num_single_layers=SINGLE,
                                    attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CTX,
                                    timestep_guidance_channels=16, axes_dims_rope=AXES, rope_theta=THETA,
                                    guidance_embeds=True).eval()
    with torch.no_grad():  # no weight left at its initial values: every term of every id counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _tokens(latent: torch.Tensor):
    """A VAE latent (B, C, H, W) -> the pipeline's (patchified (B, 4C, H/2, W/2), tokens, position ids)."""
    pipe = _pipeline()
    patched = pipe._patchify_latents(latent)
    return patched, pipe._pack_latents(patched), pipe._prepare_latent_ids(patched)


def _inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, VAE_CHANNELS, *LATENT, generator=g)
    ctx = torch.randn(batch, TOKENS, CTX, generator=g)
    t = torch.tensor([0.26, 0.71])[:batch]  # two samples, two modulations
    return latent, ctx, t


def _kwargs(latent, ctx, t):
    patched, tokens, img_ids = _tokens(latent)
    txt_ids = _pipeline()._prepare_text_ids(ctx)
    return dict(hidden_states=tokens, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                guidance=torch.full((latent.shape[0],), 4.0))


@pytest.fixture(scope="module")
def flux2():
    return _tiny_flux2()


@pytest.fixture(scope="module")
def captured(flux2):
    """Every id of the tiny Flux.2 (and each block input's companion modulation), captured once, with the inputs
    each block and the shared modulations were called with."""
    ids = enumerate_ids(flux2)
    latent, ctx, t = _inputs()
    kwargs = _kwargs(latent, ctx, t)
    paths = [f"transformer_blocks.{i}" for i in range(DOUBLE)] + \
        [f"single_transformer_blocks.{i}" for i in range(SINGLE)] + ["double_stream_modulation_img"]
    recorder = InputRecorder(flux2, paths)
    try:
        taps = taps_of(flux2, ids) + modulation_taps(flux2, ids)
        with torch.no_grad(), FeatureCapture(flux2, taps, token_grid=LATENT) as cap:
            out = cap.run(**kwargs)
    finally:
        recorder.close()
    temb = recorder.inputs["double_stream_modulation_img"][0][0]
    return dict(ids=ids, features=cap.features, inputs=recorder.inputs, temb=temb, out=out.sample, latent=latent,
                kwargs=kwargs)


# ---- the computation by hand ------------------------------------------------------------------------------------
def _positions(reference: tuple[int, int] | None = None):
    """[text, image(, reference)] positions (t, h, w, l): text (0, 0, 0, index), image (0, row, column, 0), a
    reference image (10, row, column, 0), as Flux2Pipeline builds them."""
    txt = torch.zeros(TOKENS, 4)
    txt[:, 3] = torch.arange(TOKENS)
    grids = [(0, GRID)] + ([(10, reference)] if reference else [])
    parts = [txt]
    for t, (h, w) in grids:
        img = torch.zeros(h, w, 4)
        img[..., 0], img[..., 1], img[..., 2] = t, torch.arange(h)[:, None], torch.arange(w)[None]
        parts.append(img.reshape(-1, 4))
    return torch.cat(parts)


def _rope(x, reference=None):
    """The rotary embedding on the joint sequence (B, heads, N, d), written from the positions: each axis rotates its
    channel pairs (2i, 2i+1) by pos * theta^(-2i / dim)."""
    pos, angles = _positions(reference), []
    for axis, dim in enumerate(AXES):
        freq = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos[:, axis, None].double() * freq)
    angle = torch.cat(angles, dim=-1)  # (N, d / 2)
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _softmax(q, k, reference=None):
    """softmax(q k^T / sqrt(d)) over the joint sequence after the rotary embedding (reference: its token grid)."""
    return torch.softmax(_rope(q, reference) @ _rope(k, reference).transpose(-1, -2) / HEAD_DIM**0.5, dim=-1)


def _probs(q, k, reference=None):
    """softmax(q k^T / sqrt(d)) after the rotary embedding, image-query rows only: (cross, self)."""
    p = _softmax(q, k, reference)[:, :, TOKENS:]
    return p[..., :TOKENS], p[..., TOKENS:]


def _swiglu(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def _modulation(module, temb, chunks):
    """The shared modulation by hand: linear(silu(temb)) in `chunks` equal parts (shift, scale, gate, ...)."""
    return F.linear(F.silu(temb), module.linear.weight).chunk(chunks, dim=-1)


def _double_by_hand(model, block, recorded, temb, reference=None) -> dict:
    x, c = _call(recorded, "hidden_states", 0), _call(recorded, "encoder_hidden_states", 1)
    attn = block.attn
    mods = {"img": _modulation(model.double_stream_modulation_img, temb, 6),
            "txt": _modulation(model.double_stream_modulation_txt, temb, 6)}
    by = {}
    streams = {"img": (x, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k),
               "txt": (c, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)}
    for name, (h, to_q, to_k, to_v, nq, nk) in streams.items():
        shift, scale = mods[name][0], mods[name][1]
        n = _layer_norm(h) * (1 + scale[:, None]) + shift[:, None]
        by[name] = dict(n=n, q=_rms(F.linear(n, to_q.weight), nq.weight), k=_rms(F.linear(n, to_k.weight), nk.weight),
                        v=F.linear(n, to_v.weight))
    q = torch.cat([by["txt"]["q"], by["img"]["q"]], dim=2)
    k = torch.cat([by["txt"]["k"], by["img"]["k"]], dim=2)
    v = torch.cat([by["txt"]["v"], by["img"]["v"]], dim=1).reshape(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)
    o = _merge(_softmax(q, k, reference) @ v)
    outs = {"img": F.linear(o[:, TOKENS:], attn.to_out[0].weight),
            "txt": F.linear(o[:, :TOKENS], attn.to_add_out.weight)}
    result = {}
    for name, h, ff in (("img", x, block.ff), ("txt", c, block.ff_context)):
        _shift, _scale, gate, shift2, scale2, gate2 = mods[name]
        h1 = h + gate[:, None] * outs[name]
        m = _layer_norm(h1) * (1 + scale2[:, None]) + shift2[:, None]
        inner = _swiglu(F.linear(m, ff.linear_in.weight))
        out = h1 + gate2[:, None] * F.linear(inner, ff.linear_out.weight)
        s = by[name]
        pre = "" if name == "img" else "txt-"
        result.update({f"{pre}in": h, f"{pre}norm-out": s["n"], f"{pre}q": _merge(s["q"]), f"{pre}k": _merge(s["k"]),
                       f"{pre}v": s["v"], f"{pre}attn-out": outs[name], f"{pre}ffn-inner": inner, f"{pre}out": out})
    result["cross-map"], result["self-map"] = _probs(q, k, reference)
    result["in:modulation"] = torch.cat(mods["img"][:2], dim=-1)
    return result


def _single_by_hand(model, block, recorded, temb, reference=None) -> dict:
    joint = _call(recorded, "hidden_states", 0)  # Flux.2's single blocks get [text, image] as one sequence
    attn = block.attn
    shift, scale, gate = _modulation(model.single_stream_modulation, temb, 3)
    n = _layer_norm(joint) * (1 + scale[:, None]) + shift[:, None]
    proj = F.linear(n, attn.to_qkv_mlp_proj.weight)
    q, k, v = proj[..., :3 * WIDTH].chunk(3, dim=-1)
    inner = _swiglu(proj[..., 3 * WIDTH:])
    q, k = _rms(q, attn.norm_q.weight), _rms(k, attn.norm_k.weight)
    vh = v.reshape(joint.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)
    o = _merge(_softmax(q, k, reference) @ vh)
    out = joint + gate[:, None] * F.linear(torch.cat([o, inner], dim=-1), attn.to_out.weight)
    whole = {"in": joint, "norm-out": n, "q": _merge(q), "k": _merge(k), "v": v, "attn-out": o, "ffn-inner": inner,
             "out": out}
    result = {}
    for suffix, tensor in whole.items():
        result[suffix], result[f"txt-{suffix}"] = tensor[:, TOKENS:], tensor[:, :TOKENS]
    result["cross-map"], result["self-map"] = _probs(q, k, reference)
    result["in:modulation"] = torch.cat([shift, scale], dim=-1)
    return result


def _as_feature(suffix: str, x: torch.Tensor) -> torch.Tensor:
    """A tensor by hand in the layout the capture stores: image (B, C, h, w), text (B, C, T), vectors (B, C)."""
    if suffix.endswith("map"):
        return x
    if suffix.endswith(":modulation"):
        return x.reshape(x.shape[0], -1)
    if suffix.startswith("txt-"):
        return x.transpose(1, 2)
    return x.transpose(1, 2).reshape(x.shape[0], -1, *GRID)


# ---- diffusers ----------------------------------------------------------------------------------------------------
def test_ids_come_from_the_module_tree(flux2, captured):
    ids = captured["ids"]
    assert len(ids) == 3 + (DOUBLE + SINGLE) * (2 + 2 * 8)  # two maps, eight suffixes for each stream
    assert ids[:2] == ["dit-in", "dit-embed"] and ids[-1] == "dit-out"
    assert ids[2:8] == ["vit-block0-in", "vit-block0-txt-in", "vit-block0-norm-out", "vit-block0-txt-norm-out",
                        "vit-block0-q", "vit-block0-txt-q"]
    assert f"vit-block{DOUBLE + SINGLE - 1}-txt-out" in ids and f"vit-block{DOUBLE + SINGLE}-in" not in ids
    # the shipped catalog is Flux.2 dev's (8 double + 48 single blocks); a tiny or Klein network has its own depth
    assert len(resolve_layers("full", "flux2")) == 3 + 56 * 18
    with pytest.raises(LayerIdError, match="'vit-block56-out' is a layer id of flux and qwen-image, not of flux2; nearest flux2 ids"):
        resolve_layers("vit-block56-out", "flux2")


def test_every_block_id_equals_the_computation_by_hand(flux2, captured):
    f, checked = captured["features"], 0
    blocks = [(_double_by_hand, flux2.transformer_blocks[i], f"transformer_blocks.{i}") for i in range(DOUBLE)]
    blocks += [(_single_by_hand, flux2.single_transformer_blocks[i], f"single_transformer_blocks.{i}")
               for i in range(SINGLE)]
    with torch.no_grad():
        for b, (by_hand, block, path) in enumerate(blocks):
            for suffix, expected in by_hand(flux2, block, captured["inputs"][path], captured["temb"]).items():
                key = f"vit-block{b}-{suffix}"
                got, want = f[key], _as_feature(suffix, expected)
                assert got.shape == want.shape, (b, suffix, got.shape, want.shape)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")
                checked += 1
    assert checked == len(captured["ids"]) - 3 + DOUBLE + SINGLE  # every block id, and each block's modulation


def test_ends_are_the_pipelines_latent(flux2, captured):
    """dit-in / dit-out are the 128-channel (here 16) patchified latent at half the VAE latent's size: the pipeline's
    own patchify, and its own position-id unpacking of the prediction."""
    f = captured["features"]
    patched, _tokens_, img_ids = _tokens(captured["latent"])
    torch.testing.assert_close(f["dit-in"], patched)
    with torch.no_grad():
        embed = F.linear(captured["kwargs"]["hidden_states"], flux2.x_embedder.weight)
    torch.testing.assert_close(f["dit-embed"], _as_feature("embed", embed), atol=ATOL, rtol=RTOL)
    assert f["dit-out"].shape == (2, 4 * VAE_CHANNELS, *GRID)
    torch.testing.assert_close(f["dit-out"], _pipeline()._unpack_latents_with_ids(captured["out"], img_ids))


def test_maps_give_the_attention_output_and_sum_to_one(flux2, captured):
    """cross-map @ text v + self-map @ image v is the image queries' attention output (through the output projection
    in double blocks), so the maps are the model's own probabilities, rotary embedding included."""
    f, n = captured["features"], GRID[0] * GRID[1]
    for b in range(DOUBLE + SINGLE):
        cross, self_ = f[f"vit-block{b}-cross-map"], f[f"vit-block{b}-self-map"]
        assert cross.shape == (2, HEADS, n, TOKENS) and self_.shape == (2, HEADS, n, n)
        torch.testing.assert_close(cross.sum(-1) + self_.sum(-1), torch.ones(2, HEADS, n), atol=1e-6, rtol=0)
        o = _merge(cross @ _heads(f[f"vit-block{b}-txt-v"]) + self_ @ _heads(f[f"vit-block{b}-v"]))
        with torch.no_grad():
            if b < DOUBLE:
                o = flux2.transformer_blocks[b].attn.to_out[0](o)
        torch.testing.assert_close(o, f[f"vit-block{b}-attn-out"].flatten(2).transpose(1, 2), atol=ATOL, rtol=RTOL)


def test_the_shared_modulation_serves_ditf(captured):
    """With nothing suppressed, DiTF's transform of a block input is that block's own norm-out: the companion read
    from the network's shared modulation is the block's [shift | scale]."""
    f = captured["features"]
    for b in (0, DOUBLE):
        same, _ = ditf(f[f"vit-block{b}-in"], f[f"vit-block{b}-in:modulation"], channels=())
        torch.testing.assert_close(same, f[f"vit-block{b}-norm-out"], atol=ATOL, rtol=RTOL)


REFERENCE = (4, 8)  # a reference image's VAE latent of another size than the generated one's: a 2x4 token grid
REF_SUFFIXES = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")


@pytest.fixture(scope="module")
def reference_captured(flux2, captured):
    """The reference image's tokens after the generated image's, with positions (10, row, column, 0), as
    Flux2Pipeline builds them (prepare_image_latents, then torch.cat in its denoising loop)."""
    ref = torch.randn(2, VAE_CHANNELS, *REFERENCE, generator=torch.Generator().manual_seed(3))
    _patched, ref_tokens, _ids = _tokens(ref)
    ref_ids = _pipeline()._prepare_image_ids([_pipeline()._patchify_latents(ref[:1])]).expand(2, -1, -1)
    kwargs = dict(captured["kwargs"])
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"], ref_tokens], dim=1)
    kwargs["img_ids"] = torch.cat([kwargs["img_ids"], ref_ids], dim=1)
    ids = ["dit-in", "dit-out", "vit-block0-q", "vit-block1-out", "vit-block1-self-map", "vit-block1-cross-map",
           "vit-block2-in", "vit-block3-self-map"]
    refs = [f"vit-block{b}-ref0-{s}" for b in range(DOUBLE + SINGLE) for s in REF_SUFFIXES]
    recorder = InputRecorder(flux2, [f"transformer_blocks.{i}" for i in range(DOUBLE)] +
                             [f"single_transformer_blocks.{i}" for i in range(SINGLE)])
    try:
        with torch.no_grad(), FeatureCapture(flux2, taps_of(flux2, ids + refs), token_grid=LATENT) as cap:
            out = cap.run(**kwargs).sample
    finally:
        recorder.close()
    return dict(features=cap.features, out=out, refs=refs, inputs=recorder.inputs, tokens=cap.token_ranges())


def test_reference_tokens_are_not_the_images(captured, reference_captured):
    """Image ids are the generated image's tokens only, whatever follows them in the sequence; its maps are over the
    generated image's keys (the reference keys took part in the softmax: rows no longer sum to one)."""
    f, plain, n = reference_captured["features"], captured["features"], GRID[0] * GRID[1]
    assert all(f[k].shape == plain[k].shape for k in f if k not in reference_captured["refs"])
    torch.testing.assert_close(f["dit-in"], plain["dit-in"])
    torch.testing.assert_close(f["dit-out"], _as_feature("out", reference_captured["out"][:, :n]))
    torch.testing.assert_close(f["vit-block0-q"], plain["vit-block0-q"])  # before any attention: unchanged
    assert not torch.allclose(f["vit-block1-out"], plain["vit-block1-out"], atol=1e-3)  # the reference took part
    sums = f["vit-block1-self-map"].sum(-1) + f["vit-block1-cross-map"].sum(-1)
    assert (sums < 1 - 1e-3).all()
    # the first single block's image span of [text, image, reference] is the last double block's image stream
    torch.testing.assert_close(f["vit-block2-in"], f["vit-block1-out"], atol=0, rtol=0)


def test_reference_ids_equal_the_computation_by_hand(flux2, captured, reference_captured):
    """vit-block{B}-ref0-*: the reference's tokens of each block's image stream (its slice after the generated
    image's, from the by-hand forward of [text, image, reference]) on its own grid, read off the pipeline's img_ids
    (axis 0 = 10 for the first reference); the token ranges say where each part is."""
    f, n, grid = reference_captured["features"], GRID[0] * GRID[1], (REFERENCE[0] // 2, REFERENCE[1] // 2)
    blocks = [(_double_by_hand, flux2.transformer_blocks[i], f"transformer_blocks.{i}") for i in range(DOUBLE)]
    blocks += [(_single_by_hand, flux2.single_transformer_blocks[i], f"single_transformer_blocks.{i}")
               for i in range(SINGLE)]
    checked = 0
    with torch.no_grad():
        for b, (by_hand, block, path) in enumerate(blocks):
            whole = by_hand(flux2, block, reference_captured["inputs"][path], captured["temb"], grid)
            for suffix in REF_SUFFIXES:
                x = whole[suffix][:, n:]  # the image stream's tokens after the generated image's: the reference's
                want = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
                got = f[f"vit-block{b}-ref0-{suffix}"]
                assert got.shape == want.shape, (b, suffix, got.shape, want.shape)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"block {b} {suffix}: {m}")
                checked += 1
    assert checked == len(reference_captured["refs"])
    r = grid[0] * grid[1]
    assert reference_captured["tokens"] == [
        {"part": "text", "start": 0, "stop": TOKENS}, {"part": "image", "start": TOKENS, "stop": TOKENS + n,
                                                       "grid": list(GRID)},
        {"part": "ref0", "start": TOKENS + n, "stop": TOKENS + n + r, "grid": list(grid)}]


def test_a_reference_id_without_a_reference_names_the_run(flux2, captured):
    from diffusion_feature.layer_catalog.hooks import ReferenceImageError

    taps = taps_of(flux2, ["vit-block2-ref0-out"])
    with pytest.raises(ReferenceImageError, match=r"^vit-block2-ref0-out: the network was called without reference "
                                                  r"images \(DF_MODEL runs take none"):
        with torch.no_grad(), FeatureCapture(flux2, taps, token_grid=LATENT) as cap:
            cap.run(**captured["kwargs"])


# ---- ComfyUI's Flux class: Flux.1 or Flux.2 by its modulation --------------------------------------------------------
class Flux(torch.nn.Module):
    """A stand-in with the module tree of ComfyUI's Flux class (its blocks' names and widths): ComfyUI v0.3.64 has
    no Flux.2, so the dispatch between the two families is what can be tested here, not a forward."""

    def __init__(self, shared: bool):
        super().__init__()
        block = lambda: torch.nn.Module()  # noqa: E731
        self.double_blocks, self.single_blocks = torch.nn.ModuleList([block()]), torch.nn.ModuleList([block()])
        for b in (*self.double_blocks, *self.single_blocks):
            b.hidden_size = WIDTH
        self.hidden_size, self.patch_size = WIDTH, 1
        if shared:
            self.double_stream_modulation_img = torch.nn.Linear(WIDTH, 6 * WIDTH, bias=False)


def test_comfy_flux_class_is_read_by_the_family_of_its_modulation():
    flux1, flux2 = dit_layout(Flux(shared=False)), dit_layout(Flux(shared=True))
    assert flux1.ids() == flux2.ids()  # the same block classes: the same ids
    assert flux1.blocks[0]["modulation"]["module_path"] == "double_blocks.0.img_mod.lin"
    assert [b["modulation"] for b in flux2.blocks] == [
        dict(module_path="double_stream_modulation_img.lin", columns=(0, 2 * WIDTH)),
        dict(module_path="single_stream_modulation.lin", columns=(0, 2 * WIDTH))]
    assert {k: v for k, v in flux2.blocks[1].items() if k != "modulation"} == \
        {k: v for k, v in flux1.blocks[1].items() if k != "modulation"}

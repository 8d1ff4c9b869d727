"""Every Qwen-Image layer id is exact, on both backends, with and without an Edit reference image.

diffusers: a tiny QwenImageTransformer2DModel (2 double-stream blocks, 2 heads) on a non-square latent; the test
records each block's inputs with hooks of its own and recomputes every id from the module weights by hand
(LayerNorm, the modulation, RMS QK-norm, the rotary embedding written here from Qwen-Image's centred positions, an
explicit softmax over [text, image]), then checks the maps through the attention-output identity and their row
sums. The same by-hand forward runs with a reference image's tokens after the generated image's (the Edit
pipelines' sequence): every image id stays the generated image's.
Native: ComfyUI v0.3.64's own comfy.ldm.qwen_image model, built tiny in-process, loads the diffusers weights as they
are (ComfyUI keeps diffusers' names for this model: a strict load proves it, no conversion exists) and gives every
id equal to diffusers' within 1e-5 relative, maps included, with and without the reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import InputRecorder
from diffusion_feature.layer_catalog import (FeatureCapture, enumerate_ids, meta_denoiser, modulation_taps,
                                             resolve_layers, taps_of)

LATENT = (8, 12)  # non-square: a 4x6 grid of 2x2 patches, which sqrt(N) could not give
REFERENCE = (4, 8)  # an Edit reference latent of another size and shape (2x4 patches)
TOKENS, HEADS, HEAD_DIM, CTX, AXES, BLOCKS = 5, 2, 16, 12, (4, 6, 6), 2
ATOL, RTOL = 1e-5, 1e-4
SUFFIXES = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")


def _tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=BLOCKS,
                                        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                        joint_attention_dim=CTX, axes_dims_rope=AXES).eval()
    with torch.no_grad():  # no weight left at its initial ones / zeros: every term of every id counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latent -> (B, H/2 * W/2, C * 4) tokens: the Qwen-Image pipelines' own packing."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline._pack_latents(x, *x.shape)


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The pipelines' own unpacking (to their (B, C, 1, H, W) latent; pixel sizes at the VAE's factor 8)."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline._unpack_latents(x, h * 8, w * 8, 8)[:, :, 0]


def _grid(latent) -> tuple[int, int]:
    return latent[0] // 2, latent[1] // 2


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(2, 4, *LATENT, generator=g)
    ctx = torch.randn(2, TOKENS, CTX, generator=g)
    ref = torch.randn(2, 4, *REFERENCE, generator=g)
    t = torch.tensor([0.26, 0.71])  # two samples, two modulations (the pipeline passes t / 1000)
    return latent, ctx, ref, t


def _kwargs(run: str) -> dict:
    latent, ctx, ref, t = _inputs()
    tokens, shapes, extra = _pack(latent), [(1, *_grid(LATENT))], {}
    if run == "edit":  # the Edit pipelines: the reference's tokens after the generated image's, its shape after its
        tokens, shapes = torch.cat([tokens, _pack(ref)], dim=1), shapes + [(1, *_grid(REFERENCE))]
    if run == "masked":  # a batch of two prompts, the second two tokens shorter: the pipelines pad it and mask it
        extra["encoder_hidden_states_mask"] = torch.tensor([[1] * TOKENS, [1] * (TOKENS - 2) + [0, 0]])
    return dict(hidden_states=tokens, encoder_hidden_states=ctx, timestep=t, img_shapes=[shapes] * 2, **extra)


@pytest.fixture(scope="module")
def qwen():
    return _tiny_qwen()


def _capture(model, run: str) -> dict:
    """Every id (and with the reference, its ids vit-block{B}-ref0-*) with each block's inputs."""
    ids = enumerate_ids(model)
    refs = [f"vit-block{b}-ref0-{s}" for b in range(BLOCKS) for s in SUFFIXES] if run == "edit" else []
    paths = [f"transformer_blocks.{i}" for i in range(BLOCKS)]
    recorder = InputRecorder(model, paths)
    kwargs = _kwargs(run)
    try:
        taps = taps_of(model, ids + refs) + modulation_taps(model, ids)
        with torch.no_grad(), FeatureCapture(model, taps, token_grid=LATENT) as cap:
            out = cap.run(**kwargs).sample
    finally:
        recorder.close()
    return dict(ids=ids, refs=refs, features=cap.features, inputs=recorder.inputs, out=out, kwargs=kwargs,
                tokens=cap.token_ranges())


@pytest.fixture(scope="module")
def captured(qwen):
    return _capture(qwen, "plain")


@pytest.fixture(scope="module")
def edit_captured(qwen):
    return _capture(qwen, "edit")


@pytest.fixture(scope="module")
def masked_captured(qwen):
    return _capture(qwen, "masked")


# ---- the computation by hand ------------------------------------------------------------------------------------
def _centred(n: int) -> torch.Tensor:
    """Qwen-Image's positions along one image axis: centred, -(n - n // 2) .. n // 2 - 1."""
    return torch.arange(n) - (n - n // 2)


def _positions(edit: bool) -> torch.Tensor:
    """(frame, row, column) of every token of [text, image, reference]: image k has frame k; text tokens sit on
    the diagonal after the largest half-side of the images."""
    shapes = [_grid(LATENT)] + ([_grid(REFERENCE)] if edit else [])
    images = []
    for frame, (h, w) in enumerate(shapes):
        pos = torch.zeros(h, w, 3)
        pos[..., 0], pos[..., 1], pos[..., 2] = frame, _centred(h)[:, None], _centred(w)[None]
        images.append(pos.reshape(-1, 3))
    start = max(max(h // 2, w // 2) for h, w in shapes)
    text = (start + torch.arange(TOKENS, dtype=torch.float32))[:, None].expand(TOKENS, 3)
    return torch.cat([text, *images])


def _rope(x: torch.Tensor, edit: bool) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of each head (B, heads, N, d) by pos * 10000^(-2i / dim) per axis."""
    pos = _positions(edit)
    angle = torch.cat([pos[:, axis, None].double() / 10000 ** (torch.arange(0, dim, 2).double() / dim)
                       for axis, dim in enumerate(AXES)], dim=-1)
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _heads(x):
    return x.reshape(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def _merge(x):
    return x.transpose(1, 2).flatten(2)


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight


def _lin(x, linear):
    return F.linear(x, linear.weight, linear.bias)


def _block_by_hand(block, recorded, edit: bool) -> dict:
    """One block from its recorded inputs: every suffix of both streams (image ids: the generated image's tokens;
    with the reference, `ref0-` ids: the tokens after them) and the two maps."""
    _args, kwargs = recorded
    x, c, temb = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["temb"]
    n = _grid(LATENT)[0] * _grid(LATENT)[1]
    attn, by = block.attn, {}
    streams = {"img": (x, block.img_mod[1], attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k),
               "txt": (c, block.txt_mod[1], attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                       attn.norm_added_k)}
    for name, (h, mod, to_q, to_k, to_v, nq, nk) in streams.items():
        chunks = [m[:, None] for m in _lin(F.silu(temb), mod).chunk(6, dim=-1)]
        normed = _ln(h) * (1 + chunks[1]) + chunks[0]
        by[name] = dict(h=h, chunks=chunks, n=normed, q=_rms(_heads(_lin(normed, to_q)), nq),
                        k=_rms(_heads(_lin(normed, to_k)), nk), v=_lin(normed, to_v))
    q = _rope(torch.cat([by["txt"]["q"], by["img"]["q"]], dim=2), edit)
    k = _rope(torch.cat([by["txt"]["k"], by["img"]["k"]], dim=2), edit)
    v = _heads(torch.cat([by["txt"]["v"], by["img"]["v"]], dim=1))
    scores = q @ k.transpose(-1, -2) / HEAD_DIM**0.5
    mask = kwargs.get("encoder_hidden_states_mask")
    if mask is not None:  # padded text keys take no part
        scores[..., :TOKENS] = scores[..., :TOKENS].masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = _merge(p @ v)
    attn_out = {"img": _lin(o[:, TOKENS:], attn.to_out[0]), "txt": _lin(o[:, :TOKENS], attn.to_add_out)}
    result = {}
    for name, mlp in (("img", block.img_mlp), ("txt", block.txt_mlp)):
        s = by[name]
        _shift, _scale, gate, shift2, scale2, gate2 = s["chunks"]
        h1 = s["h"] + gate * attn_out[name]
        inner = F.gelu(_lin(_ln(h1) * (1 + scale2) + shift2, mlp.net[0].proj), approximate="tanh")
        whole = {"in": s["h"], "norm-out": s["n"], "q": _merge(s["q"]), "k": _merge(s["k"]), "v": s["v"],
                 "attn-out": attn_out[name], "ffn-inner": inner, "out": h1 + gate2 * _lin(inner, mlp.net[2])}
        for suffix, tensor in whole.items():
            if name == "img":
                result[suffix] = tensor[:, :n]  # the generated image's tokens (a reference's follow them)
                if edit:
                    result[f"ref0-{suffix}"] = tensor[:, n:]
            else:
                result[f"txt-{suffix}"] = tensor
    image_rows = p[:, :, TOKENS:TOKENS + n]
    result["cross-map"], result["self-map"] = image_rows[..., :TOKENS], image_rows[..., TOKENS:TOKENS + n]
    return result


def _as_feature(suffix: str, x: torch.Tensor) -> torch.Tensor:
    """A by-hand tensor in the layout the capture stores: image (B, C, h, w), text (B, C, T), maps as they are."""
    if suffix.endswith("map"):
        return x
    if suffix.startswith("txt-"):
        return x.transpose(1, 2)
    return x.transpose(1, 2).reshape(x.shape[0], -1, *_grid(REFERENCE if suffix.startswith("ref0-") else LATENT))


# ---- ids ----------------------------------------------------------------------------------------------------------
def test_ids_are_every_tensor_of_every_block(captured):
    ids = captured["ids"]
    assert ids[:2] == ["dit-in", "dit-embed"] and ids[-1] == "dit-out"
    want = []
    for b in range(BLOCKS):
        for s in SUFFIXES[:5] + ("maps",) + SUFFIXES[5:]:
            want += [f"vit-block{b}-cross-map", f"vit-block{b}-self-map"] if s == "maps" else \
                [f"vit-block{b}-{s}", f"vit-block{b}-txt-{s}"]
    assert ids[2:-1] == want
    assert enumerate_ids(meta_denoiser("qwen-image"))[-3:] == ["vit-block59-out", "vit-block59-txt-out", "dit-out"]


def test_presets_name_real_ids():
    sweep = resolve_layers("sweep", "qwen-image")
    assert sweep[:2] == ["vit-block5-norm-out", "vit-block5-out"] and sweep[-1] == "vit-block59-out"
    assert len(sweep) == 20 and resolve_layers("legacy", "qwen-image") == ["vit-block59-out"]


# ---- diffusers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["plain", "edit", "masked"])
def test_every_block_id_equals_the_computation_by_hand(qwen, captured, edit_captured, masked_captured, which):
    run = {"plain": captured, "edit": edit_captured, "masked": masked_captured}[which]
    edit = which == "edit"
    f, checked = run["features"], 0
    with torch.no_grad():
        for b in range(BLOCKS):
            by_hand = _block_by_hand(qwen.transformer_blocks[b], run["inputs"][f"transformer_blocks.{b}"], edit)
            for suffix, expected in by_hand.items():
                got, want = f[f"vit-block{b}-{suffix}"], _as_feature(suffix, expected)
                assert got.shape == want.shape, (b, suffix, got.shape, want.shape)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"block {b} {suffix}: {m}")
                checked += 1
    assert checked == len(run["ids"]) - 3 + len(run["refs"])  # the reference's ids on its own 2x4 grid too
    n, r = _grid(LATENT)[0] * _grid(LATENT)[1], _grid(REFERENCE)[0] * _grid(REFERENCE)[1]
    image = {"part": "image", "start": TOKENS, "stop": TOKENS + n, "grid": list(_grid(LATENT))}
    assert run["tokens"] == [{"part": "text", "start": 0, "stop": TOKENS}, image] + (
        [{"part": "ref0", "start": TOKENS + n, "stop": TOKENS + n + r, "grid": list(_grid(REFERENCE))}] if edit else [])


@pytest.mark.parametrize("edit", [False, True], ids=["plain", "edit"])
def test_ends_and_modulation_equal_the_computation_by_hand(qwen, captured, edit_captured, edit):
    run = edit_captured if edit else captured
    f, latent, n = run["features"], _inputs()[0], _grid(LATENT)[0] * _grid(LATENT)[1]
    torch.testing.assert_close(f["dit-in"], latent)  # the generated image's packed tokens unpacked: the latent
    with torch.no_grad():
        embed = _lin(run["kwargs"]["hidden_states"][:, :n], qwen.img_in)
        temb = run["inputs"]["transformer_blocks.1"][1]["temb"]
        modulation = _lin(F.silu(temb), qwen.transformer_blocks[1].img_mod[1])[:, :2 * HEADS * HEAD_DIM]
    torch.testing.assert_close(f["dit-embed"], _as_feature("embed", embed), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(f["dit-out"], _unpack(run["out"][:, :n], *LATENT))  # the pipelines' noise_pred[:, :n]
    torch.testing.assert_close(_pack(f["dit-out"]), run["out"][:, :n])  # the inverse of the packing, channel-wise
    torch.testing.assert_close(f["vit-block1-in:modulation"], modulation, atol=ATOL, rtol=RTOL)  # [shift | scale]


def _feature_heads(feature):
    """A captured (B, C, h, w) or (B, C, T) feature as (B, heads, N, d)."""
    return _heads(feature.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_maps_give_the_attention_output_and_sum_to_one(qwen, captured, masked_captured, masked):
    """cross-map @ text v + self-map @ image v, through the output projection, is attn-out: the maps are the model's
    own probabilities, rotary embedding (and text padding mask) included."""
    f, n = (masked_captured if masked else captured)["features"], _grid(LATENT)[0] * _grid(LATENT)[1]
    for b in range(BLOCKS):
        cross, self_ = f[f"vit-block{b}-cross-map"], f[f"vit-block{b}-self-map"]
        assert cross.shape == (2, HEADS, n, TOKENS) and self_.shape == (2, HEADS, n, n)
        torch.testing.assert_close(cross.sum(-1) + self_.sum(-1), torch.ones(2, HEADS, n), atol=1e-6, rtol=0)
        o = _merge(cross @ _feature_heads(f[f"vit-block{b}-txt-v"]) + self_ @ _feature_heads(f[f"vit-block{b}-v"]))
        with torch.no_grad():
            o = qwen.transformer_blocks[b].attn.to_out[0](o)
        torch.testing.assert_close(o, f[f"vit-block{b}-attn-out"].flatten(2).transpose(1, 2), atol=ATOL, rtol=RTOL)
        if masked:  # the second prompt's two padded tokens get nothing; the first prompt's last two do
            assert not cross[1, :, :, -2:].any() and cross[0, :, :, -2:].min() > 0


def test_the_reference_takes_part_but_is_not_the_image(captured, edit_captured):
    plain, edit = captured["features"], edit_captured["features"]
    assert [k for k in edit if k not in edit_captured["refs"]] == list(plain)
    assert all(edit[k].shape == plain[k].shape for k in plain)
    assert not torch.allclose(edit["vit-block1-out"], plain["vit-block1-out"], atol=1e-3)
    # the reference's keys hold part of each image query's probability: the kept rows sum to less than 1
    assert (edit["vit-block1-cross-map"].sum(-1) + edit["vit-block1-self-map"].sum(-1)).max() < 1 - 1e-3


# ---- native: ComfyUI's own Qwen-Image with the same weights ------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_qwen(qwen):
    import native_comfy as nc

    ns = nc.use_comfy("0.3.64")
    import diffusion_feature.native.comfy_model  # noqa: F401 - registers ComfyUI's Qwen rotary embedding
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    net = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=BLOCKS,
                                      attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                      joint_attention_dim=CTX, axes_dims_rope=AXES, dtype=torch.float32,
                                      operations=ns.ops.disable_weight_init)
    net.load_state_dict(qwen.state_dict(), strict=True)  # the same names: ComfyUI loads diffusers' keys as they are
    yield net.eval()
    nc.release()


@pytest.mark.parametrize("edit", [False, True], ids=["plain", "edit"])
def test_native_ids_equal_diffusers_ids(comfy_qwen, captured, edit_captured, edit):
    run = edit_captured if edit else captured
    ids = enumerate_ids(comfy_qwen)
    assert ids == run["ids"]  # the same ids in the same forward order on both backends
    latent, ctx, ref, t = _inputs()
    refs = {"ref_latents": [ref.unsqueeze(2)]} if edit else {}  # ComfyUI's latents of this model are 5-D
    taps = taps_of(comfy_qwen, ids + run["refs"]) + modulation_taps(comfy_qwen, ids)
    with torch.no_grad(), FeatureCapture(comfy_qwen, taps) as cap:
        out = cap.run(latent.unsqueeze(2), t, ctx, **refs)
    assert cap.token_ranges() == run["tokens"]  # the reference's grid read off its (5-D) latent
    n = _grid(LATENT)[0] * _grid(LATENT)[1]
    torch.testing.assert_close(out[:, :, 0], _unpack(run["out"][:, :n], *LATENT), atol=1e-5, rtol=1e-5)
    assert list(cap.features) == list(run["features"])  # the block inputs' modulations included
    for layer_id, want in run["features"].items():
        got = cap.features[layer_id]
        assert got.shape == want.shape, (layer_id, got.shape, want.shape)
        error = float((got - want).abs().max() / want.abs().max())
        assert error <= 1e-5, f"{layer_id}: relative error {error:.2e}"

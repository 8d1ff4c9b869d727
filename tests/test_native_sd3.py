"""The native backend on ComfyUI's own SD3 / SD3.5 MMDiT (v0.3.64, in-process; the 2024-03 ComfyUI has no SD3).

A tiny SD3.5 medium-kind MODEL of ComfyUI's own model config (a second image attention in block 0, a pre-only text
stream in the last block) is sampled by KSampler's path with the tapped clone: every kept row equals the test's
plain torch hooks on that model call, maps recomputed with torch.softmax over the joint [text, image] q / k (SD3 has
no rotary embedding) and checked against the attention outputs they must reproduce. DFExtractNative is the flow
forward (sigma = t / 1000, the network called at t on its 0-1000 scale); the node's guidance input is not applied
(SD3 has no guidance embedding) and recorded as None.
"""
from __future__ import annotations

import pytest
import torch

import native_comfy as nc
from diffusion_feature.engine.schedule import seeded_eps
from diffusion_feature.layer_catalog import FeatureCapture
from diffusion_feature.native import model_layer_ids, native_family, native_taps
from test_native_dit import CallLog as FluxCallLog
from test_native_dit import _FlatVAE, _rows_of, _zero_hooks, logged_capture

LATENT = (6, 10)  # non-square on purpose: a 3 x 5 token grid
GRID = (LATENT[0] // 2, LATENT[1] // 2)
T_TXT = 5
C = 128  # ComfyUI's MMDiT: 64 channels per head, as many heads as blocks (2)


@pytest.fixture(scope="module")
def sd3():
    ns = nc.use_comfy("0.3.64")
    yield ns, nc.sd3_patcher(ns)
    nc.release()


def _conds(seed=7):
    g = torch.Generator().manual_seed(seed)
    ctx = nc.SD3["context_embedder_config"]["params"]["in_features"]
    cond = lambda: [[torch.randn(1, T_TXT, ctx, generator=g),  # noqa: E731
                     {"pooled_output": torch.randn(1, nc.SD3["adm_in_channels"], generator=g)}]]
    return cond(), cond()


def _grid(tokens):  # (B, N, C) image tokens -> (B, C, h, w)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *GRID)


def _text(tokens):  # (B, T, C) text tokens -> (B, C, T)
    return tokens.transpose(1, 2)


def _heads(feature):  # (B, C, h, w) or (B, C, T) -> (B, heads, N, 64)
    x = feature.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], -1, 64).transpose(1, 2)


def _probs(q, k):  # (B, N, heads, d) each -> (B, heads, Nq, Nk)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


class CallLog(FluxCallLog):
    """The test's own record of each network call (inputs and outputs of named modules) from plain torch hooks."""

    OUTPUTS = ("joint_blocks.0", "joint_blocks.1",
               *(f"joint_blocks.{b}.{s}.{m}" for b in (0, 1) for s in ("x_block", "context_block")
                 for m in ("attn.qkv", "attn.ln_q", "attn.ln_k", "attn.proj", "mlp.act")
                 if not (b == 1 and s == "context_block" and m in ("attn.proj", "mlp.act"))),  # pre-only: none
               *(f"joint_blocks.0.x_block.attn2.{m}" for m in ("qkv", "ln_q", "ln_k", "proj")))
    INPUTS = ("", *OUTPUTS)

    @staticmethod
    def expected(call) -> dict[str, torch.Tensor]:
        """Every id of the tiny model, every row of the call, from the plain hooks."""
        out = {"dit-in": call["in:"][0][0], "dit-embed": _grid(call["in:joint_blocks.0"][0][1]), "dit-out": call[""]}
        for b in (0, 1):
            j = f"joint_blocks.{b}"
            out[f"vit-block{b}-in"] = _grid(call[f"in:{j}"][0][1])
            out[f"vit-block{b}-txt-in"] = _text(call[f"in:{j}"][0][0])
            for prefix, stream, shape in (("", "x_block", _grid), ("txt-", "context_block", _text)):
                s = f"{j}.{stream}"
                out[f"vit-block{b}-{prefix}norm-out"] = shape(call[f"in:{s}.attn.qkv"][0][0])
                out[f"vit-block{b}-{prefix}q"] = shape(call[f"{s}.attn.ln_q"].flatten(2))
                out[f"vit-block{b}-{prefix}k"] = shape(call[f"{s}.attn.ln_k"].flatten(2))
                out[f"vit-block{b}-{prefix}v"] = shape(call[f"{s}.attn.qkv"][..., 2 * C:])
                if f"{s}.attn.proj" in call:
                    out[f"vit-block{b}-{prefix}attn-out"] = shape(call[f"{s}.attn.proj"])
                    out[f"vit-block{b}-{prefix}ffn-inner"] = shape(call[f"{s}.mlp.act"])
            out[f"vit-block{b}-out"] = _grid(call[j][1])
            if b == 0:
                out["vit-block0-txt-out"] = _text(call[j][0])
            # the joint softmax over [text, image] keys; the image queries' rows
            joint = lambda m: torch.cat([call[f"{j}.context_block.attn.{m}"], call[f"{j}.x_block.attn.{m}"]], 1)  # noqa
            p = _probs(joint("ln_q"), joint("ln_k"))[:, :, T_TXT:]
            out[f"vit-block{b}-cross-map"], out[f"vit-block{b}-self-map"] = p[..., :T_TXT], p[..., T_TXT:]
        a2 = "joint_blocks.0.x_block.attn2"
        out.update({"vit-block0-attn2-norm-out": _grid(call[f"in:{a2}.qkv"][0][0]),
                    "vit-block0-attn2-q": _grid(call[f"{a2}.ln_q"].flatten(2)),
                    "vit-block0-attn2-k": _grid(call[f"{a2}.ln_k"].flatten(2)),
                    "vit-block0-attn2-v": _grid(call[f"{a2}.qkv"][..., 2 * C:]),
                    "vit-block0-attn2-self-map": _probs(call[f"{a2}.ln_q"], call[f"{a2}.ln_k"]),
                    "vit-block0-attn2-attn-out": _grid(call[f"{a2}.proj"])})
        return out


def _sample(ns, model, cfg=2.0, steps=2):
    positive, negative = _conds()
    latent = torch.zeros(2, 16, *LATENT)
    noise = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(3))
    return ns.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                            disable_pbar=True)


def test_sd3_ids_shapes_and_every_id_kind_under_ksampler_equal_plain_hooks(sd3):
    """ComfyUI's SD3 network is the sd3 family's, with the ids of its own module tree (block 0's attn2 ids, no text
    output ids for the pre-only last block) and DFShowLayers' shapes at a non-square size (text features and
    cross-map keys at the family's 333 tokens there). KSampler at cfg 2 (cond and uncond batched): every id's every
    kept row equals the test's own hooks on that call, labelled t = 1000 sigma; cross-map @ text v + self-map @
    image v through the output projection is the attention output, attn2's map @ its v its own."""
    from diffusion_feature.layer_catalog import get_family
    from diffusion_feature.native.comfy_model import model_layer_shapes

    ns, model = sd3
    net = model.model.diffusion_model
    ids = model_layer_ids(model)
    assert native_family(model) == "sd3" and ids[0] == "dit-in" and ids[-1] == "dit-out"
    assert len(ids) == len(set(ids)) == 42 and "vit-block0-attn2-self-map" in ids
    assert "vit-block1-txt-q" in ids and not {"vit-block1-txt-out", "vit-block1-txt-attn-out"} & set(ids)
    tokens = get_family("sd3").text_tokens
    shapes = model_layer_shapes(model, LATENT[0] * 8, LATENT[1] * 8)
    assert list(shapes) == ids

    labels, feats, log = logged_capture(model, ids, CallLog, lambda tapped: _sample(ns, tapped), steps="all",
                                        branch="both")
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, b, i) for s in range(2) for b in ("cond", "uncond") for i in range(2)]
    captured = {i: [tokens if d == T_TXT and ("txt-" in i or "cross" in i) and n == len(v.shape) - 2 else d
                    for n, d in enumerate(v.shape[1:])] for i, v in feats.items()}
    assert captured == shapes and shapes["vit-block0-cross-map"] == [2, 15, tokens]
    sigmas = ns.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
    expected = {}
    for n, (lab, call, row) in enumerate(_rows_of(log, labels)):
        assert lab["sigma"] == pytest.approx(float(sigmas[lab["step"]]), rel=1e-6)
        assert lab["timestep"] == pytest.approx(1000 * lab["sigma"], rel=1e-6)
        assert float(call["in:"][0][1][row]) == pytest.approx(lab["timestep"], rel=1e-5)  # SD3's t scale
        want = expected.setdefault(id(call), CallLog.expected(call))
        assert set(want) == set(ids)
        for tid in ids:
            assert torch.allclose(feats[tid][n], want[tid][row], atol=1e-5, rtol=1e-5), (tid, n)
        f = {k: v[n:n + 1] for k, v in feats.items()}
        for b in (0, 1):
            mixed = f[f"vit-block{b}-cross-map"] @ _heads(f[f"vit-block{b}-txt-v"]) + \
                f[f"vit-block{b}-self-map"] @ _heads(f[f"vit-block{b}-v"])
            with torch.no_grad():
                attn = net.joint_blocks[b].x_block.attn.proj(mixed.transpose(1, 2).flatten(2))
            assert torch.allclose(_grid(attn), f[f"vit-block{b}-attn-out"], atol=1e-4), b
        with torch.no_grad():
            attn2 = net.joint_blocks[0].x_block.attn2.proj(
                (f["vit-block0-attn2-self-map"] @ _heads(f["vit-block0-attn2-v"])).transpose(1, 2).flatten(2))
        assert torch.allclose(_grid(attn2), f["vit-block0-attn2-attn-out"], atol=1e-4)


def test_extract_native_on_sd3_is_the_flow_forward_without_guidance(sd3):
    """DFExtractNative on SD3: x_t = (1 - t/1000) x0 + t/1000 eps with the model's own process_in, the network
    called at t on its 0-1000 scale with the prompt's tokens and pooled vector. The guidance input is not applied
    (the network has no guidance embedding: any value gives the same features) and the metadata's guidance is None;
    shift=True takes SD3's own shifted schedule (shift 3: 3 s / (1 + 2 s))."""
    from diffusion_feature.native.extract import extract_native, extract_native_latents

    ns, model = sd3
    net = model.model.diffusion_model
    positive, _ = _conds()
    ids = ["dit-in", "vit-block0-txt-out", "vit-block1-cross-map", "vit-block0-attn2-self-map", "vit-block1-out"]
    latents = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    got = extract_native_latents(model, positive, latents, ids, t=300, seed=9)
    x_t = 0.7 * model.model.process_latent_in(latents) + 0.3 * seeded_eps(latents.shape[1:], 9)
    ctx, extra = positive[0]
    with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "sd3")) as hooks:
        hooks.run(x_t, torch.full((2,), 300.0), context=ctx.expand(2, -1, -1), y=extra["pooled_output"].expand(2, -1))
    for tid in ids:
        assert torch.allclose(got[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    other = extract_native_latents(model, positive, latents, ids, t=300, seed=9, guidance=7.0)
    assert all(torch.equal(other[tid], got[tid]) for tid in ids)
    _zero_hooks(net)

    image = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3, generator=torch.Generator().manual_seed(2))
    size = dict(resize="stretch", size=f"{LATENT[1] * 8}x{LATENT[0] * 8}")
    plain = extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, guidance=7.0, **size)
    assert (plain.meta["family"], plain.meta["t"], plain.meta["sigma"], plain.meta["shift"],
            plain.meta["guidance"]) == ("sd3", 300, 0.3, None, None)
    shifted = extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, shift=True, **size)
    assert shifted.meta["shift"] == 3.0 and shifted.meta["sigma"] == pytest.approx(0.9 / 1.6, rel=1e-6)
    assert not torch.allclose(shifted.tensors[ids[-1]], plain.tensors[ids[-1]], atol=1e-4)


def test_nodes_show_and_map_sd3_features(sd3):
    """DFShowLayers lists the SD3 MODEL's ids with their shapes; DFExtractNative's extraction -> DFAttentionMap,
    the issue's example in-process: the cross-map mask of one token is its heads' mean column, scaled to 0..1,
    on this non-square 3 x 5 grid."""
    from diffusion_feature.nodes.node_hooks import DFShowLayers
    from diffusion_feature.native.extract import extract_native
    from diffusion_feature.nodes.node_visualize import DFAttentionMap

    ns, model = sd3
    h, w = LATENT[0] * 8, LATENT[1] * 8
    text = DFShowLayers().show(model, width=w, height=h)["result"][0]
    assert text.splitlines()[0] == f"# sd3: 42 layer ids at {w}x{h}"
    assert "vit-block1-cross-map  2 x 15 x 333" in text and "vit-block0-attn2-self-map  2 x 15 x 15" in text
    positive, _ = _conds()
    image = torch.rand(2, h, w, 3, generator=torch.Generator().manual_seed(2))
    cross = "vit-block1-cross-map"
    features = extract_native(model, _FlatVAE(), positive, image, cross, t=500, seed=0, resize="stretch",
                              size=f"{w}x{h}")  # the node's own size is the family's 1024
    _, mask = DFAttentionMap().show(features, cross, token_index=3)
    column = features.tensors[cross].mean(dim=1)[:, :, 3].reshape(2, *GRID)
    assert mask.shape == (2, h, w)
    lo, hi = column.amin(dim=(1, 2), keepdim=True), column.amax(dim=(1, 2), keepdim=True)
    cell = h // GRID[0]  # 16 pixels a token; the mask's 2 x 2 pixels around a cell's centre read its value
    centres = mask.reshape(2, GRID[0], cell, GRID[1], cell)[:, :, cell // 2 - 1:cell // 2 + 1, :,
                                                            cell // 2 - 1:cell // 2 + 1].mean(dim=(2, 4))
    assert torch.allclose(centres, (column - lo) / (hi - lo), atol=0.05)
    _zero_hooks(model.model.diffusion_model)

"""The native backend on ComfyUI v0.3.64's NextDiT (Lumina2; in-process; the 2024-03 ComfyUI has no Lumina2).

v0.3.64 builds NextDiT only Lumina2-shaped (none of Z-Image's options, and a Z-Image file is detected as Lumina2 with
Lumina2's widths, so it does not load there); the z-image family reads that network with its ids (refiners, joint
layers; Lumina2 has no pad tokens). A tiny Lumina2 MODEL of ComfyUI's own model config is sampled by ComfyUI's own
sampling code with the tapped clone: every kept row equals the test's plain torch hooks on that call and the
hand-written forward of test_dit_z_image.py recomputed from the call's inputs (maps included). DFExtractNative is the
flow forward at sigma = t / 1000 through ComfyUI's own model call; DFShowLayers' shape pass sizes every id.
"""
from __future__ import annotations

import pytest
import torch

import native_comfy as nc
from diffusion_feature.engine.schedule import seeded_eps
from diffusion_feature.layer_catalog import FeatureCapture, TokenGridError
from diffusion_feature.native import capture_layers, model_layer_ids, native_family, native_taps
from test_dit_sd3 import _as_captured, _close
from test_dit_z_image import LUMINA2, _expected_ids, reference
from test_native_dit import CallLog, _rows_of, _zero_hooks

LATENT = (6, 10)  # non-square: a 3 x 5 token grid
GRID, N = (3, 5), 15
T_TXT = 5


@pytest.fixture(scope="module")
def lumina():
    ns = nc.use_comfy("0.3.64")
    yield ns, nc.lumina2_patcher(ns)
    nc.release()


def _conds(seed=7):
    """Gemma-2's hidden states as ComfyUI's Lumina2 text encoder hands them on: with its attention mask (all ones for
    one prompt), whose sum model_base.Lumina2 passes as num_tokens."""
    g = torch.Generator().manual_seed(seed)
    cond = lambda: [[torch.randn(1, T_TXT, nc.LUMINA2["cap_feat_dim"], generator=g),  # noqa: E731
                     {"attention_mask": torch.ones(1, T_TXT, dtype=torch.long)}]]
    return cond(), cond()


def _sample(ns, model, cfg=2.0, steps=2):
    positive, negative = _conds()
    latent = torch.zeros(2, 16, *LATENT)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    return ns.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                            disable_pbar=True)


class LuminaCallLog(CallLog):
    """Plain torch hooks on ComfyUI's NextDiT: the call's inputs, the last layer's and the refiners' outputs."""

    OUTPUTS = ("x_embedder", "layers.1", "layers.1.attention.q_norm", "layers.1.attention.out",
               "noise_refiner.0", "context_refiner.0")
    INPUTS = ("",)

    @staticmethod
    def hooked(call) -> dict[str, torch.Tensor]:
        """The ids the plain hooks show directly ([text, image] sequence of the joint layers)."""
        grid = lambda x: _as_captured("vit-block1-out", x, GRID)  # noqa: E731
        seq = call["layers.1"]
        return {"dit-in": call["in:"][0][0], "dit-embed": grid(call["x_embedder"]), "dit-out": call[""],
                "vit-block1-out": grid(seq[:, T_TXT:]), "vit-block1-txt-out": seq[:, :T_TXT].transpose(1, 2),
                "vit-block1-q": grid(call["layers.1.attention.q_norm"].flatten(2)[:, T_TXT:]),
                "vit-block1-attn-out": grid(call["layers.1.attention.out"][:, T_TXT:]),
                "vit-refiner0-out": grid(call["noise_refiner.0"]),
                "vit-refiner0-txt-out": call["context_refiner.0"].transpose(1, 2)}

    @staticmethod
    def recomputed(net, call) -> dict[str, torch.Tensor]:
        """Every id from test_dit_z_image's hand-written forward on the call's inputs (Lumina2's settings)."""
        (x, t), kwargs = call["in:"][0][:2], call["in:"][1]
        with torch.no_grad():
            ref = reference(net, x, kwargs["context"], net.t_embedder(1 - t, dtype=torch.float32), LUMINA2, 10000.0)
        return {i: _as_captured(i, v, GRID) for i, v in ref.items()}


def test_lumina2_ids_family_and_show_layers(lumina):
    """A Lumina2 MODEL is read as z-image (ComfyUI's Lumina2 config claims no family of ours; its NextDiT class is
    the z-image family's): refiner ids, joint ids, both maps; DFShowLayers sizes them at a non-square size."""
    from diffusion_feature.nodes.node_hooks import DFShowLayers

    ns, model = lumina
    ids = model_layer_ids(model)
    assert native_family(model) == "z-image"
    assert ids == _expected_ids(1, 2)
    text = DFShowLayers().show(model, width=LATENT[1] * 8, height=LATENT[0] * 8)["result"][0]
    assert text.splitlines()[0] == f"# z-image: {len(ids)} layer ids at {LATENT[1] * 8}x{LATENT[0] * 8}"
    assert f"vit-block0-cross-map  2 x {N} x 512" in text and "vit-refiner0-self-map  2 x 15 x 15" in text
    assert "vit-refiner0-txt-k  64 x 512" in text and "dit-out  16 x 6 x 10" in text


def test_capture_under_ksampler_equals_plain_hooks_and_a_recomputation(lumina):
    """KSampler at cfg 2 (cond and uncond batched): every id of the network (refiners, joint layers, maps, ends),
    every kept row equal to the hand-written forward on that call's inputs, the hooked ones to the plain hooks;
    rows labelled t = 1000 sigma; the memory plan is the kept bytes; the shape pass gives each id's shape."""
    from diffusion_feature.native.comfy_model import model_layer_shapes

    ns, model = lumina
    net = model.model.diffusion_model
    ids = model_layer_ids(model)
    tapped, capture = capture_layers(model, ids, steps="all", branch="both")
    log = LuminaCallLog(net)
    try:
        out = _sample(ns, tapped)
    finally:
        log.close()
    _zero_hooks(net)
    assert out.shape == (2, 16, *LATENT)
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, b, i) for s in range(2) for b in ("cond", "uncond") for i in range(2)]
    assert len(log.calls) == 2  # cond and uncond in one call per step
    expected = {}
    for n, (lab, call, row) in enumerate(_rows_of(log, labels)):
        assert lab["timestep"] == pytest.approx(1000 * lab["sigma"], rel=1e-6)
        hooked, recomputed = expected.setdefault(id(call), (LuminaCallLog.hooked(call),
                                                            LuminaCallLog.recomputed(net, call)))
        for tid in ids:
            _close(feats[tid][n:n + 1], recomputed[tid][row:row + 1], (tid, n))
        for tid, want in hooked.items():
            assert torch.allclose(feats[tid][n], want[row], atol=1e-6, rtol=1e-5), (tid, n)
    rows = feats["vit-block1-cross-map"].sum(-1) + feats["vit-block1-self-map"].sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # no pad token: the rows are whole
    per_row = sum(v[0].numel() * v.element_size() for v in feats.values())
    assert capture.sizes.sample_bytes(LATENT, torch.float32, text_tokens=T_TXT) == per_row
    shapes = model_layer_shapes(model, LATENT[0] * 8, LATENT[1] * 8)
    for tid in ids:
        text_axis = len(feats[tid].shape) - 2 if ("txt-" in tid or "cross" in tid) else None
        assert shapes[tid] == [512 if n == text_axis else d for n, d in enumerate(feats[tid].shape[1:])], tid


def test_extract_native_on_lumina2_is_the_flow_forward_at_t_over_1000(lumina):
    """DFExtractNative on Lumina2: x_t = (1 - t/1000) x0 + t/1000 eps with Flux's latent format, the network called
    through ComfyUI's model call at sigma = t/1000 with the prompt and its token count; shift=True takes the MODEL's
    own schedule (Lumina2's shift 6), so another sigma."""
    from diffusion_feature.native.extract import extract_native_latents

    ns, model = lumina
    net = model.model.diffusion_model
    positive, _ = _conds()
    ids = ["vit-refiner0-txt-out", "vit-block0-cross-map", "vit-block1-out", "dit-out"]
    latents = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    got = extract_native_latents(model, positive, latents, ids, t=300, seed=9)
    x0 = model.model.process_latent_in(latents)
    x_t = 0.7 * x0 + 0.3 * seeded_eps(x0.shape[1:], 9)
    with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "z-image")) as hooks:
        hooks.run(x_t, torch.full((2,), 0.3), context=positive[0][0].expand(2, -1, -1), num_tokens=T_TXT)
    for tid in ids:
        assert torch.allclose(got[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    shifted = extract_native_latents(model, positive, latents, ids[-1:], t=300, seed=9, shift=True)
    assert not torch.allclose(shifted[ids[-1]], got[ids[-1]], atol=1e-4)
    _zero_hooks(net)


def test_fused_qk_norm_reads_q_and_k_from_the_qkv_columns(lumina):
    """Newer ComfyUIs' JointAttention keeps QK-norm as a `qk_norm` flag and, with it set, normalises and rotates q and
    k in a fused kernel that never calls q_norm / k_norm. With that flag on v0.3.64's attentions, the layout reads q,
    k and the maps from the qkv linear's columns, applying the norms' RMSNorm weights itself; v0.3.64 still runs its
    norm modules, so those reads must equal the q_norm / k_norm outputs (and the maps built from them)."""
    from diffusion_feature.native.comfy_model import model_layer_shapes

    ns, model = lumina
    net = model.model.diffusion_model
    ids = ["vit-refiner0-q", "vit-refiner0-k", "vit-refiner0-txt-q", "vit-refiner0-txt-k", "vit-refiner0-self-map",
           "vit-block1-q", "vit-block1-k", "vit-block1-txt-q", "vit-block1-cross-map", "vit-block1-self-map"]
    positive, _ = _conds()
    x = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(4))

    def captured():
        taps = native_taps(ids, net, "z-image")
        with torch.no_grad(), FeatureCapture(net, taps) as hooks:
            hooks.run(x, torch.full((2,), 0.4), context=positive[0][0].expand(2, -1, -1), num_tokens=T_TXT)
        return taps, hooks.features

    def shapes():
        every = model_layer_shapes(model, LATENT[0] * 8, LATENT[1] * 8)
        return {tid: every[tid] for tid in ids}

    modules, want = captured()
    module_shapes = shapes()
    assert {t.module_path.rsplit(".", 1)[-1] for t in modules} == {"q_norm", "k_norm"}
    attentions = [m for m in net.modules() if type(m).__name__ == "JointAttention"]
    for attention in attentions:
        attention.qk_norm = True
    try:
        columns, got = captured()
        assert shapes() == module_shapes  # DFShowLayers' shape pass reads the columns too
    finally:
        for attention in attentions:
            del attention.qk_norm
    assert {t.module_path.rsplit(".", 1)[-1] for t in columns} == {"qkv"}
    assert all(t.norm_path.endswith(".q_norm") or t.norm_path.endswith(".k_norm") for t in columns)
    for tid in ids:
        torch.testing.assert_close(got[tid], want[tid], atol=1e-6, rtol=1e-5, msg=tid)
    _zero_hooks(net)


def test_grouped_query_maps_repeat_each_key_head_for_its_query_heads(lumina):
    """Lumina2 itself has fewer key-value heads than query heads (24 over 8): each key head serves its group of
    consecutive query heads. On a NextDiT of 4 query over 2 key-value heads the maps have the 4 query heads, and the
    attention's output for the image queries (the out projection's input) equals, head by head, cross-map @ txt-v
    + self-map @ v with v's head h // 2: the maps are the probabilities the model attends with."""
    ns, _ = lumina
    model = nc.config_patcher(ns, ns.supported_models.Lumina2(dict(nc.LUMINA2, n_heads=4, n_kv_heads=2,
                                                                   axes_dims=[4, 6, 6])))
    net = model.model.diffusion_model
    ids = ["vit-block1-cross-map", "vit-block1-self-map", "vit-block1-v", "vit-block1-txt-v"]
    positive, _ = _conds()
    x = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    seen = {}
    handle = net.layers[1].attention.out.register_forward_pre_hook(lambda _m, args: seen.update(out_in=args[0]))
    try:
        with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "z-image")) as hooks:
            hooks.run(x, torch.full((1,), 0.4), context=positive[0][0], num_tokens=T_TXT)
    finally:
        handle.remove()
    f = hooks.features
    assert f["vit-block1-self-map"].shape == (1, 4, N, N) and f["vit-block1-cross-map"].shape == (1, 4, N, T_TXT)
    from diffusion_feature.native.comfy_model import model_layer_shapes

    shapes = model_layer_shapes(model, LATENT[0] * 8, LATENT[1] * 8)  # DFShowLayers' pass sizes them alike
    assert shapes["vit-block1-cross-map"][0] == 4 and shapes["vit-block1-v"][0] == 2 * 16
    d = 16
    v = f["vit-block1-v"].reshape(1, 2, d, N).transpose(2, 3)  # (1, kv heads, N, d)
    v_txt = f["vit-block1-txt-v"].reshape(1, 2, d, T_TXT).transpose(2, 3)
    group = torch.arange(4) // 2
    want = f["vit-block1-cross-map"] @ v_txt[:, group] + f["vit-block1-self-map"] @ v[:, group]  # (1, 4, N, d)
    got = seen["out_in"][:, T_TXT:].reshape(1, N, 4, d).transpose(1, 2)
    torch.testing.assert_close(want, got, atol=1e-5, rtol=1e-4)
    _zero_hooks(net)


def test_a_padded_caption_is_split_where_the_network_places_the_image(lumina):
    """v0.3.64's NextDiT keeps the first attention_mask.sum() caption tokens and puts the image right after them. A
    caption padded by 3 tokens with its mask is the same run as the unpadded caption, so every id (text, image,
    maps, refiner text) equals the unpadded run's; captions of two lengths in one batch are refused in one line."""
    ns, model = lumina
    net = model.model.diffusion_model
    ids = ["vit-refiner0-txt-out", "vit-block1-txt-out", "vit-block1-out", "vit-block1-cross-map",
           "vit-block1-self-map", "dit-out"]
    positive, _ = _conds()
    context = positive[0][0]
    padded = torch.cat([context, torch.randn(1, 3, context.shape[2])], dim=1)
    mask = torch.cat([torch.ones(1, T_TXT, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    x = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(6))

    def run(x, context, **extra):
        with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "z-image")) as hooks:
            hooks.run(x, torch.full((x.shape[0],), 0.4), context=context, **extra)
        return hooks.features

    want = run(x, context, num_tokens=T_TXT)
    got = run(x, padded, num_tokens=T_TXT, attention_mask=mask)
    assert got["vit-block1-txt-out"].shape == (1, 64, T_TXT)
    for tid in ids:
        torch.testing.assert_close(got[tid], want[tid], atol=1e-5, rtol=1e-4, msg=tid)
    uneven = torch.cat([mask, torch.cat([torch.ones(1, T_TXT - 1), torch.zeros(1, 4)], dim=1).long()])
    with pytest.raises(TokenGridError, match=f"captions of {T_TXT - 1}, {T_TXT} tokens in one batch"):
        run(x.expand(2, -1, -1, -1), padded.expand(2, -1, -1), num_tokens=T_TXT, attention_mask=uneven)
    _zero_hooks(net)

"""The native backend on ComfyUI's own Qwen-Image (v0.3.64, in-process; the 2024-03 ComfyUI has no Qwen-Image).

A tiny Qwen-Image MODEL of ComfyUI's own model config (flow sampling, the Wan 2.1 latent format's 5-D latents) is
sampled by ComfyUI's own sampling code with the tapped clone: every kept row equals the test's plain torch hooks on
that model call (maps recomputed with torch.softmax over q/k after ComfyUI's rotary embedding, and checked against
the attention output they must reproduce), with and without an Edit reference image in the conditioning (ComfyUI's
ref_latents: image ids stay the generated image's tokens). DFExtractNative's flow semantics (sigma = t / 1000) equal
a hand-run of the network, with an Edit reference, a LoRA weight patch and an InstantX ControlNet as ComfyUI applies
them; the shape pass and the memory plan size every id exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

import native_comfy as nc
from diffusion_feature.engine.schedule import seeded_eps
from diffusion_feature.layer_catalog import FeatureCapture, LayerIdError
from diffusion_feature.native import capture_layers, model_layer_ids, native_family, native_taps
from test_native_dit import CallLog, _merge, _rows_of, _zero_hooks

LATENT = (6, 10)  # non-square on purpose: a 3 x 5 token grid
REFERENCE = (4, 6)  # an Edit reference latent of another size: 2 x 3 tokens after the generated image's 15
T_TXT, HEADS = 5, nc.QWEN["num_attention_heads"]
N = (LATENT[0] // 2) * (LATENT[1] // 2)
B = "vit-block1"  # the second of the 2 blocks: its inputs are the first block's outputs
KINDS = ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")


@pytest.fixture(scope="module")
def qwen():
    ns = nc.use_comfy("0.3.64")
    yield ns, nc.qwen_patcher(ns)
    nc.release()


def _conds(seed=7, reference: bool = False, latents=None):
    """Positive and negative conditionings; reference: an Edit reference latent in both (latents: these instead)."""
    g = torch.Generator().manual_seed(seed)
    if reference and latents is None:
        latents = [torch.randn(1, 16, 1, *REFERENCE, generator=g)]
    extra = {"reference_latents": latents} if latents is not None else {}
    cond = lambda: [[torch.randn(1, T_TXT, nc.QWEN["joint_attention_dim"], generator=g), dict(extra)]]  # noqa: E731
    return cond(), cond()


def _sample(ns, model, cfg=2.0, steps=2, custom=False, reference=False, latents=None):
    """KSampler's path (a 4-D LATENT, which the sampler node makes 5-D as ComfyUI's does) or SamplerCustom's."""
    positive, negative = _conds(reference=reference, latents=latents)
    latent = ns.sample.fix_empty_latent_channels(model, torch.zeros(2, 16, *LATENT))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    if custom:
        sigmas = ns.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        return ns.sample.sample_custom(model, noise, cfg, ns.samplers.sampler_object("euler"), sigmas, positive,
                                       [] if cfg == 1.0 else negative, latent, disable_pbar=True, seed=0)
    return ns.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                            disable_pbar=True)


def _grid(tokens):  # (B, N, C) tokens -> the generated image's (B, C, h, w) (reference tokens follow them)
    tokens = tokens[:, :N]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], LATENT[0] // 2, LATENT[1] // 2)


def _reference(tokens):  # (B, N, C) tokens -> the reference's (B, C, 2, 3): the tokens after the generated image's
    tokens = tokens[:, N:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], REFERENCE[0] // 2, REFERENCE[1] // 2)


def _text(tokens):  # (B, T, C) -> (B, C, T)
    return tokens.transpose(1, 2)


class QwenCallLog(CallLog):
    """Plain torch hooks on the second block of ComfyUI's Qwen-Image, every call recorded."""

    A = "transformer_blocks.1.attn"
    OUTPUTS = ("img_in", "transformer_blocks.1", f"{A}.norm_q", f"{A}.norm_k", f"{A}.norm_added_q",
               f"{A}.norm_added_k", f"{A}.to_v", f"{A}.add_v_proj", f"{A}.to_out.0", f"{A}.to_add_out",
               "transformer_blocks.1.img_mlp.net.0", "transformer_blocks.1.txt_mlp.net.0")
    INPUTS = ("", "transformer_blocks.1", f"{A}.to_q", f"{A}.add_q_proj")

    @classmethod
    def expected(cls, call) -> dict[str, torch.Tensor]:
        """Every id kind of block 1 and the ends, every row of the call, from the plain hooks."""
        from comfy.ldm.qwen_image.model import apply_rotary_emb

        a = cls.A
        txt, img = call["transformer_blocks.1"]
        block_in = call["in:transformer_blocks.1"][1]
        image = {"in": block_in["hidden_states"], "norm-out": call[f"in:{a}.to_q"][0][0],
                 "q": call[f"{a}.norm_q"].flatten(2), "k": call[f"{a}.norm_k"].flatten(2), "v": call[f"{a}.to_v"],
                 "attn-out": call[f"{a}.to_out.0"], "ffn-inner": call["transformer_blocks.1.img_mlp.net.0"],
                 "out": img}
        text = {"in": block_in["encoder_hidden_states"], "norm-out": call[f"in:{a}.add_q_proj"][0][0],
                "q": call[f"{a}.norm_added_q"].flatten(2), "k": call[f"{a}.norm_added_k"].flatten(2),
                "v": call[f"{a}.add_v_proj"], "attn-out": call[f"{a}.to_add_out"],
                "ffn-inner": call["transformer_blocks.1.txt_mlp.net.0"], "out": txt}
        out = {"dit-in": call["in:"][0][0][:, :, 0], "dit-embed": _grid(call["img_in"]), "dit-out": call[""][:, :, 0]}
        out.update({f"{B}-{k}": _grid(v) for k, v in image.items()})
        if call["in:"][1].get("ref_latents"):  # the reference's tokens follow the generated image's
            out.update({f"{B}-ref0-{k}": _reference(v) for k, v in image.items()})
        out.update({f"{B}-txt-{k}": _text(v) for k, v in text.items()})
        # maps: the joint [text, image] softmax after ComfyUI's rotary embedding (on (B, N, heads, d)); the generated
        # image's query rows, text / generated-image key columns
        q = torch.cat([call[f"{a}.norm_added_q"], call[f"{a}.norm_q"]], dim=1)
        k = torch.cat([call[f"{a}.norm_added_k"], call[f"{a}.norm_k"]], dim=1)
        pe = block_in["image_rotary_emb"]
        q, k = (apply_rotary_emb(x, pe).transpose(1, 2) for x in (q, k))
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[:, :, T_TXT:T_TXT + N]
        out[f"{B}-cross-map"], out[f"{B}-self-map"] = p[..., :T_TXT], p[..., T_TXT:T_TXT + N]
        return out


def _heads(feature):  # (B, C, h, w) or (B, C, T) -> (B, heads, N, d)
    x = feature.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def _check_rows(net, log, labels, feats, ids, reference: bool):
    """Every kept row equals the plain hooks' row of its call; the maps give the attention output (their rows sum
    to 1 without a reference, less with one: its keys hold the rest)."""
    expected = {}
    for n, (lab, call, row) in enumerate(_rows_of(log, labels)):
        assert lab["timestep"] == pytest.approx(1000 * lab["sigma"], rel=1e-6)  # the 0-1000 scale
        want = expected.setdefault(id(call), QwenCallLog.expected(call))
        for tid in ids:
            assert feats[tid][n].shape == want[tid][row].shape, tid
            assert torch.allclose(feats[tid][n], want[tid][row], atol=1e-6, rtol=1e-5), (tid, n)
        f = {k: v[n:n + 1] for k, v in feats.items()}
        rows = f[f"{B}-cross-map"].sum(-1) + f[f"{B}-self-map"].sum(-1)
        if reference:  # the reference's keys take part: the kept columns miss their share
            assert rows.max() < 1 - 1e-4
            continue
        mixed = f[f"{B}-cross-map"] @ _heads(f[f"{B}-txt-v"]) + f[f"{B}-self-map"] @ _heads(f[f"{B}-v"])
        with torch.no_grad():
            attn = net.transformer_blocks[1].attn.to_out[0](_merge(mixed))
        assert torch.allclose(_grid(attn), f[f"{B}-attn-out"], atol=1e-5)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_qwen_ids_family_wrong_ids_and_show_layers(qwen):
    from diffusion_feature.nodes.node_hooks import DFShowLayers

    ns, model = qwen
    net = model.model.diffusion_model
    ids = model_layer_ids(model)
    assert native_family(model) == "qwen-image"
    assert len(ids) == len(set(ids)) == 3 + 2 * 18 and ids[:2] == ["dit-in", "dit-embed"] and ids[-1] == "dit-out"
    assert "vit-block1-txt-ffn-inner" in ids and "vit-block0-self-map" in ids
    with pytest.raises(LayerIdError, match="a qwen-image id that .* lacks.*nearest ids of this model: vit-block1-out"):
        native_taps("vit-block9-out", net, "qwen-image")
    text = DFShowLayers().show(model, width=LATENT[1] * 8, height=LATENT[0] * 8)["result"][0]
    assert text.splitlines()[0] == f"# qwen-image: 39 layer ids at {LATENT[1] * 8}x{LATENT[0] * 8}"
    assert f"vit-block0-cross-map  {HEADS} x {N} x 512" in text and "dit-out  16 x 6 x 10" in text
    # reference ids are listed nowhere (a run's references decide which exist): the list's last line says so
    assert text.splitlines()[-1].startswith("# reference images: vit-block{B}-ref{I}-{in|norm-out|q|k|v|attn-out|"
                                            "ffn-inner|out} are block B's image ids on reference image I's tokens")


def test_capture_under_ksampler_equals_plain_hooks_for_every_id_kind(qwen):
    """KSampler's path at cfg 2 (cond and uncond batched): every id kind of a block (both streams, both maps) and the
    ends, every kept row equal to the test's own hooks on that call, labelled t = 1000 sigma; DFCollectFeatures
    reads the image size off the 5-D LATENT; the memory plan is the kept bytes; DFShowLayers' shape pass gives each
    id's captured shape (text ids at the family's 512 tokens there)."""
    from diffusion_feature.layer_catalog import get_family
    from diffusion_feature.native.comfy_model import model_layer_shapes
    from diffusion_feature.native.extract import collect

    ns, model = qwen
    net = model.model.diffusion_model
    ids = ["dit-in", "dit-embed", *(f"{B}-{s}{k}" for k in KINDS for s in ("", "txt-")), f"{B}-cross-map",
           f"{B}-self-map", "dit-out"]
    tapped, capture = capture_layers(model, ids, steps="all", branch="both")
    log = QwenCallLog(net)
    try:
        out = _sample(ns, tapped)
    finally:
        log.close()
    _zero_hooks(net)
    assert out.shape == (2, 16, 1, *LATENT)
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, b, i) for s in range(2) for b in ("cond", "uncond") for i in range(2)]
    _check_rows(net, log, labels, feats, ids, reference=False)
    per_row = sum(v[0].numel() * v.element_size() for v in feats.values())  # the memory plan at the prompt's length
    assert capture.sizes.sample_bytes(LATENT, torch.float32, text_tokens=T_TXT) == per_row
    collected = collect(capture, {"samples": out})  # DFCollectFeatures: the image size from the 5-D LATENT
    assert (collected.meta["height"], collected.meta["width"]) == (LATENT[0] * 8, LATENT[1] * 8)

    tokens = get_family("qwen-image").text_tokens
    shapes = model_layer_shapes(model, LATENT[0] * 8, LATENT[1] * 8)
    assert list(shapes) == model_layer_ids(model)
    for tid in ids:
        text_axis = len(feats[tid].shape) - 2 if ("txt-" in tid or "cross" in tid) else None
        want = [tokens if n == text_axis else d for n, d in enumerate(feats[tid].shape[1:])]
        assert shapes[tid] == want, tid
    assert shapes["dit-in"] == [16, *LATENT] and shapes[f"{B}-cross-map"] == [HEADS, N, tokens]


def test_edit_reference_under_sampler_custom_keeps_image_ids_on_the_generated_grid(qwen):
    """SamplerCustom's path at cfg 1 with an Edit reference image in the conditioning (ComfyUI's reference_latents,
    as TextEncodeQwenImageEdit sets them; the network appends the reference's tokens after the generated image's):
    every id is the generated image's tokens, equal to the plain hooks' first h * w tokens of each call, and every
    reference id (vit-block1-ref0-*) the tokens after them on the reference's own 2 x 3 grid (read off its latent);
    each row's label gives the token ranges."""
    ns, model = qwen
    net = model.model.diffusion_model
    ids = ["dit-in", f"{B}-in", f"{B}-q", f"{B}-txt-k", f"{B}-out", f"{B}-cross-map", f"{B}-self-map", "dit-out",
           *(f"{B}-ref0-{k}" for k in KINDS)]
    tapped, capture = capture_layers(model, ids, steps="last", branch="cond")
    log = QwenCallLog(net)
    try:
        _sample(ns, tapped, cfg=1.0, steps=3, custom=True, reference=True)
    finally:
        log.close()
    _zero_hooks(net)
    call = log.calls[-1]
    ref = call["in:"][1]["ref_latents"]
    assert len(ref) == 1 and call["in:transformer_blocks.1"][1]["hidden_states"].shape[1] == N + 6  # it took part
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"]) for lab in labels] == [(2, "cond")] * 2
    assert feats[f"{B}-self-map"].shape == (2, HEADS, N, N) and feats[f"{B}-out"].shape == (2, 32, 3, 5)
    assert feats[f"{B}-ref0-out"].shape == (2, 32, 2, 3)
    sizes = dict(capture.sizes.shapes)  # the memory plan sizes a reference as if it had the generated image's size
    assert sizes[f"{B}-ref0-out"] == sizes[f"{B}-out"] == (32, 32, 32)
    _check_rows(net, log, labels, feats, ids, reference=True)
    assert all(lab["tokens"] == TOKEN_RANGES for lab in labels)


TOKEN_RANGES = [{"part": "text", "start": 0, "stop": T_TXT},
                {"part": "image", "start": T_TXT, "stop": T_TXT + N, "grid": [LATENT[0] // 2, LATENT[1] // 2]},
                {"part": "ref0", "start": T_TXT + N, "stop": T_TXT + N + 6, "grid": [2, 3]}]


class _FlatVAE:
    """A stand-in for the Wan 2.1 VAE (none can be built small here): the image's 8x8-pooled pixels, repeated to 16
    channels, as ComfyUI's Wan VAE returns them: 5-D (B, 16, 1, h, w)."""

    def spacial_compression_encode(self):  # what a ControlNet asks of its VAE
        return 8

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels[..., :3].permute(0, 3, 1, 2), 8)
        return (torch.cat([x] * 5 + [x[:, :1]], dim=1) * 2 - 1).unsqueeze(2)


def test_extract_native_on_qwen_is_the_flow_forward_at_t_over_1000(qwen):
    """DFExtractNative on Qwen-Image: x_t = (1 - t/1000) x0 + t/1000 eps with the model's own process_in (on its 5-D
    latent: a 4-D LATENT gains the frame axis as in ComfyUI's samplers), the network called at sigma = t/1000 with
    the prompt (and an Edit reference image's latent where the conditioning has one); no guidance input (the
    network has no guidance embedding: metadata None); shift=True takes the MODEL's own shifted schedule
    (QwenImage's ModelSamplingFlux, shift 1.15)."""
    from diffusion_feature.native.extract import extract_native, extract_native_latents

    ns, model = qwen
    net = model.model.diffusion_model
    positive, _ = _conds()
    ids = ["dit-in", f"{B}-txt-out", f"{B}-cross-map", f"{B}-out"]
    latents = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    got = extract_native_latents(model, positive, latents, ids, t=300, seed=9)
    x0 = model.model.process_latent_in(latents.unsqueeze(2))
    x_t = 0.7 * x0 + 0.3 * seeded_eps(x0.shape[1:], 9)
    with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "qwen-image")) as hooks:
        hooks.run(x_t, torch.full((2,), 0.3), context=positive[0][0].expand(2, -1, -1))
    for tid in ids:
        assert torch.allclose(got[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    five = extract_native_latents(model, positive, latents.unsqueeze(2), ids[-1:], t=300, seed=9)
    assert torch.allclose(five[ids[-1]], got[ids[-1]], atol=1e-6)  # a 5-D LATENT is the same latent
    # an Edit conditioning's reference image (TextEncodeQwenImageEdit's reference_latents) takes part as in sampling
    ref = torch.randn(1, 16, 1, *REFERENCE, generator=torch.Generator().manual_seed(6))
    edit = extract_native_latents(model, [[positive[0][0], {"reference_latents": [ref]}]], latents, ids, t=300,
                                  seed=9)
    with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "qwen-image")) as hooks:
        hooks.run(x_t, torch.full((2,), 0.3), context=positive[0][0].expand(2, -1, -1),
                  ref_latents=[model.model.process_latent_in(ref).expand(2, -1, -1, -1, -1)])
    for tid in ids:
        assert torch.allclose(edit[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    assert not torch.allclose(edit[ids[-1]], got[ids[-1]], atol=1e-4)
    _zero_hooks(net)

    image = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3, generator=torch.Generator().manual_seed(2))
    size = dict(resize="stretch", size=f"{LATENT[1] * 8}x{LATENT[0] * 8}")
    plain = extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, **size)
    assert (plain.meta["t"], plain.meta["sigma"], plain.meta["shift"], plain.meta["guidance"]) == (300, 0.3, None, None)
    assert plain.tensors[ids[-1]].shape == (1, 32, 3, 5)
    shifted = extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, shift=True, **size)
    mu = model.get_model_object("model_sampling").shift
    sigma = math.exp(mu) / (math.exp(mu) + 1 / 0.3 - 1)
    assert shifted.meta["shift"] == pytest.approx(1.15) and shifted.meta["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert not torch.allclose(shifted.tensors[ids[-1]], plain.tensors[ids[-1]], atol=1e-4)


def test_reference_ids_in_extract_native_and_their_errors(qwen):
    """DFExtractNative's metadata labels the token ranges (the reference's grid from its latent); a reference id of a
    conditioning without a reference image, and a reference latent of another channel count (an SD latent given
    through ReferenceLatent), each get one line before the network fails (the latter before any model call, in
    DFExtractNative and under a sampler alike)."""
    from diffusion_feature.layer_catalog.hooks import ReferenceImageError
    from diffusion_feature.native.extract import extract_native

    ns, model = qwen
    (edit, _), (plain, _) = _conds(reference=True), _conds()
    image = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3, generator=torch.Generator().manual_seed(2))
    run = dict(t=300, seed=9, resize="stretch", size=f"{LATENT[1] * 8}x{LATENT[0] * 8}")
    got = extract_native(model, _FlatVAE(), edit, image, [f"{B}-ref0-out", f"{B}-out"], **run)
    assert got.tensors[f"{B}-ref0-out"].shape == (1, 32, 2, 3) and got.meta["tokens"] == TOKEN_RANGES
    with pytest.raises(ReferenceImageError, match="^vit-block1-ref0-out: this conditioning carries no reference "
                                                  "image; add one with ReferenceLatent / TextEncodeQwenImageEdit$"):
        extract_native(model, _FlatVAE(), plain, image, [f"{B}-ref0-out"], **run)
    sd_latent = [torch.zeros(1, 4, 8, 8)]
    wrong = (r"^reference image 1 of the positive conditioning is a latent of shape \[1, 4, 8, 8\]: this qwen-image "
             r"model takes 16-channel reference latents .*, padded to a multiple of 2 latent pixels$")
    with pytest.raises(ReferenceImageError, match=wrong):
        extract_native(model, _FlatVAE(), [[plain[0][0], {"reference_latents": sd_latent}]], image, [f"{B}-out"],
                       **run)
    tapped, _capture = capture_layers(model, [f"{B}-out"], steps="last", branch="cond")
    with pytest.raises(ReferenceImageError, match=wrong):
        _sample(ns, tapped, cfg=1.0, custom=True, latents=sd_latent)
    _zero_hooks(model.model.diffusion_model)


def test_extract_native_applies_a_lora_patch_of_the_model(qwen):
    """A LoRA on the MODEL (what LoraLoader adds: a weight patch of the clone) acts in DFExtractNative as in
    sampling: the features are the network's with the patched weight, and the MODEL itself stays unpatched."""
    from diffusion_feature.native.extract import extract_native_latents

    ns, model = qwen
    net = model.model.diffusion_model
    positive, _ = _conds()
    ids = [f"{B}-out"]
    latents = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    key = "transformer_blocks.0.img_mlp.net.2.weight"
    weight = dict(net.named_parameters())[key]
    diff = torch.randn(weight.shape, generator=torch.Generator().manual_seed(8)) * 0.3
    lora = model.clone()
    lora.add_patches({f"diffusion_model.{key}": (diff,)}, 1.0)
    got = extract_native_latents(lora, positive, latents, ids, t=300, seed=9)
    ns.model_management.unload_all_models()  # ComfyUI puts the weights back when it unloads the patched clone
    x0 = model.model.process_latent_in(latents.unsqueeze(2))
    x_t = 0.7 * x0 + 0.3 * seeded_eps(x0.shape[1:], 9)
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(diff)
            with FeatureCapture(net, native_taps(ids, net, "qwen-image")) as hooks:
                hooks.run(x_t, torch.full((1,), 0.3), context=positive[0][0])
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.allclose(got[ids[0]], hooks.features[ids[0]], atol=1e-5, rtol=1e-5)
    plain = extract_native_latents(model, positive, latents, ids, t=300, seed=9)
    assert not torch.allclose(plain[ids[0]], got[ids[0]], atol=1e-3)
    _zero_hooks(net)


def test_extract_native_runs_an_instantx_controlnet_of_the_conditioning(qwen):
    """A Qwen-Image ControlNet (ComfyUI's own InstantX class, built tiny in the shape comfy.controlnet's loader gives
    it) applied to the positive conditioning acts in DFExtractNative as in sampling: its block residuals, times the
    strength, are added to the network's image stream; features equal the network called with the ControlNet's own
    output on the hint's latent, and differ from the run without it."""
    from diffusion_feature.native.extract import extract_native_latents

    ns, model = qwen
    controlnet, formats = nc.comfy_module("comfy.controlnet"), nc.comfy_module("comfy.latent_formats")
    QwenImageControlNetModel = nc.comfy_module("comfy.ldm.qwen_image.controlnet").QwenImageControlNetModel
    net = model.model.diffusion_model
    torch.manual_seed(4)
    control_model = QwenImageControlNetModel(dtype=torch.float32, operations=ns.ops.disable_weight_init, **nc.QWEN)
    with torch.no_grad():
        for p in control_model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    control = controlnet.ControlNet(control_model.eval(), compression_ratio=1, latent_format=formats.Wan21(),
                                    load_device=torch.device("cpu"), extra_conds=[])
    hint = torch.rand(1, 3, LATENT[0] * 8, LATENT[1] * 8, generator=torch.Generator().manual_seed(3))
    vae, strength = _FlatVAE(), 0.7
    positive, _ = _conds()
    controlled = [[positive[0][0], {"control": control.copy().set_cond_hint(hint, strength, (0.0, 1.0), vae=vae)}]]
    ids = [f"{B}-out", "dit-out"]
    latents = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    got = extract_native_latents(model, controlled, latents, ids, t=300, seed=9)
    x0 = model.model.process_latent_in(latents.unsqueeze(2))
    x_t = 0.7 * x0 + 0.3 * seeded_eps(x0.shape[1:], 9)
    sigma = torch.full((1,), 0.3)
    with torch.no_grad():
        hint_latent = formats.Wan21().process_in(vae.encode(hint.movedim(1, -1)))
        residuals = control_model(x_t, sigma, positive[0][0], hint=hint_latent)["input"]
        with FeatureCapture(net, native_taps(ids, net, "qwen-image")) as hooks:
            hooks.run(x_t, sigma, context=positive[0][0], control={"input": [r * strength for r in residuals]})
    for tid in ids:
        assert torch.allclose(got[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    plain = extract_native_latents(model, positive, latents, ids, t=300, seed=9)
    assert not torch.allclose(plain["dit-out"], got["dit-out"], atol=1e-3)
    _zero_hooks(net)

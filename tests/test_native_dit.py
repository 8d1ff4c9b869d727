"""The native backend on ComfyUI's own Flux (v0.3.64, in-process; the 2024-03 ComfyUI has no Flux).

A tiny Flux MODEL of ComfyUI's own model config is sampled by ComfyUI's own sampling code with the tapped clone:
every kept row equals the test's plain torch hooks on that model call (maps recomputed with torch.softmax over q/k
after ComfyUI's rotary embedding, and checked against the attention output they must reproduce). DFExtractNative's
flow semantics (sigma = t / 1000, guidance) equal a hand-run of the network; the shape pass and the memory guard
size DiT taps (text features, joint maps) exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

import native_comfy as nc
from diffusion_feature.engine.schedule import seeded_eps
from diffusion_feature.layer_catalog import FeatureCapture, LayerIdError, residue
from diffusion_feature.native import (NoCaptureError, UnsupportedModelError, capture_layers, model_layer_ids,
                                      native_family, native_taps)

LATENT = (6, 10)  # non-square on purpose: a 3 x 5 token grid
T_TXT = 5
D0, S0 = 0, 2  # the first double block and the first single block (2 double blocks come first)


@pytest.fixture(scope="module")
def flux():
    ns = nc.use_comfy("0.3.64")
    yield ns, nc.flux_patcher(ns)
    nc.release()


def _conds(seed=7):
    g = torch.Generator().manual_seed(seed)
    cond = lambda: [[torch.randn(1, T_TXT, nc.FLUX["context_in_dim"], generator=g),  # noqa: E731
                     {"pooled_output": torch.randn(1, nc.FLUX["vec_in_dim"], generator=g), "guidance": 3.5}]]
    return cond(), cond()


def _sample(ns, model, cfg=2.0, steps=2, custom=False):
    positive, negative = _conds()
    latent = torch.zeros(2, 16, *LATENT)
    noise = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(3))
    if custom:  # SamplerCustom's path: a sampler object and explicit sigmas
        sigmas = ns.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        return ns.sample.sample_custom(model, noise, cfg, ns.samplers.sampler_object("euler"), sigmas, positive,
                                       negative, latent, disable_pbar=True, seed=0)
    return ns.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                            disable_pbar=True)


def _grid(tokens):  # (B, N, C) image tokens -> (B, C, h, w)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], LATENT[0] // 2, LATENT[1] // 2)


def _merge(x):  # (B, heads, N, d) -> (B, N, heads * d)
    return x.transpose(1, 2).flatten(2)


def _copy(x):
    """A copy of a tensor (or a tuple of them): ComfyUI's Flux edits its text stream in place (txt += ...)."""
    if torch.is_tensor(x):
        return x.detach().clone()
    return tuple(_copy(v) for v in x) if isinstance(x, tuple) else x


class CallLog:
    """The test's own record of each network call from plain torch hooks, independent of the engine under test."""

    OUTPUTS = ("img_in", "double_blocks.0", "single_blocks.0", "double_blocks.0.img_attn.norm.query_norm",
               "double_blocks.0.img_attn.norm.key_norm", "double_blocks.0.txt_attn.norm.query_norm",
               "double_blocks.0.txt_attn.norm.key_norm", "double_blocks.0.img_attn.qkv",
               "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_mlp.1",
               "single_blocks.0.norm.query_norm", "single_blocks.0.norm.key_norm")
    INPUTS = ("", "double_blocks.0", "single_blocks.0", "single_blocks.0.linear1")

    def __init__(self, net):
        self.calls, self.handles = [], []
        mods = dict(net.named_modules())
        for name in self.INPUTS:
            self.handles.append(mods[name].register_forward_pre_hook(self._pre(name), with_kwargs=True))
        for name in ("", *self.OUTPUTS):
            self.handles.append(mods[name].register_forward_hook(self._out(name)))

    def _pre(self, name):
        def hook(_m, args, kwargs):
            if name == "":
                self.calls.append({})
            self.calls[-1]["in:" + name] = (_copy(args), {k: _copy(v) for k, v in kwargs.items()})
        return hook

    def _out(self, name):
        def hook(_m, _a, out):
            self.calls[-1][name] = _copy(out)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    @staticmethod
    def expected(call) -> dict[str, torch.Tensor]:
        """The tapped ids of this test, every row of the call, from the plain hooks."""
        from comfy.ldm.flux.math import apply_rope

        c = nc.FLUX["hidden_size"]
        img, txt = call["double_blocks.0"]
        out = {"dit-in": call["in:"][0][0], "dit-embed": _grid(call["img_in"]), "dit-out": call[""],
               f"vit-block{D0}-in": _grid(call["in:double_blocks.0"][1]["img"]),
               f"vit-block{D0}-out": _grid(img), f"vit-block{D0}-txt-out": txt.transpose(1, 2),
               f"vit-block{D0}-q": _grid(_merge(call["double_blocks.0.img_attn.norm.query_norm"])),
               f"vit-block{D0}-txt-v": call["double_blocks.0.txt_attn.qkv"][..., 2 * c:].transpose(1, 2),
               f"vit-block{D0}-attn-out": _grid(call["double_blocks.0.img_attn.proj"]),
               f"vit-block{D0}-txt-ffn-inner": call["double_blocks.0.txt_mlp.1"].transpose(1, 2)}
        joint_in = call["in:single_blocks.0.linear1"][0][0]
        out[f"vit-block{S0}-norm-out"] = _grid(joint_in[:, T_TXT:])
        out[f"vit-block{S0}-txt-norm-out"] = joint_in[:, :T_TXT].transpose(1, 2)
        out[f"vit-block{S0}-out"] = _grid(call["single_blocks.0"][:, T_TXT:])
        out[f"vit-block{S0}-txt-k"] = _merge(call["single_blocks.0.norm.key_norm"])[:, :T_TXT].transpose(1, 2)
        # maps: the joint softmax after ComfyUI's rotary embedding; image-query rows, [text | image] key columns
        joint = lambda a, b: torch.cat([call[a], call[b]], dim=2)  # noqa: E731
        pieces = ((D0, joint("double_blocks.0.txt_attn.norm.query_norm", "double_blocks.0.img_attn.norm.query_norm"),
                   joint("double_blocks.0.txt_attn.norm.key_norm", "double_blocks.0.img_attn.norm.key_norm"),
                   call["in:double_blocks.0"][1]["pe"]),
                  (S0, call["single_blocks.0.norm.query_norm"], call["single_blocks.0.norm.key_norm"],
                   call["in:single_blocks.0"][1]["pe"]))
        for b, q, k, pe in pieces:
            q, k = apply_rope(q, k, pe)
            p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[:, :, T_TXT:]
            out[f"vit-block{b}-cross-map"], out[f"vit-block{b}-self-map"] = p[..., :T_TXT], p[..., T_TXT:]
        return out


def _heads(feature, n=2):  # (B, C, h, w) or (B, C, T) -> (B, heads, N, d)
    x = feature.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)
def _zero_hooks(net):
    assert residue(net) == {"forward_hooks": 0, "forward_pre_hooks": 0}


def logged_capture(model, ids, log_class, run, **capture):
    """(labels, features) that capture_layers(model, ids, **capture) keeps while run(tapped) samples, and the test's
    own call log (log_class) of those calls; no hook is left on the network."""
    net = model.model.diffusion_model
    tapped, kept = capture_layers(model, ids, **capture)
    log = log_class(net)
    try:
        run(tapped)
    finally:
        log.close()
    _zero_hooks(net)
    return (*kept.stacked(), log)


def _rows_of(log, labels):
    """(label, call, row) per captured row: calls are the sampler's steps in order, rows [cond..., uncond...] as
    the call's cond_or_uncond says."""
    out = []
    for lab in labels:
        call = log.calls[lab["step"]]
        cou = call["in:"][1]["transformer_options"]["cond_or_uncond"]
        per = call["in:"][0][0].shape[0] // len(cou)
        out.append((lab, call, cou.index(0 if lab["branch"] == "cond" else 1) * per + lab["image"]))
    return out


def test_flux_ids_family_and_wrong_ids(flux):
    ns, model = flux
    net = model.model.diffusion_model
    ids = model_layer_ids(model)
    assert native_family(model) == "flux"
    assert len(ids) == len(set(ids)) == 2 + 4 * 18 + 1 and ids[0] == "dit-in" and ids[-1] == "dit-out"
    assert "vit-block3-txt-ffn-inner" in ids and "vit-block1-self-map" in ids
    with pytest.raises(LayerIdError, match="a flux id that .* lacks.*nearest ids of this model: vit-block3-out"):
        native_taps("vit-block9-out", net, "flux")
    with pytest.raises(LayerIdError, match="is a layer id of sd15.*nearest"):
        native_taps("up-level1-repeat0-res-out", net, "flux")


def test_capture_under_ksampler_equals_plain_hooks_for_every_id_kind(flux):
    """KSampler's path at cfg 2 (cond and uncond batched): every kept row equals the test's own hooks on that
    call, labelled with its step, sigma, t = 1000 sigma and branch; the maps reproduce the attention output."""
    ns, model = flux
    net = model.model.diffusion_model
    ids = ["dit-in", "dit-embed", f"vit-block{D0}-in",
           f"vit-block{D0}-q", f"vit-block{D0}-v", f"vit-block{D0}-txt-v", f"vit-block{D0}-attn-out",
           f"vit-block{D0}-txt-ffn-inner", f"vit-block{D0}-out", f"vit-block{D0}-txt-out",
           f"vit-block{D0}-cross-map", f"vit-block{D0}-self-map", f"vit-block{S0}-norm-out",
           f"vit-block{S0}-txt-norm-out", f"vit-block{S0}-txt-k", f"vit-block{S0}-out", f"vit-block{S0}-cross-map",
           f"vit-block{S0}-self-map", "dit-out"]
    labels, feats, log = logged_capture(model, ids, CallLog, lambda tapped: _sample(ns, tapped), steps="all",
                                        branch="both")
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, b, i) for s in range(2) for b in ("cond", "uncond") for i in range(2)]
    sigmas = ns.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
    c, expected = nc.FLUX["hidden_size"], {}
    for n, (lab, call, row) in enumerate(_rows_of(log, labels)):
        assert lab["sigma"] == pytest.approx(float(sigmas[lab["step"]]), rel=1e-6)
        assert lab["timestep"] == pytest.approx(1000 * lab["sigma"], rel=1e-6)  # the 0-1000 scale
        want = expected.setdefault(id(call), CallLog.expected(call))
        want[f"vit-block{D0}-v"] = _grid(call["double_blocks.0.img_attn.qkv"][..., 2 * c:])
        for tid in ids:
            assert torch.allclose(feats[tid][n], want[tid][row], atol=1e-6, rtol=1e-5), (tid, n)
        # cross-map @ text v + self-map @ image v, through the output projection, is the block's attention output
        f = {k: v[n:n + 1] for k, v in feats.items()}
        mixed = f[f"vit-block{D0}-cross-map"] @ _heads(f[f"vit-block{D0}-txt-v"]) + \
            f[f"vit-block{D0}-self-map"] @ _heads(f[f"vit-block{D0}-v"])
        with torch.no_grad():
            attn = net.double_blocks[0].img_attn.proj(_merge(mixed))
        assert torch.allclose(_grid(attn), f[f"vit-block{D0}-attn-out"], atol=1e-5)
        rows = f[f"vit-block{S0}-cross-map"].sum(-1) + f[f"vit-block{S0}-self-map"].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_sampler_custom_at_cfg_1_captures_the_cond_branch_only(flux):
    """Flux dev samples at cfg 1: ComfyUI makes no uncond call; 'both' keeps the cond rows, 'uncond' says why it
    has none."""
    ns, model = flux
    net = model.model.diffusion_model
    ids = [f"vit-block{S0}-out", f"vit-block{D0}-txt-out", f"vit-block{S0}-cross-map"]
    tapped, capture = capture_layers(model, ids, steps="last", branch="both")
    log = CallLog(net)
    try:
        _sample(ns, tapped, cfg=1.0, steps=3, custom=True)
    finally:
        log.close()
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"]) for lab in labels] == [(2, "cond")] * 2
    for n, (lab, call, row) in enumerate(_rows_of(log, labels)):
        want = CallLog.expected(call)
        for tid in ids:
            assert torch.allclose(feats[tid][n], want[tid][row], atol=1e-6, rtol=1e-5), (tid, n)
    tapped, capture = capture_layers(model, ids, branch="uncond")
    _sample(ns, tapped, cfg=1.0, steps=2, custom=True)
    with pytest.raises(NoCaptureError, match="cfg 1"):
        capture.stacked()
    _zero_hooks(net)


def _bytes(tensors: dict) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def test_shapes_and_the_memory_guard_size_every_flux_id(flux, monkeypatch):
    """DFShowLayers' fake pass gives every id's captured shape at a non-square size: image features (C, h, w), text
    features (C, T) and maps (heads, image tokens, text / image tokens), T being the family's 512 text tokens there
    (the test's prompts have 5). The capture's plan, at the call's own prompt length, is exactly what the run keeps,
    and one byte less free is refused before the first tapped call."""
    from diffusion_feature.engine import memory_guard
    from diffusion_feature.engine.memory_guard import FeatureMemoryError
    from diffusion_feature.layer_catalog import get_family
    from diffusion_feature.native.comfy_model import model_layer_shapes

    ns, model = flux
    ids = model_layer_ids(model)
    tokens = get_family("flux").text_tokens
    shapes = model_layer_shapes(model, LATENT[0] * 8, LATENT[1] * 8)
    tapped, capture = capture_layers(model, ids, steps="all", branch="both")
    _sample(ns, tapped, steps=2)
    labels, feats = capture.stacked()
    assert list(shapes) == ids
    captured = {i: [tokens if d == T_TXT and ("txt-" in i or "cross" in i) and n == len(v.shape) - 2 else d
                    for n, d in enumerate(v.shape[1:])] for i, v in feats.items()}
    assert captured == shapes
    assert shapes[f"vit-block{S0}-txt-q"] == [16, tokens] and shapes["vit-block0-self-map"] == [2, 15, 15]
    assert shapes["vit-block0-cross-map"] == [2, 15, tokens] and shapes["dit-out"] == [16, *LATENT]

    per_row = _bytes(feats) // len(labels)
    assert capture.sizes.sample_bytes(LATENT, torch.float32, text_tokens=T_TXT) == per_row
    planned = 2 * per_row * len(labels)  # every step's rows, plus DFCollectFeatures' stacked copy
    monkeypatch.setattr(memory_guard, "available_bytes", lambda device, root="/": planned)
    _sample(ns, tapped, steps=2)  # the plan takes the call's own prompt length: 5 tokens, not the family's 512
    monkeypatch.setattr(memory_guard, "available_bytes", lambda device, root="/": planned - 1)
    with pytest.raises(FeatureMemoryError, match=r"^capturing 75 layers at 2 steps of 4 rows at 80x48 .*at most 1 "
                                                 r"capture step fit"):
        _sample(ns, tapped, steps=2)
    assert capture.records == []
    _zero_hooks(model.model.diffusion_model)


class _FlatVAE:
    """A stand-in for a 16-channel VAE (none can be built small here): the image's 8x8-pooled pixels, repeated."""

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels[..., :3].permute(0, 3, 1, 2), 8)
        return torch.cat([x] * 5 + [x[:, :1]], dim=1) * 2 - 1


def test_extract_native_on_flux_is_the_flow_forward_at_t_over_1000(flux, monkeypatch):
    """DFExtractNative on a flow model: x_t = (1 - t/1000) x0 + t/1000 eps with the model's own process_in, the
    network called at sigma = t/1000 with the guidance value asked for; metadata records sigma, shift and guidance;
    shift=True takes the MODEL's own shifted schedule (ModelSamplingFlux: e^mu / (e^mu + 1/s - 1)); the memory guard
    plans text features and cross-maps at the prompt's own length. denoise_from takes flow Euler steps (x0
    predictions of the model's own apply_model) before the capture."""
    from diffusion_feature.engine import memory_guard
    from diffusion_feature.engine.memory_guard import FeatureMemoryError
    from diffusion_feature.native.extract import extract_native, extract_native_latents

    ns, model = flux
    net = model.model.diffusion_model
    positive, _ = _conds()
    ids = ["dit-in", f"vit-block{D0}-txt-out", f"vit-block{S0}-cross-map", "vit-block3-out"]
    latents = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    got = extract_native_latents(model, positive, latents, ids, t=300, seed=9, guidance=2.0)
    x_t = 0.7 * model.model.process_latent_in(latents) + 0.3 * seeded_eps(latents.shape[1:], 9)
    ctx, extra = positive[0]
    with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "flux")) as hooks:
        hooks.run(x_t, torch.full((2,), 0.3), context=ctx.expand(2, -1, -1), y=extra["pooled_output"].expand(2, -1),
                  guidance=torch.full((2,), 2.0))
    for tid in ids:
        assert torch.allclose(got[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    # denoise_from: flow Euler steps on x0 predictions, 500 -> 400 -> 300, then the capture at 300
    denoised = extract_native_latents(model, positive, latents, ids, t=300, seed=9, guidance=2.0,
                                      denoise_from=500, denoise_steps=2)
    cond = dict(c_crossattn=ctx.expand(2, -1, -1), y=extra["pooled_output"].expand(2, -1),
                guidance=torch.full((2,), 2.0))
    x = 0.5 * model.model.process_latent_in(latents) + 0.5 * seeded_eps(latents.shape[1:], 9)
    with torch.no_grad():
        for a, b in ((0.5, 0.4), (0.4, 0.3)):
            x0 = model.model.apply_model(x, torch.full((2,), a), **cond)
            x = x0 + (x - x0) * (b / a)
        with FeatureCapture(net, native_taps(ids, net, "flux")) as hooks:
            hooks.run(x, torch.full((2,), 0.3), context=cond["c_crossattn"], y=cond["y"], guidance=cond["guidance"])
    for tid in ids:
        assert torch.allclose(denoised[tid], hooks.features[tid], atol=1e-5, rtol=1e-5), tid
    assert not torch.allclose(denoised[ids[-1]], got[ids[-1]], atol=1e-4)
    other = extract_native_latents(model, positive, latents, ids[-1:], t=300, seed=9)  # guidance 3.5
    assert not torch.allclose(other[ids[-1]], got[ids[-1]], atol=1e-4)
    _zero_hooks(net)

    image = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3, generator=torch.Generator().manual_seed(2))
    plain = extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, resize="stretch",
                           size=f"{LATENT[1] * 8}x{LATENT[0] * 8}", guidance=2.0)
    assert (plain.meta["t"], plain.meta["sigma"], plain.meta["shift"], plain.meta["guidance"]) == (300, 0.3, None, 2.0)
    shifted = extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, resize="stretch",
                             size=f"{LATENT[1] * 8}x{LATENT[0] * 8}", shift=True)
    mu = model.get_model_object("model_sampling").shift
    sigma = math.exp(mu) / (math.exp(mu) + 1 / 0.3 - 1)
    assert shifted.meta["shift"] == pytest.approx(1.15) and shifted.meta["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert shifted.meta["guidance"] == 3.5
    assert not torch.allclose(shifted.tensors[ids[-1]], plain.tensors[ids[-1]], atol=1e-4)
    with pytest.raises(ValueError, match="guidance must be a number from 0 to 100"):
        extract_native(model, _FlatVAE(), positive, image, ids[-1:], t=300, seed=9, guidance=-1.0)

    # the memory plan (the output and a batch in flight) at the prompt's own 5 tokens is exactly what is kept
    size = dict(resize="stretch", size=f"{LATENT[1] * 8}x{LATENT[0] * 8}")
    kept = extract_native(model, _FlatVAE(), positive, image, ids, t=300, seed=9, **size)
    planned = 2 * sum(v.numel() * v.element_size() for v in kept.tensors.values())
    monkeypatch.setattr(memory_guard, "available_bytes", lambda device, root="/": planned)
    extract_native(model, _FlatVAE(), positive, image, ids, t=300, seed=9, **size)
    monkeypatch.setattr(memory_guard, "available_bytes", lambda device, root="/": planned - 1)
    vae = _FlatVAE()
    monkeypatch.setattr(vae, "encode", lambda *a: pytest.fail("the VAE ran"))
    with pytest.raises(FeatureMemoryError, match="^extracting 4 layers from 1 image of 80x48"):
        extract_native(model, vae, positive, image, ids, t=300, seed=9, **size)


def test_a_flux_network_of_a_non_native_family_is_refused_by_name(flux, monkeypatch):
    """A family that reads ComfyUI's class but is not marked native yet gets the supported-model message; a
    diffusion transformer without example inputs says where they are listed instead of failing in the shape pass."""
    import dataclasses

    from diffusion_feature.layer_catalog.families import FAMILIES, meta
    from diffusion_feature.native.comfy_model import model_layer_shapes

    ns, model = flux
    monkeypatch.setattr(meta, "_COMFY_INPUTS", {})
    with pytest.raises(ValueError, match="no example inputs for ComfyUI's Flux network .*families/meta.py"):
        model_layer_shapes(model, 64, 64)
    monkeypatch.setitem(FAMILIES, "flux", dataclasses.replace(FAMILIES["flux"], native=False))
    with pytest.raises(UnsupportedModelError, match=r"network Flux is not supported .*; flux(, [a-z0-9-]+)*( and "
                                                    r"[a-z0-9-]+)? (are|is) tapped only on DF_MODEL"):
        model_layer_ids(model)


def test_a_network_built_without_its_familys_options_names_what_is_needed(flux):
    """ComfyUI v0.3.64 builds NextDiT only Lumina2-shaped (none of Z-Image's options) and has no Flux.2: a MODEL
    there whose config claims Z-Image / Flux.2 but whose network cannot hold it gets one line naming a newer
    ComfyUI or DF_MODEL. Both cases are model configs named as newer ComfyUIs name them (ZImage, Flux2) around
    v0.3.64's networks (a Lumina2 MODEL itself is tapped: test_native_z_image.py)."""
    ns, _ = flux
    z_image = nc.lumina2_patcher(ns, None, type("ZImage", (ns.supported_models.Lumina2,), {}))
    flux2 = nc.config_patcher(ns, type("Flux2", (ns.supported_models.Flux,), {})(dict(nc.FLUX)), None)
    hint = r"; or load it with DFLoadCheckpoint or DFLoadDiffusers \(DF_MODEL\) to extract its features with the"
    cases = ((z_image, r"ComfyUI's Lumina2 model \(ZImage\) with network NextDiT cannot be tapped natively as "
                       r"z-image: that needs a NextDiT built with Z-Image's options \(ComfyUI's ZImage model, in "
                       r"ComfyUIs newer than v0.3.64\)"),
             (flux2, r"ComfyUI's Flux model \(Flux2\) with network Flux cannot be tapped natively as flux2: that "
                     r"needs ComfyUI's Flux network with Flux.2's shared modulation \(a ComfyUI with Flux.2, newer "
                     r"than v0.3.64\)"))
    for model, message in cases:
        with pytest.raises(UnsupportedModelError, match=f"^{message}{hint} diffusers backend$"):
            model_layer_ids(model)


def test_nodes_show_pca_map_and_save_flux_features(flux, tmp_path, monkeypatch):
    """DFShowLayers lists the MODEL's DiT ids with their shapes; DFFeaturePCA draws a text-token layer as a strip of
    one cell per token (the PCA of its tokens); DFAttentionMap's cross-map mask is the heads' mean column of one
    token, its self-map mask one query point's row, on the 3 x 5 grid of this non-square image; saving keeps text
    features 2-D per sample, and the aggregate layout leaves them out; the picker groups the DiT ids."""
    from diffusion_feature.engine.features_io import load_features
    from diffusion_feature.engine.visualize import pca_rgb
    from diffusion_feature.nodes.node_hooks import DFShowLayers
    from diffusion_feature.nodes.node_native import DFCaptureLayers, DFCollectFeatures
    from diffusion_feature.nodes.node_save import DFSaveFeatures
    from diffusion_feature.nodes.node_visualize import TEXT_CELL, DFAttentionMap, DFFeaturePCA
    from diffusion_feature.nodes.routes import group_of, layers_payload

    monkeypatch.setenv("DF_OUTPUT_DIR", str(tmp_path))
    ns, model = flux
    text = DFShowLayers().show(model, width=LATENT[1] * 8, height=LATENT[0] * 8)["result"][0]
    assert text.splitlines()[0] == f"# flux: 75 layer ids at {LATENT[1] * 8}x{LATENT[0] * 8}"
    assert "vit-block0-cross-map  2 x 15 x 512" in text and "vit-block2-txt-q  16 x 512" in text
    txt, cross, self_map, image = "vit-block1-txt-out", "vit-block3-cross-map", "vit-block3-self-map", "vit-block3-out"
    tapped, capture = DFCaptureLayers().capture(model, "\n".join([txt, cross, self_map, image]), "none", "last",
                                                "cond")
    (features,) = DFCollectFeatures().collect(capture, {"samples": _sample(ns, tapped, cfg=1.0)})
    assert features.tensors[txt].shape == (2, 16, T_TXT)

    (strip,) = DFFeaturePCA().pca(features, txt, joint=True)
    assert tuple(strip.shape) == (2, TEXT_CELL, T_TXT * TEXT_CELL, 3)
    want = pca_rgb([x.unsqueeze(1) for x in features.tensors[txt]], joint=True)
    for n in range(2):
        assert torch.equal((strip[n, ::TEXT_CELL, ::TEXT_CELL] * 255).round().to(torch.uint8),
                           torch.from_numpy(want[n]))
    (grid,) = DFFeaturePCA().pca(features, txt, size="feature grid")
    assert tuple(grid.shape) == (2, 1, T_TXT, 3)

    h, w = LATENT[0] * 8, LATENT[1] * 8
    _, mask = DFAttentionMap().show(features, cross, token_index=3)
    column = features.tensors[cross].mean(dim=1)[:, :, 3].reshape(2, 3, 5)
    assert mask.shape == (2, h, w)
    for n in range(2):  # the brightest cell of the mask is the token's strongest image position
        cell = mask[n].reshape(3, h // 3, 5, w // 5).mean(dim=(1, 3))
        assert int(cell.argmax()) == int(column[n].argmax())
    _, mask = DFAttentionMap().show(features, self_map, query_x=0.9, query_y=0.1)  # the top-right token: 4
    row = features.tensors[self_map].mean(dim=1)[:, 4].reshape(2, 3, 5)
    for n in range(2):
        cell = mask[n].reshape(3, h // 3, 5, w // 5).mean(dim=(1, 3))
        assert int(cell.argmax()) == int(row[n].argmax())
    with pytest.raises(ValueError, match="token index 5 is outside 0..4"):
        DFAttentionMap().show(features, cross, token_index=5)

    saved = DFSaveFeatures().save(features, "flux/rows")["ui"]["features"]
    loaded = [load_features(tmp_path / s["subfolder"] / s["filename"]) for s in saved]
    for n, f in enumerate(loaded):
        assert f.tensors[txt].shape == (1, 16, T_TXT) and torch.equal(f.tensors[txt][0], features.tensors[txt][n])
        assert torch.equal(f.tensors[cross][0], features.tensors[cross][n])
    DFSaveFeatures().save(features, "flux/agg", format="npy", layout="aggregate")
    agg = sorted((tmp_path / "flux").glob("agg*.npy"))
    assert len(agg) == 2 and __import__("numpy").load(agg[0]).shape == (16, 3, 5)  # only the image layer

    assert [group_of(i) for i in ("dit-in", "vit-block2-txt-q", "dit-out")] == ["dit", "vit-block0-3", "dit"]
    payload = layers_payload("flux")
    assert payload["layers"][0] == {"id": "dit-in", "shape": [16, 128, 128], "group": "dit"}
    # Kontext's first reference: each image-stream id of a block has its ref0 twin (maps and text ids none), after
    # the catalog's ids, each shaped as its generated-image id at the catalog's size
    by_id = {x["id"]: x for x in payload["layers"]}
    refs = [x for x in payload["layers"] if x.get("reference") == 0]
    assert payload["layers"][-len(refs):] == refs and len(refs) == 57 * 8
    assert {x["id"] for x in refs} == {f"vit-block{b}-ref0-{s}" for b in range(57) for s in
                                       ("in", "norm-out", "q", "k", "v", "attn-out", "ffn-inner", "out")}
    assert all(x["shape"] == by_id[x["id"].replace("-ref0", "")]["shape"] for x in refs)
    assert refs[0]["group"] == "reference image 0: vit-block0-3 (on its own grid)"
    assert not any("reference" in x for x in layers_payload("z-image")["layers"])  # no reference images there


@pytest.fixture()
def planted(flux, monkeypatch):
    """The ditf preset on the tiny ComfyUI Flux: its first single block's input (Flux.1's is block 28), on a network
    whose image stream carries two massive-activation channels (planted in img_in's bias; restored after)."""
    from diffusion_feature.layer_catalog import resolver

    ns, model = flux
    net = model.model.diffusion_model
    real = resolver.preset_ids
    monkeypatch.setattr(resolver, "preset_ids",
                        lambda family, name: [f"vit-block{S0}-in"] if name == "ditf" else real(family, name))
    bias = net.img_in.bias.detach().clone()
    with torch.no_grad():
        net.img_in.bias[[3, 11]] += torch.tensor([3000.0, -1500.0])
    yield ns, model, net
    with torch.no_grad():
        net.img_in.bias.copy_(bias)


def _ditf_by_hand(block, x, vec):
    """DiTF's feature from the block's own modules: its input (B, N, C) image tokens with channels 3 and 11 zeroed,
    its pre_norm, then its own modulation of vec, as (B, C, h, w)."""
    x = x.clone()
    x[..., [3, 11]] = 0
    mod, _ = block.modulation(vec)
    return _grid((1 + mod.scale) * block.pre_norm(x) + mod.shift)


def test_the_ditf_preset_gives_ditfs_feature_on_comfyuis_flux(planted):
    """DFExtractNative's and DFCaptureLayers' ditf preset: each image's block input with its detected massive
    channels zeroed, then the block's own AdaLN (the block's pre_norm and modulation, run here); other ids as
    captured; feature_resize pools after; the transform and the channels found in the metadata."""
    from diffusion_feature.engine.dit_transforms import apply_ditf
    from diffusion_feature.layer_catalog import modulation_taps
    from diffusion_feature.layer_catalog.hooks import pool_spatial
    from diffusion_feature.native.extract import collect, extract_native, extract_native_latents

    ns, model, net = planted
    positive, _ = _conds()
    ids = [f"vit-block{S0}-in", f"vit-block{D0}-out"]
    latents = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    meta = {}
    got = extract_native_latents(model, positive, latents, f"ditf, {ids[1]}", t=300, seed=9, guidance=2.0,
                                 transform_meta=meta)
    tokens = meta.pop("tokens")  # the call's token ranges: [text | image]
    assert tokens == [{"part": "text", "start": 0, "stop": T_TXT},
                      {"part": "image", "start": T_TXT, "stop": T_TXT + 15, "grid": [LATENT[0] // 2, LATENT[1] // 2]}]
    assert list(got) == ids and meta == {"transform": "ditf", "massive_channels": {ids[0]: [3, 11]}}
    x_t = 0.7 * model.model.process_latent_in(latents) + 0.3 * seeded_eps(latents.shape[1:], 9)
    ctx, extra = positive[0]
    with torch.no_grad(), FeatureCapture(net, native_taps(ids, net, "flux") + modulation_taps(net, ids)) as hooks:
        hooks.run(x_t, torch.full((2,), 0.3), context=ctx.expand(2, -1, -1), y=extra["pooled_output"].expand(2, -1),
                  guidance=torch.full((2,), 2.0))
    for i in range(2):
        want, found = apply_ditf({k: v[i:i + 1] for k, v in hooks.features.items()})
        assert found[ids[0]].channels == (3, 11)
        assert torch.allclose(got[ids[0]][i:i + 1], want[ids[0]], atol=1e-5, rtol=1e-5)
        assert torch.allclose(got[ids[1]][i:i + 1], hooks.features[ids[1]][i:i + 1], atol=1e-6, rtol=1e-5)
    pooled = extract_native_latents(model, positive, latents, "ditf", t=300, seed=9, guidance=2.0,
                                    feature_resize=2)
    assert torch.allclose(pooled[ids[0]], pool_spatial(got[ids[0]], 2), atol=1e-5, rtol=1e-5)

    # DFCaptureLayers -> KSampler -> DFCollectFeatures, and DFExtractNative taking that capture's request
    tapped, capture = capture_layers(model, "ditf", steps="last", branch="cond")
    log = CallLog(net)
    try:
        _sample(ns, tapped)
    finally:
        log.close()
    features = collect(capture)
    assert features.meta["transform"] == "ditf" and features.meta["massive_channels"] == {ids[0]: [3, 11]}
    assert list(features.tensors) == [ids[0]]
    for n, (lab, call, row) in enumerate(_rows_of(log, features.meta["rows"])):
        args, kwargs = call["in:single_blocks.0"]
        with torch.no_grad():
            want = _ditf_by_hand(net.single_blocks[0], args[0][row:row + 1, T_TXT:], kwargs["vec"][row:row + 1])
        assert torch.allclose(features.tensors[ids[0]][n:n + 1], want, atol=1e-5, rtol=1e-5), n
    image = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3, generator=torch.Generator().manual_seed(2))
    native = extract_native(tapped, _FlatVAE(), positive, image, None, t=300, seed=9, resize="stretch",
                            size=f"{LATENT[1] * 8}x{LATENT[0] * 8}")
    assert native.meta["transform"] == "ditf" and native.meta["massive_channels"] == {ids[0]: [3, 11]}
    _zero_hooks(net)

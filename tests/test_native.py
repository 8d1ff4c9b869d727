"""The native backend on ComfyUI's own UNet, on both supported ComfyUI versions (2024-03 and v0.3.64), in-process.

Fidelity: the same tiny weights as a diffusers UNet2DConditionModel and as ComfyUI's UNetModel give every layer id
equal within 1e-5 (float32), maps included. Capture through the MODEL's wrapper during real ComfyUI sampling equals
the test's own plain hooks on each model call, rows labelled as ComfyUI called. No hook survives any run.
"""
from __future__ import annotations

import pytest
import torch

import native_comfy as nc
from diffusion_feature.layer_catalog import FeatureCapture, LayerIdError, family_ids, residue, resolve_taps
from diffusion_feature.native import (NativeLayout, NoCaptureError, UnsupportedModelError, capture_layers,
                                      model_layer_ids, native_family, native_ids, native_taps)

LATENT = (8, 16)  # non-square on purpose
MAP_IDS = ["down-level0-repeat1-vit-block0-self-map", "up-level2-repeat0-vit-block0-cross-map"]
SOME_IDS = ["unet-in", "down-level1-repeat0-res-increment", "mid-vit-block0-out", "up-level1-repeat2-vit-block0-ffn-inner",
            "up-level1-upsampler-out", "unet-out", *MAP_IDS]


@pytest.fixture(scope="module")
def twins():
    return {kind: nc.diffusers_unet(kind) for kind in ("sd15", "sdxl")}


def _inputs(diffusers_unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *LATENT, generator=g)
    ctx = torch.randn(batch, 7, diffusers_unet.config.cross_attention_dim, generator=g)
    t = torch.full((batch,), 421.0)
    kwargs, y = {}, None
    if diffusers_unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(batch, nc.POOLED, generator=g)
        time_ids = torch.tensor([[64.0, 128.0, 0.0, 0.0, 64.0, 128.0]] * batch)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        # the UNet's adm vector, built from diffusers' own time projection (ComfyUI builds it in model_base)
        with torch.no_grad():
            y = torch.cat([pooled, diffusers_unet.add_time_proj(time_ids.flatten()).reshape(batch, -1)], dim=1)
    return x, t, ctx, kwargs, y


def _zero_hooks(module):
    assert residue(module) == {"forward_hooks": 0, "forward_pre_hooks": 0}
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._forward_hooks_with_kwargs and not m._forward_pre_hooks_with_kwargs


# ---- names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_layout_agrees_with_comfyui_unet_to_diffusers(comfy, twins, kind):
    """Our module correspondence, read from the module tree, is the one ComfyUI's weight map uses."""
    unet = nc.comfy_unet(comfy, kind, device="meta")
    layout = NativeLayout(unet)
    mapping = comfy.utils.unet_to_diffusers(dict(nc.CONFIGS[kind]["comfy"]))
    mapping = {d: n for d, n in mapping.items() if n in unet.state_dict()}  # the map also names absent modules
    used = set()
    for dkey, nkey in mapping.items():
        parts = dkey.split(".")
        heads = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in layout.paths]
        if not heads:
            assert parts[0] in ("time_embedding", "add_embedding", "class_embedding", "conv_norm_out"), dkey
            continue
        head = heads[0]
        used.add(head)
        assert nkey.startswith(layout.paths[head] + "."), (dkey, nkey, layout.paths[head])
        if ".attentions." in dkey:  # inside transformers the names match
            assert nkey == layout.paths[head] + dkey[len(head):]
    assert used == set(layout.paths)
    modules = dict(unet.named_modules())
    assert all(p in modules for p in layout.paths.values())
    # a resnet's residual branch: diffusers conv2 <-> out_layers, whose last layer is conv2's twin
    assert layout.native_path("down_blocks.0.resnets.1.conv2") == "input_blocks.2.0.out_layers"
    assert mapping["down_blocks.0.resnets.1.conv2.weight"] == "input_blocks.2.0.out_layers.3.weight"


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_full_size_native_unets_have_their_catalog_ids(comfy, family):
    """ComfyUI's full-size UNets, built on the meta device from ComfyUI's own model configs, enumerate exactly the
    family's catalog ids in catalog order (playground-v2 is the SDXL UNet: the same catalog)."""
    sm = comfy.supported_models
    base = {"sd15": dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2] * 4,
                         channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                         transformer_depth_middle=1, transformer_depth_output=[1] * 9 + [0] * 3),
            "sdxl": dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2] * 3,
                         channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                         transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])}
    cls = {"sd15": sm.SD15, "sd21": sm.SD20, "sdxl": sm.SDXL}[family]
    cfg = dict(base["sdxl" if family == "sdxl" else "sd15"], image_size=32, use_spatial_transformer=True,
               legacy=False, use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)
    cfg.update(cls.unet_config)
    cfg.update(getattr(cls, "unet_extra_config", {}))
    if family == "sdxl":
        cfg["num_classes"] = "sequential"
    unet = comfy.openaimodel.UNetModel(**cfg, dtype=torch.float32, device="meta",
                                       operations=comfy.ops.disable_weight_init)
    assert native_ids(unet) == family_ids(family)
    if family == "sdxl":
        assert family_ids("playground-v2") == family_ids("sdxl")


# ---- fidelity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_every_id_equals_the_diffusers_model(comfy, twins, kind):
    """Same weights, same x_t, t and text: every id of the tiny model equal within 1e-5, maps included."""
    d = twins[kind]
    unet = nc.comfy_unet(comfy, kind, nc.comfy_state_dict(comfy, kind, d.state_dict()))
    ids = native_ids(unet)
    assert len(ids) == len(set(ids)) > 150
    x, t, ctx, kwargs, y = _inputs(d)
    with torch.no_grad():
        with FeatureCapture(d, resolve_taps(ids, d)) as ref:
            ref_out = ref.run(x, t, encoder_hidden_states=ctx, **kwargs).sample
        with FeatureCapture(unet, native_taps(ids, unet)) as hooks:
            out = hooks.run(x, t, context=ctx, y=y)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert list(hooks.features) == ids == list(ref.features)
    for i in ids:
        a, b = hooks.features[i], ref.features[i]
        assert a.shape == b.shape, i
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (i, (a - b).abs().max().item())
    if kind == "sd15":
        assert hooks.features[MAP_IDS[0]].shape == (2, 2, 128, 128)  # (B, heads, Nq, Nk) at 8x16 latents
    _zero_hooks(unet)


def test_maps_are_softmax_of_the_module_q_and_k(comfy, twins):
    """A map is softmax(q k^T / sqrt(d)) per head of that CrossAttention's own to_q / to_k outputs (checked
    against the test's own hooks), and rows sum to one."""
    d = twins["sd15"]
    unet = nc.comfy_unet(comfy, "sd15", nc.comfy_state_dict(comfy, "sd15", d.state_dict()))
    attn = dict(unet.named_modules())["output_blocks.9.1.transformer_blocks.0.attn2"]  # up-level3-repeat0
    seen = {}
    handles = [attn.to_q.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o.clone())),
               attn.to_k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o.clone()))]
    x, t, ctx, _, _ = _inputs(d)
    try:
        with torch.no_grad(), FeatureCapture(unet, native_taps("up-level3-repeat0-vit-block0-cross-map", unet)) as h:
            h.run(x, t, context=ctx)
    finally:
        for handle in handles:
            handle.remove()
    q, k = seen["q"].view(2, -1, attn.heads, 16).transpose(1, 2), seen["k"].view(2, -1, attn.heads, 16).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    got = h.features["up-level3-repeat0-vit-block0-cross-map"]
    assert got.shape == (2, 2, 128, 7)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2, 2, 128), atol=1e-5)
    _zero_hooks(unet)


def test_wrong_ids_and_unsupported_models(comfy, twins):
    d = twins["sd15"]
    unet = nc.comfy_unet(comfy, "sd15", nc.comfy_state_dict(comfy, "sd15", d.state_dict()))
    with pytest.raises(LayerIdError) as e:
        native_taps("up-level4-repeat0-res-out", unet, "sd15")
    assert "up-level3-repeat0-res-out" in str(e.value) and "nearest" in str(e.value)
    with pytest.raises(LayerIdError, match="nearest this UNetModel ids: up-level0-repeat0-vit-block1-out"):
        native_taps("up-level0-repeat0-vit-block2-out", nc.comfy_unet(comfy, "sdxl", device="meta"))

    # a video UNet (SVD's temporal resblocks and transformers) is ComfyUI's UNetModel class, but not ours
    video = dict(nc.CONFIGS["sd15"]["comfy"], use_temporal_resblock=True, use_temporal_attention=True,
                 num_classes="sequential", adm_in_channels=16, extra_ff_mix_layer=True, use_spatial_context=True,
                 merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
                 disable_temporal_crossattention=False, max_ddpm_temb_period=10000)
    video_unet = comfy.openaimodel.UNetModel(**video, dtype=torch.float32, device="meta",
                                             operations=comfy.ops.disable_weight_init)
    video_base = torch.nn.Module()
    video_base.diffusion_model = video_unet
    with pytest.raises(UnsupportedModelError, match="VideoResBlock.*sd15, sd21, sdxl and playground-v2"):
        model_layer_ids(video_base)

    class FluxLike(torch.nn.Module):
        pass

    base = torch.nn.Module()
    base.diffusion_model = FluxLike()
    with pytest.raises(UnsupportedModelError) as e:
        model_layer_ids(base)
    for word in ("FluxLike", "sd15", "sd21", "sdxl", "playground-v2", "DFLoadCheckpoint", "DFLoadDiffusers"):
        assert word in str(e.value)


# ---- capture during ComfyUI sampling ------------------------------------------------------------------------
class CallLog:
    """The test's own record of every diffusion_model call: inputs, and chosen tensors from plain torch hooks
    (independent of the engine under test), plus q/k for one map recomputed with torch.softmax."""

    def __init__(self, unet, paths: dict[str, str], attn_path: str):
        self.calls = []
        modules = dict(unet.named_modules())
        self.handles = [unet.register_forward_pre_hook(self._start, with_kwargs=True)]
        for tid, path in paths.items():
            self.handles.append(modules[path].register_forward_hook(self._keep(tid)))
        attn = modules[attn_path]
        self.heads = attn.heads
        self.handles.append(attn.to_q.register_forward_hook(self._keep("q")))
        self.handles.append(attn.to_k.register_forward_hook(self._keep("k")))

    def _start(self, _m, args, kwargs):
        opts = kwargs.get("transformer_options", {})
        self.calls.append({"x": args[0].clone(), "cond_or_uncond": list(opts.get("cond_or_uncond", [])),
                           "t": (args[1] if len(args) > 1 else kwargs["timesteps"]).clone()})

    def _keep(self, name):
        def hook(_m, _a, out):
            self.calls[-1][name] = out.detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def cross_map(self, call):
        b, n, inner = call["q"].shape
        d = inner // self.heads
        q = call["q"].view(b, n, self.heads, d).transpose(1, 2)
        k = call["k"].view(b, -1, self.heads, d).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)


def _conds(comfy, kind, batch_ctx, pooled=None):
    extra = {} if pooled is None else {"pooled_output": pooled, "width": 128, "height": 64}
    return [[batch_ctx, extra]]


def _sample(comfy, model, kind, steps=3, cfg=2.0, sampler="euler", seed=0, callback=None, two_positives=False):
    g = torch.Generator().manual_seed(7)
    dim = nc.CONFIGS[kind]["comfy"]["context_dim"]
    pos, neg, pos2 = (torch.randn(1, 7, dim, generator=g) for _ in range(3))
    pooled = (torch.randn(1, nc.POOLED, generator=g), torch.randn(1, nc.POOLED, generator=g)) if kind == "sdxl" \
        else (None, None)
    latent = torch.zeros(2, 4, *LATENT)
    noise = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(seed))
    positive = _conds(comfy, kind, pos, pooled[0]) + (_conds(comfy, kind, pos2, pooled[0]) if two_positives else [])
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive,
                               _conds(comfy, kind, neg, pooled[1]), latent, seed=seed, callback=callback,
                               disable_pbar=True)


@pytest.fixture(scope="module")
def patchers(comfy, twins):
    return {kind: nc.model_patcher(comfy, kind, nc.comfy_state_dict(comfy, kind, twins[kind].state_dict()))
            for kind in ("sd15", "sdxl")}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_capture_during_sampling_equals_independent_hooks(comfy, patchers, kind):
    """KSampler-style sampling (cfg 2: cond and uncond batched) with the tapped clone: every kept row equals the
    test's own hook on that model call, labelled with the call's step, sigma, timestep, branch and image."""
    model = patchers[kind]
    unet = model.model.diffusion_model
    layout = NativeLayout(unet)
    spatial = {"down-level1-repeat0-res-out": layout.native_path("down_blocks.1.resnets.0"),
               "unet-out": layout.native_path("conv_out")}
    map_id = "up-level1-repeat0-vit-block0-cross-map"
    attn_path = layout.native_path("up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    tapped, capture = capture_layers(model, [*spatial, map_id], steps="all", branch="both")
    assert native_family(model) == kind
    log = CallLog(unet, spatial, attn_path)
    try:
        _sample(comfy, tapped, kind)
    finally:
        log.close()
    _zero_hooks(unet)
    labels, feats = capture.stacked()
    assert len(log.calls) >= 3
    owner = model.model if comfy.version == "2024-03" else model  # the 2024-03 KSampler takes the BaseModel
    sigmas = comfy.samplers.KSampler(owner, steps=3, device=torch.device("cpu"), sampler="euler",
                                     scheduler="normal").sigmas
    expected_rows = []
    for step, call in enumerate(log.calls):  # one call per step here: both branches batched together
        per = call["x"].shape[0] // len(call["cond_or_uncond"])
        for j, branch in enumerate(call["cond_or_uncond"]):
            for image in range(per):
                expected_rows.append((step, branch, image, call, j * per + image))
    expected_rows.sort(key=lambda r: (r[0], r[1], r[2]))
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, "cond" if b == 0 else "uncond", i) for s, b, i, _, _ in expected_rows]
    assert len(labels) == 3 * 2 * 2
    ms = model.model.model_sampling
    for n, (step, _, _, call, row) in enumerate(expected_rows):
        assert labels[n]["sigma"] == pytest.approx(float(sigmas[step]), rel=1e-5)
        assert labels[n]["timestep"] == pytest.approx(float(ms.timestep(sigmas[step:step + 1])[0]), rel=1e-5)
        assert labels[n]["timestep"] == pytest.approx(float(call["t"][row]), rel=1e-5)
        for tid in spatial:
            assert torch.equal(feats[tid][n], call[tid][row]), (tid, n)
        assert torch.allclose(feats[map_id][n], log.cross_map(call)[row], atol=1e-6)
    # the unet-in tap is what diffusion_model receives: ComfyUI's scaled x, not the sampler's latent
    tapped2, cap2 = capture_layers(model, ["unet-in"], steps="0", branch="cond")
    log = CallLog(unet, {}, attn_path)
    try:
        _sample(comfy, tapped2, kind, steps=2)
    finally:
        log.close()
    labels, feats = cap2.stacked()
    chunk = log.calls[0]["cond_or_uncond"].index(0)  # two images per chunk
    assert torch.equal(feats["unet-in"], log.calls[0]["x"][2 * chunk:2 * chunk + 2])
    _zero_hooks(unet)


def test_steps_branches_and_the_untapped_original(comfy, patchers):
    model = patchers["sd15"]
    unet = model.model.diffusion_model
    tapped, capture = capture_layers(model, ["mid-repeat0-res-out"], steps="every 2", branch="uncond")
    _sample(comfy, tapped, "sd15", steps=5)
    labels = capture.labels()
    assert {lab["branch"] for lab in labels} == {"uncond"}
    assert sorted({lab["step"] for lab in labels}) == [0, 2, 4]
    assert len(labels) == 3 * 2
    # the original MODEL carries nothing of ours and records nothing
    before = [dict(r.labels[0]) for r in capture.records]
    _sample(comfy, model, "sd15", steps=2)
    assert [dict(r.labels[0]) for r in capture.records] == before
    assert "model_function_wrapper" not in model.model_options
    assert not any("diffusion_feature" in str(k) for w in getattr(model, "wrappers", {}).values() for k in w)
    _zero_hooks(unet)
    # 'last' keeps only the final step; a new run replaces the previous run's rows
    tapped, capture = capture_layers(model, ["mid-repeat0-res-out"], steps="last", branch="cond")
    _sample(comfy, tapped, "sd15", steps=4)
    assert [(lab["step"], lab["branch"]) for lab in capture.labels()] == [(3, "cond")] * 2
    _sample(comfy, tapped, "sd15", steps=2)
    assert [(lab["step"], lab["branch"]) for lab in capture.labels()] == [(1, "cond")] * 2
    # cfg 1: ComfyUI may skip the negative branch; cond rows are there either way
    tapped, capture = capture_layers(model, ["mid-repeat0-res-out"], steps="all", branch="cond")
    _sample(comfy, tapped, "sd15", steps=2, cfg=1.0)
    assert [(lab["step"], lab["image"]) for lab in capture.labels()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # a capture whose MODEL never sampled says so
    _, idle = capture_layers(model, ["mid-repeat0-res-out"])
    with pytest.raises(NoCaptureError, match="connect the MODEL output"):
        idle.stacked()


def test_extra_calls_within_a_step_neither_add_nor_shift_rows(comfy, patchers):
    """SAG / PAG call the model again inside a step: first call per (step, branch, conditioning) wins."""
    model = patchers["sd15"]
    base, unet = model.model, model.model.diffusion_model
    tapped, capture = capture_layers(model, ["unet-out"], steps="all", branch="both")
    ctx = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(3))
    sample_sigmas = torch.tensor([2.0, 1.0, 0.0])
    wrapper = (tapped.get_wrappers("apply_model", "diffusion_feature.capture")[0] if hasattr(tapped, "get_wrappers")
               else None)

    def call(x, sigma, cou, uuids):
        opts = {"cond_or_uncond": cou, "sigmas": sigma, "sample_sigmas": sample_sigmas, "uuids": uuids}
        return capture.run_call(unet, x, sigma, opts,
                                lambda: base.apply_model(x, sigma, c_crossattn=ctx[:x.shape[0]],
                                                         transformer_options=opts),
                                base.model_sampling.timestep)

    x = torch.randn(4, 4, *LATENT)
    with torch.no_grad():
        call(x, torch.tensor([2.0] * 4), [1, 0], ["u", "c"])          # the step's own call
        first = dict(capture.records[0].features)
        call(x[:2] * 3, torch.tensor([2.0] * 2), [1], ["u"])            # SAG-like extra uncond call: dropped
        call(x[:2] * 5, torch.tensor([2.0] * 2), [0], ["c"])          # PAG-like extra cond call: dropped
        call(x * 7, torch.tensor([1.0] * 4), [1, 0], ["u", "c"])      # the next step
    assert wrapper is None or wrapper.key == capture.key
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(0, "cond", 0), (0, "cond", 1), (0, "uncond", 0), (0, "uncond", 1),
         (1, "cond", 0), (1, "cond", 1), (1, "uncond", 0), (1, "uncond", 1)]
    assert torch.equal(feats["unet-out"][:2], first["unet-out"][2:4])  # cond rows of the first call
    assert torch.equal(feats["unet-out"][2:4], first["unet-out"][:2])
    _zero_hooks(unet)


def test_multigpu_threads_with_copied_schedules_record_one_run(comfy, patchers):
    """ComfyUI's MultiGPU node: each device runs its own copy of the network, gets its own copy of sample_sigmas on
    every call (equal values, another tensor), and the calls of a step run at once in threads sharing the capture.
    One run is recorded, each row from its own call."""
    import copy
    import threading

    from diffusion_feature.native.capture import OuterSampleWrapper

    model = patchers["sd15"]
    bases = [model.model, copy.deepcopy(model.model)]  # device 0's network, device 1's copy
    logs = [CallLog(base.diffusion_model, {"unet-out": "out.2"}, "middle_block.1.transformer_blocks.0.attn2")
            for base in bases]
    both_inside = threading.Barrier(2, timeout=30)  # each step's two calls run at the same time, taps on

    def meet(*_):
        both_inside.wait()

    probes = [b.diffusion_model.register_forward_pre_hook(meet) for b in bases]
    _, capture = capture_layers(model, ["unet-out"], steps="all", branch="both")
    schedule = [2.0, 1.0, 0.5, 0.0]
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 2, 2, 4, *LATENT, generator=g)  # (step, device, image, ...)
    ctx = torch.randn(2, 7, 32, generator=g)
    errors = []

    def call(device, step):  # device 0 runs the positive prompt, device 1 the negative one
        base, x, sigma = bases[device], xs[step, device], torch.full((2,), schedule[step])
        opts = {"cond_or_uncond": [device], "uuids": ["pu"[device]], "sigmas": sigma,
                "sample_sigmas": torch.tensor(schedule)}
        try:
            with torch.no_grad():
                capture.run_call(base.diffusion_model, x, sigma, opts,
                                 lambda: base.apply_model(x, sigma, c_crossattn=ctx, transformer_options=opts),
                                 base.model_sampling.timestep)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def run():
        for step in range(3):
            threads = [threading.Thread(target=call, args=(device, step)) for device in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    try:
        OuterSampleWrapper(capture.key)(run)
    finally:
        for handle in probes:
            handle.remove()
        for log in logs:
            log.close()
    assert errors == []
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, b, i) for s in range(3) for b in ("cond", "uncond") for i in (0, 1)]
    for n, lab in enumerate(labels):
        device = 0 if lab["branch"] == "cond" else 1
        log_call = logs[device].calls[lab["step"]]  # each device's calls come in step order
        assert torch.equal(feats["unet-out"][n], log_call["unet-out"][lab["image"]])
    for base in bases:
        _zero_hooks(base.diffusion_model)


def test_failed_and_interrupted_calls_leave_no_hooks_and_no_rows(comfy, patchers):
    model = patchers["sd15"]
    unet = model.model.diffusion_model
    tapped, capture = capture_layers(model, ["up-level3-repeat2-vit-out", *MAP_IDS], steps="all", branch="both")
    calls = {"n": 0}

    def boom(h, hsp, transformer_options):
        if transformer_options["block"][1] == 5:
            calls["n"] += 1
            assert residue(unet)["forward_hooks"] > 0  # the failure happens while our hooks are on
            if calls["n"] == 2:
                raise RuntimeError("boom in the middle of the forward")
            if calls["n"] == 3:
                raise comfy.model_management.InterruptProcessingException()
        return h, hsp

    failing = tapped.clone()
    failing.set_model_output_block_patch(boom)
    for expected in (RuntimeError, comfy.model_management.InterruptProcessingException):
        with pytest.raises(expected):
            _sample(comfy, failing, "sd15", steps=3)
        _zero_hooks(unet)
        # only complete calls were kept: the failed one added nothing
        assert all(set(r.features) == set(capture.ids) for r in capture.records)
    assert len(capture.records) == 0  # the third run failed on its first call: a fresh run, nothing kept
    _sample(comfy, tapped, "sd15", steps=2)  # the capture still works afterwards
    assert len(capture.labels()) == 2 * 2 * 2
    _zero_hooks(unet)


def test_other_wrappers_keep_working(comfy, patchers):
    """Another pack's wrapper on the same MODEL runs as before: chained in the 2024-03 slot, beside ours in the
    keyed wrappers of v0.3.64."""
    model = patchers["sd15"]
    seen = []
    other = model.clone()
    if hasattr(other, "add_wrapper_with_key"):
        def theirs(executor, *args, **kwargs):
            seen.append(args[0].shape[0])
            return executor(*args, **kwargs)
        other.add_wrapper_with_key("apply_model", "another.pack", theirs)
    else:
        def theirs(apply_model, args):
            seen.append(args["input"].shape[0])
            return apply_model(args["input"], args["timestep"], **args["c"])
        other.set_model_unet_function_wrapper(theirs)
    reference = _sample(comfy, other, "sd15", steps=2)
    n_plain = len(seen)
    tapped, capture = capture_layers(other, ["mid-vit-out"], steps="all", branch="cond")
    out = _sample(comfy, tapped, "sd15", steps=2)
    assert len(seen) == 2 * n_plain > 0
    assert torch.equal(out, reference)  # taps change nothing in the result
    assert len(capture.labels()) == 4
    _zero_hooks(model.model.diffusion_model)


def test_clones_of_the_tapped_model_share_the_capture_by_key(comfy, patchers):
    """model_options holds only a small wrapper with the capture's key (deep copies of it copy no tensors); a
    clone of the tapped MODEL (LoraLoader, another patch) records into the same capture; once the capture is
    dropped, the tapped MODEL records nothing and hooks nothing."""
    import copy
    import gc

    from diffusion_feature.native.capture import lookup

    model = patchers["sd15"]
    tapped, capture = capture_layers(model, ["mid-vit-out"], steps="all", branch="cond")
    _sample(comfy, tapped, "sd15", steps=2)
    options = copy.deepcopy(tapped.model_options)
    tensors = [v for v in _walk(options) if isinstance(v, torch.Tensor)]
    assert tensors == []
    wrapper = (options["model_function_wrapper"] if comfy.version == "2024-03"
               else tapped.get_wrappers("apply_model", "diffusion_feature.capture")[0])
    assert wrapper.key == capture.key and lookup(wrapper.key) is capture
    again = tapped.clone()
    again.set_model_output_block_patch(lambda h, hsp, transformer_options: (h, hsp))
    _sample(comfy, again, "sd15", steps=3)
    assert sorted({lab["step"] for lab in capture.labels()}) == [0, 1, 2]
    key = capture.key
    del capture
    gc.collect()
    assert lookup(key) is None
    seen = []
    unet = model.model.diffusion_model
    probe = unet.register_forward_pre_hook(lambda m, a: seen.append(residue(unet)["forward_hooks"]))
    try:
        _sample(comfy, tapped, "sd15", steps=2)
    finally:
        probe.remove()
    assert seen and set(seen) == {0}
    _zero_hooks(unet)


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v)
    else:
        yield value
        if hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
            yield from _walk(vars(value))


def test_the_native_package_imports_without_comfyui():
    import subprocess
    import sys

    code = ("import sys, diffusion_feature.native as n; n.capture_layers; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server', 'execution')]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_branches_in_separate_calls_label_like_one_batched_call(comfy, patchers, monkeypatch):
    """Under memory pressure ComfyUI runs cond and uncond in separate calls: the rows, labels and features are
    those of the batched run."""
    model = patchers["sd15"]
    ids = ["up-level2-repeat1-vit-block0-cross-q", "down-level0-repeat0-vit-block0-self-map"]
    tapped, batched = capture_layers(model, ids, steps="all", branch="both")
    _sample(comfy, tapped, "sd15", steps=2)
    calls = []
    original = model.model.memory_required
    monkeypatch.setattr(model.model, "memory_required", lambda *a, **k: (calls.append(1), 1e30)[1])
    tapped, split = capture_layers(model, ids, steps="all", branch="both")
    _sample(comfy, tapped, "sd15", steps=2)
    monkeypatch.setattr(model.model, "memory_required", original)
    assert calls and split.model_calls == 2 * batched.model_calls == 4
    (la, fa), (lb, fb) = batched.stacked(), split.stacked()
    assert la == lb and len(la) == 2 * 2 * 2
    for i in ids:
        assert torch.allclose(fa[i], fb[i], atol=1e-5)
    _zero_hooks(model.model.diffusion_model)


def test_two_positive_conditionings_and_multi_evaluation_samplers(comfy, patchers):
    model = patchers["sd15"]
    tapped, capture = capture_layers(model, ["mid-vit-out"], steps="all", branch="cond")
    _sample(comfy, tapped, "sd15", steps=2, two_positives=True)
    assert [(lab["step"], lab["cond_index"], lab["image"]) for lab in capture.labels()] == \
        [(s, c, i) for s in range(2) for c in range(2) for i in range(2)]
    # heun calls the model twice per step (but the last): still one row per step, branch and image; by the
    # documented sigma rule, steps 0, 1, 2 are calls 0, 1 (step 0's correction at sigma 1) and 3
    unet = model.model.diffusion_model
    tapped, capture = capture_layers(model, ["mid-vit-out"], steps="all", branch="both")
    log = CallLog(unet, {"mid-vit-out": NativeLayout(unet).native_path("mid_block.attentions.0")},
                  "middle_block.1.transformer_blocks.0.attn1")
    try:
        _sample(comfy, tapped, "sd15", steps=3, sampler="heun")
    finally:
        log.close()
    assert capture.model_calls == len(log.calls) == 5
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"], lab["image"]) for lab in labels] == \
        [(s, b, i) for s in range(3) for b in ("cond", "uncond") for i in range(2)]
    for n, lab in enumerate(labels):
        call = log.calls[[0, 1, 3][lab["step"]]]
        row = 2 * call["cond_or_uncond"].index(0 if lab["branch"] == "cond" else 1) + lab["image"]
        assert torch.equal(feats["mid-vit-out"][n], call["mid-vit-out"][row])
    # a capture list naming steps the run never had: the image samples, collecting says why
    tapped, capture = capture_layers(model, ["mid-vit-out"], steps="0, 7", branch="cond")
    _sample(comfy, tapped, "sd15", steps=3)
    with pytest.raises(ValueError, match="capture step 7 is outside 0..2 for a run of 3 steps"):
        capture.stacked()
    _zero_hooks(model.model.diffusion_model)


def test_direct_call_hooks_with_early_exit(comfy, patchers):
    """One forward through ComfyUI's own apply_model (DFExtractNative's path): the hooks stop the UNet after the
    last requested tap, the features equal a full forward's, and nothing stays on the module."""
    model = patchers["sd15"]
    base, unet = model.model, model.model.diffusion_model
    ids = ["down-level1-repeat1-vit-block0-self-k", "unet-in"]
    g = torch.Generator().manual_seed(5)
    x, ctx, sigma = torch.randn(2, 4, *LATENT, generator=g), torch.randn(2, 7, 32, generator=g), torch.full((2,), 3.0)
    fired = []
    probe = dict(unet.named_modules())["output_blocks.0.0"].register_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            with FeatureCapture(unet, native_taps(ids, unet), early_exit=True) as early:
                assert early.call(base.apply_model, x, sigma, c_crossattn=ctx) is None
            assert not fired  # stopped in the down path
            with FeatureCapture(unet, native_taps(ids, unet)) as full:
                out = full.call(base.apply_model, x, sigma, c_crossattn=ctx)
    finally:
        probe.remove()
    assert out is not None and fired
    for i in ids:
        assert torch.equal(early.features[i], full.features[i])
    scale = (sigma[0] ** 2 + 1) ** 0.5  # the UNet's input is ComfyUI's x / sqrt(1 + sigma^2)
    assert torch.allclose(early.features["unet-in"], x / scale, atol=1e-6)
    _zero_hooks(unet)


def test_both_backends_capture_through_the_one_core(comfy, patchers, sd15, monkeypatch):
    """DFExtractFeatures' engine on a diffusers UNet and DFCaptureLayers' sampling on ComfyUI's UNetModel attach the
    very same FeatureCapture (one tap type, one hook set), only at each network's own module paths."""
    from diffusion_feature.engine.extraction import extract
    from diffusion_feature.layer_catalog.tap import Tap

    attached = []
    original = FeatureCapture._attach

    def spy(self, hooks):
        attached.append((type(self).__name__, type(self.model).__name__, {type(t) for t in self.taps}))
        return original(self, hooks)

    monkeypatch.setattr(FeatureCapture, "_attach", spy)
    ids = ["down-level1-repeat0-vit-block0-cross-map", "mid-repeat0-res-out"]
    extract(sd15, torch.rand(1, 64, 64, 3), "a cat", ids, t=50)
    tapped, capture = capture_layers(patchers["sd15"], ids, steps="all", branch="cond")
    _sample(comfy, tapped, "sd15", steps=1)
    assert capture.stacked()[1]["mid-repeat0-res-out"].shape[0] == 2
    assert {a[1] for a in attached} == {"UNet2DConditionModel", "UNetModel"}
    assert all(a[0] == "FeatureCapture" and a[2] == {Tap} for a in attached)


# ---- PixArt: ComfyUI's own PixArt exists from ComfyUI 2024-11 on, so these run on v0.3.64 ---------------------
@pytest.fixture(scope="module")
def comfy_new():
    yield nc.use_comfy("0.3.64")
    nc.release()


def test_pixart_every_id_equals_the_diffusers_model(comfy_new):
    """ComfyUI's PixArt fuses q/k/v (qkv) and cross k/v (kv_linear): slices of those outputs and maps built from
    them equal diffusers' to_q/to_k/to_v outputs and probabilities, every id within 1e-5; the ids are the
    pixart-sigma grammar (its catalog's, for this depth)."""
    d = nc.diffusers_pixart()
    net = nc.comfy_pixart(comfy_new, d)
    ids = native_ids(net)
    assert ids == [i for i in family_ids("pixart-sigma") if int(i.split("-")[1][5:]) < 3]
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, nc.PIXART_TOKENS, 12, generator=g), \
        torch.full((2,), 421.0)
    with torch.no_grad():
        with FeatureCapture(d, resolve_taps(ids, d)) as ref:
            ref.run(x, encoder_hidden_states=ctx, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        with FeatureCapture(net, native_taps(ids, net, "pixart-sigma")) as hooks:
            hooks.run(x, t, ctx)
    assert list(hooks.features) == ids
    for i in ids:
        a, b = hooks.features[i], ref.features[i]
        assert a.shape == b.shape, i
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (i, (a - b).abs().max().item())
    assert hooks.features["vit-block1-cross-map"].shape == (2, 2, 1024, nc.PIXART_TOKENS)
    assert hooks.features["vit-block0-self-q"].shape == (2, 16, 32, 32)
    _zero_hooks(net)


def test_pixart_full_size_ids_are_the_catalog(comfy_new):
    import comfy.ldm.pixart.pixartms as pixartms

    net = pixartms.PixArtMS(input_size=128, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                            caption_channels=4096, pe_interpolation=2.0, micro_condition=False, model_max_length=300,
                            dtype=torch.float32, device="meta", operations=comfy_new.ops.disable_weight_init)
    assert native_ids(net) == family_ids("pixart-sigma")


def test_pixart_capture_during_sampling_equals_independent_hooks(comfy_new):
    d = nc.diffusers_pixart()
    model = nc.pixart_patcher(comfy_new, nc.comfy_pixart(comfy_new, d).state_dict(), d)
    assert native_family(model) == "pixart-sigma"
    net = model.model.diffusion_model
    tapped, capture = capture_layers(model, ["vit-block1-out", "vit-block2-self-k"], steps="all", branch="both")
    calls = []
    modules = dict(net.named_modules())
    handles = [net.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append({"cou": list(kwargs["transformer_options"]["cond_or_uncond"])})
        if "transformer_options" in kwargs else calls.append({"cou": None}), with_kwargs=True)]
    handles.append(modules["blocks.1"].register_forward_hook(lambda m, a, o: calls[-1].__setitem__("out", o.clone())))
    handles.append(modules["blocks.2.attn.qkv"].register_forward_hook(
        lambda m, a, o: calls[-1].__setitem__("k", o[..., 16:32].clone())))
    g = torch.Generator().manual_seed(7)
    pos, neg = torch.randn(1, nc.PIXART_TOKENS, 12, generator=g), torch.randn(1, nc.PIXART_TOKENS, 12, generator=g)
    try:
        comfy_new.sample.sample(tapped, torch.randn(1, 4, 64, 64, generator=g), 2, 3.0, "euler", "normal",
                                [[pos, {}]], [[neg, {}]], torch.zeros(1, 4, 64, 64), seed=0, disable_pbar=True)
    finally:
        for h in handles:
            h.remove()
    _zero_hooks(net)
    labels, feats = capture.stacked()
    assert [(lab["step"], lab["branch"]) for lab in labels] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    grid = lambda t: t.transpose(0, 1).reshape(-1, 32, 32)
    for n, lab in enumerate(labels):
        call = calls[lab["step"]]
        row = call["cou"].index(0 if lab["branch"] == "cond" else 1)
        assert torch.equal(feats["vit-block1-out"][n], grid(call["out"][row]))
        assert torch.equal(feats["vit-block2-self-k"][n], grid(call["k"][row]))

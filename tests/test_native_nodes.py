"""The native nodes (DFCaptureLayers, DFCollectFeatures, DFExtractNative) and DFExtractNative's engine, in-process
on both supported ComfyUI versions (tests/native_comfy.py), with tiny MODELs of ComfyUI's own model configs.

Fidelity: DFExtractNative's engine on a native MODEL equals engine.extraction on the same weights as a diffusers
UNet, for every id (maps included) within 1e-5 in float32, given the same x0, t, seed, text embedding and noise
schedule (the MODEL's own); with denoise_from too. The node faces run end to end through ComfyUI's own sampling
(comfy.sample.sample, what KSampler calls) and ComfyUI's VAE. No hook survives any run, failed ones included.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import native_comfy as nc
from diffusion_feature.engine.conditioning import Conditioning, with_time_ids
from diffusion_feature.engine.extraction import extract_latents
from diffusion_feature.engine.features_io import load_features
from diffusion_feature.layer_catalog import LayerIdError, residue
from diffusion_feature.native import NoCaptureError, UnsupportedModelError, capture_layers, native_ids
from diffusion_feature.native.extract import extract_native_latents
from diffusion_feature.nodes import NODE_CLASS_MAPPINGS
from diffusion_feature.nodes.node_native import DFCaptureLayers, DFCollectFeatures, DFExtractNative
from diffusion_feature.nodes.node_save import DFSaveFeatures
from diffusion_feature.nodes.prompt_graph import conditioning_text
from diffusion_feature.nodes.node_visualize import DFAttentionMap, DFFeaturePCA, DFSelfAttentionPCA
from test_native import LATENT, CallLog, _sample, _zero_hooks

SCALE = 0.18215  # SD1.x latent_format.scale_factor (SDXL has its own: see _scale)


@pytest.fixture(scope="module")
def twins():
    return {kind: nc.diffusers_unet(kind, as_model=True) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def models(comfy, twins):
    return {kind: nc.model_patcher(comfy, kind, nc.comfy_state_dict(comfy, kind, twins[kind].state_dict()))
            for kind in ("sd15", "sdxl")}


def _scale(model) -> float:
    return float(model.model.latent_format.scale_factor)


def _inputs(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, *LATENT, generator=g)  # as the denoiser sees it (after process_in)
    ctx = torch.randn(1, 7, nc.CONFIGS[kind]["comfy"]["context_dim"], generator=g)
    pooled = torch.randn(1, nc.POOLED, generator=g) if kind == "sdxl" else None
    return x0, ctx, pooled


def _both_conditionings(kind, ctx, pooled):
    """The same prompt for both paths: ComfyUI's CONDITIONING (SDXL's size conditioning comes from the latent size)
    and the DF path's Conditioning (time_ids from the same size)."""
    if kind == "sd15":
        return [[ctx, {}]], Conditioning(ctx)
    h, w = LATENT[0] * 8, LATENT[1] * 8
    return [[ctx, {"pooled_output": pooled}]], with_time_ids(Conditioning(ctx, {"text_embeds": pooled}), h, w)


def _model_abar(model) -> torch.Tensor:
    """abar_t of the MODEL's own schedule (sigma_t = sqrt((1 - abar_t) / abar_t)), for the diffusers reference."""
    return 1.0 / (1.0 + model.model.model_sampling.sigmas.double() ** 2)


def _assert_close(native: dict, ref: dict, ids: list[str]):
    assert list(native) == ids == list(ref)
    for i in ids:
        a, b = native[i], ref[i]
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (i, (a - b).abs().max().item())


# ---- fidelity of DFExtractNative's engine ---------------------------------------------------------------------
def test_both_backends_extract_through_one_driver():
    """DFExtractFeatures' and DFExtractNative's engines share the driver's loop: validation, the ensemble of seeded
    draws, batching into one output and the metadata (engine/driver.py), and the noise draw (schedule.seeded_eps)."""
    from diffusion_feature.engine import driver, extraction, schedule
    from diffusion_feature.native import extract as native_extract

    for name in ("check_ensemble", "capture_dtype", "ensemble_features", "fill_batches", "features_meta"):
        assert getattr(native_extract, name) is getattr(extraction, name) is getattr(driver, name), name
    assert native_extract.seeded_eps is schedule.seeded_eps


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_extract_native_equals_the_diffusers_path_for_every_id(comfy, twins, models, kind):
    model = models[kind]
    ids = native_ids(model.model.diffusion_model)
    assert len(ids) > 150 and any(i.endswith("-map") for i in ids)
    x0, ctx, pooled = _inputs(kind)
    native_cond, df_cond = _both_conditionings(kind, ctx, pooled)
    native = extract_native_latents(model, native_cond, x0 / _scale(model), ids, t=421, seed=3)
    ref = extract_latents(twins[kind], x0, df_cond, ids, 421, 3, _model_abar(model), family=kind)
    _assert_close(native, ref, ids)
    _zero_hooks(model.model.diffusion_model)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_denoise_from_equals_the_diffusers_ddim_steps(comfy, twins, models, kind):
    """denoise_from 60 -> t 50 in two steps: ComfyUI's calls with our Euler-in-sigma steps are DDIM's steps."""
    model = models[kind]
    ids = ["down-level1-repeat0-res-out", "up-level1-repeat0-vit-block0-cross-map", "unet-in", "unet-out"]
    x0, ctx, pooled = _inputs(kind, seed=1)
    native_cond, df_cond = _both_conditionings(kind, ctx, pooled)
    native = extract_native_latents(model, native_cond, x0 / _scale(model), ids, t=50, seed=4, denoise_from=60,
                                    denoise_steps=2)
    ref = extract_latents(twins[kind], x0, df_cond, ids, 50, 4, _model_abar(model), family=kind, denoise_from=60,
                          denoise_steps=2)
    _assert_close(native, ref, ids)
    plain = extract_native_latents(model, native_cond, x0 / _scale(model), ids, t=50, seed=4)
    assert not torch.allclose(plain["unet-in"], native["unet-in"])  # the steps moved x_t
    _zero_hooks(model.model.diffusion_model)


def test_ensemble_feature_resize_dtype_and_offload(comfy, twins, models):
    model = models["sd15"]
    ids = ["up-level2-repeat1-res-out", "down-level0-repeat0-vit-block0-self-map"]
    x0, ctx, _ = _inputs("sd15", seed=2)
    native = extract_native_latents(model, [[ctx, {}]], x0 / SCALE, ids, t=200, seed=5, ensemble=2,
                                    feature_resize=2)
    ref = extract_latents(twins["sd15"], x0, Conditioning(ctx), ids, 200, 5, _model_abar(model), family="sd15",
                          ensemble=2, feature_resize=2)
    _assert_close(native, ref, ids)
    half = extract_native_latents(model, [[ctx, {}]], x0 / SCALE, ids, t=200, seed=5, dtype=torch.float16,
                                  offload=True)
    assert native[ids[0]].shape[-2:] == tuple(s // 2 for s in half[ids[0]].shape[-2:])  # pooled; maps are not
    assert native[ids[1]].shape == half[ids[1]].shape == (2, 8, LATENT[0] * LATENT[1], LATENT[0] * LATENT[1])
    assert all(v.dtype == torch.float16 and v.device.type == "cpu" for v in half.values())
    # an image's features do not depend on its batch: the same draw for every image
    one = extract_native_latents(model, [[ctx, {}]], x0[1:] / SCALE, ids, t=200, seed=5)
    two = extract_native_latents(model, [[ctx, {}]], x0 / SCALE, ids, t=200, seed=5)
    assert torch.allclose(one[ids[0]][0], two[ids[0]][1], atol=1e-5)


def test_early_exit_stops_the_forward_and_leaves_no_hook(comfy, models):
    model = models["sd15"]
    unet = model.model.diffusion_model
    fired = []
    probe = dict(unet.named_modules())["output_blocks.0.0"].register_forward_hook(lambda *a: fired.append(1))
    x0, ctx, _ = _inputs("sd15")
    try:
        feats = extract_native_latents(model, [[ctx, {}]], x0, ["down-level1-repeat1-vit-block0-self-k"], t=10)
    finally:
        probe.remove()
    assert not fired and list(feats) == ["down-level1-repeat1-vit-block0-self-k"]
    _zero_hooks(unet)


def _sample_with(comfy, monkeypatch, base):
    """Make ComfyUI's sampler run `base` instead of the MODEL's own BaseModel, as current ComfyUI's CFGGuider does
    when the conditioning carries hooks (a non-dynamic delegate: another copy of the network)."""
    owner = comfy.sample if comfy.version == "2024-03" else nc.comfy_module("comfy.sampler_helpers")
    original = owner.prepare_sampling

    def swapped(patcher, *args, **kwargs):
        _, *rest = original(patcher, *args, **kwargs)
        base.current_patcher = patcher  # v0.3.64's model calls ask it for the conditioning's hooks
        return (base, *rest)

    monkeypatch.setattr(owner, "prepare_sampling", swapped)


def test_taps_go_on_the_network_the_sampler_runs(comfy, models, monkeypatch):
    """DFExtractNative and DFCaptureLayers hook the network each model call runs, not the MODEL's found before
    sampling: features from a sampler that runs another copy equal the MODEL's own."""
    import copy

    model = models["sd15"]
    ids = ["mid-vit-block0-out", "up-level2-repeat0-vit-block0-cross-map", "unet-out"]
    x0, ctx, _ = _inputs("sd15", seed=4)
    expected = extract_native_latents(model, [[ctx, {}]], x0 / SCALE, ids, t=300, seed=2)
    other = copy.deepcopy(model.model)
    _sample_with(comfy, monkeypatch, other)
    ran = []
    probe = other.diffusion_model.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        got = extract_native_latents(model, [[ctx, {}]], x0 / SCALE, ids, t=300, seed=2)
        tapped, capture = capture_layers(model, ["unet-out"], steps="all", branch="cond")
        _sample(comfy, tapped, "sd15", steps=2)
    finally:
        probe.remove()
    assert ran
    assert all(torch.equal(got[i], expected[i]) for i in ids)
    assert [(lab["step"], lab["image"]) for lab in capture.labels()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _zero_hooks(model.model.diffusion_model)
    _zero_hooks(other.diffusion_model)


def test_failed_and_interrupted_extractions_leave_no_hooks(comfy, models):
    model = models["sd15"]
    unet = model.model.diffusion_model
    x0, ctx, _ = _inputs("sd15")
    seen = []

    def boom(h, hsp, transformer_options):
        seen.append(residue(unet)["forward_hooks"])
        raise errors.pop(0)

    errors = [RuntimeError("boom inside the forward"), comfy.model_management.InterruptProcessingException()]
    failing = model.clone()
    failing.set_model_output_block_patch(boom)
    for expected in (RuntimeError, comfy.model_management.InterruptProcessingException):
        with pytest.raises(expected):
            extract_native_latents(failing, [[ctx, {}]], x0, ["up-level3-repeat2-vit-out", "unet-out"], t=10)
        _zero_hooks(unet)
    assert seen and all(n > 0 for n in seen)  # the failures happened while our hooks were on
    assert list(extract_native_latents(model, [[ctx, {}]], x0, ["unet-out"], t=10)) == ["unet-out"]
    _zero_hooks(unet)
    checks = []

    def cancel():  # Cancel pressed during the forward: honoured at the next block, not after the whole call
        checks.append(residue(unet)["forward_pre_hooks"])
        if len(checks) == 3:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        extract_native_latents(model, [[ctx, {}]], x0, ["unet-out"], t=10, interrupt=cancel)
    assert len(checks) == 3 and checks[0] > 0
    _zero_hooks(unet)


def test_bad_inputs_say_what_would_be_valid(comfy, models):
    model = models["sd15"]
    x0, ctx, _ = _inputs("sd15")
    with pytest.raises(LayerIdError, match="nearest"):
        extract_native_latents(model, [[ctx, {}]], x0, ["up-level4-repeat0-res-out"], t=10)
    with pytest.raises(ValueError, match="holds 2 conditionings"):
        extract_native_latents(model, [[ctx, {}], [ctx, {}]], x0, ["unet-out"], t=10)
    with pytest.raises(ValueError, match=r"denoise_from \(40\) must be above t \(50\)"):
        extract_native_latents(model, [[ctx, {}]], x0, ["unet-out"], t=50, denoise_from=40)
    with pytest.raises(ValueError, match="t must be an integer training timestep in 0..999"):
        extract_native_latents(model, [[ctx, {}]], x0, ["unet-out"], t=1000)

    class FluxLike(torch.nn.Module):
        pass

    base = torch.nn.Module()
    base.diffusion_model = FluxLike()
    fake = type("Patcher", (), {"model": base, "clone": lambda self: self})()
    with pytest.raises(UnsupportedModelError, match="FluxLike.*sd15, sd21, sdxl and playground-v2"):
        DFCaptureLayers().capture(fake, "unet-out", "none")
    with pytest.raises(UnsupportedModelError, match="sd15, sd21, sdxl and playground-v2"):
        DFExtractNative().extract(fake, None, [[ctx, {}]], torch.rand(1, 64, 64, 3), 50, 0, layers="unet-out")


def test_comfyui_bundled_tokenizers_are_found_in_both_layouts(comfy, monkeypatch, tmp_path):
    """v0.3.64 keeps its T5 tokenizer in comfy/text_encoders/ (the 2024-03 copy has none), sd1_tokenizer stays in
    comfy/ on both; PixArt's default tokenizer loads from there. A folder in both places comes from text_encoders/."""
    import sys
    import types

    from diffusion_feature.engine.loading import default_tokenizers
    from diffusion_feature.nodes import comfy_env

    monkeypatch.setattr(comfy_env, "folder_paths", types.SimpleNamespace())  # as inside ComfyUI
    root = Path(comfy.model_base.__file__).resolve().parent
    assert comfy_env.comfy_tokenizer_dir("sd1_tokenizer") == root / "sd1_tokenizer"
    t5 = comfy_env.comfy_tokenizer_dir("t5_tokenizer")
    if comfy.version == "2024-03":
        assert t5 is None
    else:
        assert t5 == root / "text_encoders" / "t5_tokenizer"
        assert default_tokenizers("pixart-sigma")[0]("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    fake = tmp_path / "comfy"
    for folder in (fake / "t5_tokenizer", fake / "text_encoders" / "t5_tokenizer"):
        folder.mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "comfy", types.SimpleNamespace(__path__=[str(fake)]))
    assert comfy_env.comfy_tokenizer_dir("t5_tokenizer") == fake.resolve() / "text_encoders" / "t5_tokenizer"


# ---- the node faces end to end -----------------------------------------------------------------------------------
def test_nodes_are_registered_with_display_names():
    from diffusion_feature.nodes import NODE_DISPLAY_NAME_MAPPINGS

    for name in ("DFCaptureLayers", "DFCollectFeatures", "DFExtractNative"):
        assert name in NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS[name]
        spec = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        for group in (spec["required"], spec.get("optional", {})):  # "hidden" ones are ComfyUI's, not widgets
            assert all(opts[1].get("tooltip") for opts in group.values())
    assert NODE_CLASS_MAPPINGS["DFCaptureLayers"].RETURN_TYPES == ("MODEL", "DF_CAPTURE")
    assert NODE_CLASS_MAPPINGS["DFCollectFeatures"].RETURN_TYPES == ("DF_FEATURES",)


@pytest.mark.parametrize("cfg", [2.0, 1.0])
def test_capture_collect_pca_and_save_through_the_nodes(comfy, models, tmp_path, monkeypatch, cfg):
    """DFCaptureLayers -> ComfyUI's sampler (comfy.sample.sample: what KSampler runs) -> DFCollectFeatures ->
    DFFeaturePCA / DFAttentionMap / DFSaveFeatures: every row equals the test's own hook on its model call, labelled
    with its step, sigma, timestep and branch; at cfg 1 there is no uncond call and no uncond row."""
    monkeypatch.setenv("DF_OUTPUT_DIR", str(tmp_path))
    model = models["sd15"]
    unet = model.model.diffusion_model
    spatial = "up-level2-repeat1-res-out"
    tapped, capture = DFCaptureLayers().capture(model, f"{spatial}\nup-level1-repeat0-vit-block0-cross-map",
                                                "none", "all", "both" if cfg > 1 else "cond")
    from diffusion_feature.native import NativeLayout

    log = CallLog(unet, {spatial: NativeLayout(unet).native_path("up_blocks.2.resnets.1")},
                  NativeLayout(unet).native_path("up_blocks.1.attentions.0.transformer_blocks.0.attn2"))
    try:
        latent = _sample(comfy, tapped, "sd15", steps=3, cfg=cfg)
    finally:
        log.close()
    _zero_hooks(unet)
    (features,) = DFCollectFeatures().collect(capture, {"samples": latent})
    rows = features.meta["rows"]
    branches = ("cond", "uncond") if cfg > 1 else ("cond",)
    assert [(r["step"], r["branch"], r["image"]) for r in rows] == \
        [(s, b, i) for s in range(3) for b in branches for i in range(2)]
    assert len(log.calls) == 3
    ms = model.model.model_sampling
    for n, r in enumerate(rows):
        call = log.calls[r["step"]]
        assert call["cond_or_uncond"] == ([1, 0] if cfg > 1 else [0]) or sorted(call["cond_or_uncond"]) == [0, 1]
        row = call["cond_or_uncond"].index(0 if r["branch"] == "cond" else 1) * 2 + r["image"]
        assert torch.equal(features.tensors[spatial][n], call[spatial][row])
        assert torch.allclose(features.tensors["up-level1-repeat0-vit-block0-cross-map"][n],
                              log.cross_map(call)[row], atol=1e-6)
        assert r["timestep"] == pytest.approx(float(call["t"][row]))
        assert r["timestep"] == pytest.approx(float(ms.timestep(torch.tensor([r["sigma"]]))[0]))
    assert rows[0]["sigma"] > rows[-1]["sigma"] > 0
    assert (features.meta["height"], features.meta["width"]) == (LATENT[0] * 8, LATENT[1] * 8)
    (pca,) = DFFeaturePCA().pca(features, spatial, joint=True)
    assert tuple(pca.shape) == (len(rows), LATENT[0] * 8, LATENT[1] * 8, 3)
    heat, mask = DFAttentionMap().show(features, "up-level1-repeat0-vit-block0-cross-map", token_index=1)
    assert heat.shape[0] == mask.shape[0] == len(rows)
    saved = DFSaveFeatures().save(features, "native/timeline")["ui"]["features"]
    assert len(saved) == len(rows)
    loaded = [load_features(tmp_path / s["subfolder"] / s["filename"]) for s in saved]
    for n, f in enumerate(loaded):
        assert {k: f.meta[k] for k in ("step", "branch", "image", "cond_index")} == \
            {k: rows[n][k] for k in ("step", "branch", "image", "cond_index")}
        assert f.meta["sigma"] == pytest.approx(rows[n]["sigma"]) and f.meta["timestep"] == rows[n]["timestep"]
        assert torch.equal(f.tensors[spatial][0], features.tensors[spatial][n])


def test_collect_errors_name_the_fix(comfy, models):
    model = models["sd15"]
    _, idle = DFCaptureLayers().capture(model, "mid-vit-out", "none", "all", "cond")
    with pytest.raises(NoCaptureError, match="connect the MODEL output of DFCaptureLayers to a sampler"):
        DFCollectFeatures().collect(idle, {"samples": torch.zeros(1, 4, 8, 8)})
    tapped, capture = DFCaptureLayers().capture(model, "mid-vit-out", "none", "0, 9", "cond")
    latent = _sample(comfy, tapped, "sd15", steps=3)
    with pytest.raises(ValueError, match="capture step 9 is outside 0..2 for a run of 3 steps"):
        DFCollectFeatures().collect(capture, {"samples": latent})
    with pytest.raises(LayerIdError, match="nearest"):
        DFCaptureLayers().capture(model, "mid-vit-block3-out", "none", "all", "cond")
    with pytest.raises(ValueError, match="no layers chosen"):
        DFCaptureLayers().capture(model, "", "none", "all", "cond")


def test_capture_steps_are_read_at_capture_and_fitted_to_the_run_when_it_is_known(comfy, models):
    """DFCaptureLayers checks the steps' syntax only: step 1200 of a 1500-step run is captured (no placeholder run
    of 1000 steps refuses it); whether the steps fit is said at collection, for the run that happened."""
    model = models["sd15"]
    unet = model.model.diffusion_model
    with pytest.raises(ValueError, match="cannot read 'x'"):
        DFCaptureLayers().capture(model, "mid-vit-out", "none", "1, x", "cond")
    schedule = torch.linspace(14.0, 0.0, 1501)  # the sample_sigmas of a 1500-step run
    x = torch.randn(2, 4, *LATENT)
    ctx = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    for spec, fits in (("1200", True), ("every 200 from 1000", True), ("1600", False)):
        _, capture = DFCaptureLayers().capture(model, "mid-vit-out", "none", spec, "cond")
        for step in (0, 1200):  # one model call at each of these steps
            sigma = schedule[step].repeat(2)
            opts = {"cond_or_uncond": [0], "sigmas": sigma, "sample_sigmas": schedule}
            with torch.no_grad():
                capture.run_call(unet, x, sigma, opts, lambda: model.model.apply_model(
                    x, sigma, c_crossattn=ctx, transformer_options=opts), model.model.model_sampling.timestep)
        if fits:
            (features,) = DFCollectFeatures().collect(capture, {"samples": x})
            assert [r["step"] for r in features.meta["rows"]] == [1200, 1200] and features.meta["steps"] == 1500
        else:
            with pytest.raises(ValueError, match="capture step 1600 is outside 0..1499 for a run of 1500 steps"):
                DFCollectFeatures().collect(capture, {"samples": x})
    _zero_hooks(unet)


def test_uncond_at_cfg_1_says_that_cfg_1_makes_no_negative_call(comfy, models):
    tapped, capture = DFCaptureLayers().capture(models["sd15"], "mid-vit-out", "none", "all", "uncond")
    latent = _sample(comfy, tapped, "sd15", steps=2, cfg=1.0)
    with pytest.raises(NoCaptureError, match="no negative .uncond. model call.*at cfg 1 ComfyUI skips the negative"):
        DFCollectFeatures().collect(capture, {"samples": latent})


@pytest.mark.parametrize("text, what", [('{"mid-vit-out": true, "unet-out": true}', "a JSON object"),
                                        ('  ["mid-vit-out", "unet-out"]', "a JSON list")])
def test_json_in_the_layers_field_is_refused_by_name(comfy, models, text, what):
    with pytest.raises(LayerIdError, match=f"the layers field does not accept {what}.*a .json file"):
        DFCaptureLayers().capture(models["sd15"], text, "none", "all", "cond")


def test_a_100k_layers_field_gives_a_short_error(comfy, models):
    with pytest.raises(LayerIdError) as e:
        DFCaptureLayers().capture(models["sd15"], "x" * 100_000, "none", "all", "cond")
    assert len(str(e.value)) < 1000 and "(100000 characters)" in str(e.value)


def _capture_graph(layout: str) -> dict:
    """An API prompt as ComfyUI hands it to DFCaptureLayers (hidden PROMPT): capture (5) -> KSampler (6) ->
    DFCollectFeatures (7) -> DFSaveFeatures (10)."""
    return {"5": {"class_type": "DFCaptureLayers", "inputs": {"model": ["1", 0]}},
            "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0]}},
            "7": {"class_type": "DFCollectFeatures", "inputs": {"capture": ["5", 1], "latent": ["6", 0]}},
            "10": {"class_type": "DFSaveFeatures", "inputs": {"features": ["7", 0], "layout": layout}}}


def test_a_save_layout_that_needs_spatial_layers_fails_before_sampling(comfy, models):
    """Maps only, saved with the aggregate layout: DFCaptureLayers (which runs before the sampler) refuses, naming
    the save node; a spatial layer, or another layout, passes."""
    model = models["sd15"]
    maps = "mid-vit-block0-self-map"
    with pytest.raises(ValueError, match=r"DFSaveFeatures \(node 10\).*aggregate layout needs at least one spatial"):
        DFCaptureLayers().capture(model, maps, "none", "all", "cond", prompt=_capture_graph("aggregate"),
                                  unique_id="5")
    DFCaptureLayers().capture(model, f"{maps}, mid-vit-out", "none", "all", "cond",
                              prompt=_capture_graph("aggregate"), unique_id="5")
    DFCaptureLayers().capture(model, maps, "none", "all", "cond", prompt=_capture_graph("per-sample"),
                              unique_id="5")


@pytest.fixture()
def prompt_ids():
    """ComfyUI's running prompt as the captures see it (nodes/__init__ gives them comfy_env.current_prompt_id)."""
    from diffusion_feature.native.capture import set_host_job_id

    current = {"id": None}
    set_host_job_id(lambda: current["id"])
    yield current
    set_host_job_id(None)


def test_rows_of_an_earlier_prompt_are_never_served_as_this_ones(comfy, models, prompt_ids):
    """ComfyUI caches DFCaptureLayers: a later prompt gets the same capture. When that prompt's sampler takes the
    untapped MODEL, collecting says the capture saw no model call in this prompt; the earlier prompt's cached
    sampler output still collects its own rows; the tapped graph queued again gets fresh rows."""
    model = models["sd15"]
    prompt_ids["id"] = "p1"
    tapped, capture = DFCaptureLayers().capture(model, "mid-vit-out", "none", "all", "cond")
    first = _sample(comfy, tapped, "sd15", steps=2)
    (rows1,) = DFCollectFeatures().collect(capture, {"samples": first})
    prompt_ids["id"] = "p2"
    other = _sample(comfy, model, "sd15", steps=2, seed=1)
    with pytest.raises(NoCaptureError, match="saw no model call in this prompt .its rows belong to an earlier"):
        DFCollectFeatures().collect(capture, {"samples": other})
    (again,) = DFCollectFeatures().collect(capture, {"samples": first})  # the first sampler's output, cached
    assert torch.equal(again.tensors["mid-vit-out"], rows1.tensors["mid-vit-out"])
    prompt_ids["id"] = "p3"
    third = _sample(comfy, tapped, "sd15", steps=2, seed=1)
    (rows3,) = DFCollectFeatures().collect(capture, {"samples": third})
    assert [r["step"] for r in rows3.meta["rows"]] == [0, 0, 1, 1]
    assert not torch.equal(rows3.tensors["mid-vit-out"], rows1.tensors["mid-vit-out"])  # this prompt's noise
    _zero_hooks(model.model.diffusion_model)


def _comfy_vae(comfy):
    """ComfyUI's own VAE (comfy.sd.VAE) with the weights of a small diffusers AutoencoderKL (widths 32: ComfyUI's
    VAE blocks hard-code 32 normalisation groups)."""
    from diffusers import AutoencoderKL

    sd = nc.comfy_module("comfy.sd")
    torch.manual_seed(0)
    d = AutoencoderKL(block_out_channels=(32,) * 4, norm_num_groups=32, latent_channels=4, layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = sd.VAE(sd=d.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    converted = nc.comfy_module("comfy.diffusers_convert").convert_vae_state_dict(d.state_dict())
    vae.first_stage_model.load_state_dict(converted, strict=True)  # every weight placed (none left uninitialised)
    return vae


def test_extract_native_node_end_to_end(comfy, models):
    """DFExtractNative = resize as DFExtractFeatures, ComfyUI's VAE encode (seeded), the engine at t; the layers
    of a DFCaptureLayers MODEL are used, and its capture keeps its own rows."""
    from diffusion_feature.engine.extraction import _pixels
    from diffusion_feature.native import comfy_model

    model, vae = models["sd15"], _comfy_vae(comfy)
    ids = ["up-level2-repeat1-res-out", "up-level1-repeat0-vit-block0-cross-map"]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 48, 80, 3, generator=g)  # keep-aspect at 512 native: 384x640 -> resized
    ctx = torch.randn(1, 7, 32, generator=g)
    tapped, capture = DFCaptureLayers().capture(model, "\n".join(ids), "none", "all", "cond")
    _sample(comfy, tapped, "sd15", steps=2)
    before = capture.labels()
    (features,) = DFExtractNative().extract(tapped, vae, [[ctx, {}]], image, t=50, seed=7, resize="stretch",
                                            batch_size=1)
    assert capture.labels() == before  # the extraction did not record into the capture
    assert list(features.tensors) == ids and features.batch == 2
    assert (features.meta["height"], features.meta["width"]) == (512, 512)
    assert (features.meta["input_height"], features.meta["input_width"]) == (48, 80)
    assert features.meta["t"] == 50 and features.meta["seed"] == 7 and features.meta["family"] == "sd15"
    pixels, _ = _pixels(image, 512, "stretch", None)
    latents = comfy_model.encode_pixels(vae, ((pixels + 1) / 2).permute(0, 2, 3, 1).contiguous()[1:], 7)
    ref = extract_native_latents(model, [[ctx, {}]], latents, ids, t=50, seed=7)
    for i in ids:
        assert torch.allclose(features.tensors[i][1:], ref[i], atol=1e-6), i
    assert features.tensors[ids[0]].shape[1:] == (32, 32, 32)  # up-level2 of a 512x512 image: 1/16 of its side
    (again,) = DFExtractNative().extract(model, vae, [[ctx, {}]], image, t=50, seed=7, layers=ids[0],
                                         resize="stretch")
    # same inputs and seed, same features, whatever the batch (batched kernels differ in the last bits only)
    assert torch.allclose(again.tensors[ids[0]], features.tensors[ids[0]], atol=1e-5)
    with pytest.raises(ValueError, match="connect the MODEL through DFCaptureLayers, or fill in `layers`"):
        DFExtractNative().extract(model, vae, [[ctx, {}]], image, t=50, seed=7)
    _zero_hooks(model.model.diffusion_model)


def test_extract_native_loads_the_model_through_comfyuis_memory_manager(comfy, models, monkeypatch):
    """The MODEL (with its patches) is loaded by comfy.model_management.load_models_gpu, as every core sampler
    loads it, and its native features go to the DF_FEATURES nodes like DFExtractFeatures' (self-attention PCA)."""
    mm = comfy.model_management
    loaded = []
    original = mm.load_models_gpu

    def record(models_, *args, **kwargs):
        loaded.append(list(models_))
        return original(models_, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", record)
    model = models["sd15"]
    vae = _comfy_vae(comfy)
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    self_map = "up-level2-repeat1-vit-block0-self-map"
    (features,) = DFExtractNative().extract(model, vae, [[ctx, {}]], image, t=100, seed=0, layers=self_map)
    assert any(getattr(m, "model", None) is model.model for call in loaded for m in call)
    (rgb,) = DFSelfAttentionPCA().pca(features, self_map)
    assert tuple(rgb.shape) == (1, 64, 64, 3)
    assert (features.meta["input_height"], features.meta["input_width"]) == (64, 64)
    _zero_hooks(model.model.diffusion_model)


# ---- the native memory guard, the prompt text and float images ---------------------------------------------------
def _bytes(tensors: dict) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _free(monkeypatch, n: int) -> None:
    from diffusion_feature.engine import memory_guard

    monkeypatch.setattr(memory_guard, "available_bytes", lambda device, root="/": n)


def test_native_memory_guard_refuses_a_capture_at_its_first_model_call(comfy, models, monkeypatch):
    """The capture's plan (every wanted step's rows plus DFCollectFeatures' stacked copy) is exactly what a run
    keeps: it samples with that much free, and one byte less is refused before the first tapped call runs, naming
    the steps that fit. The 2024-03 ComfyUI gives no schedule, so one step is checked there."""
    from diffusion_feature.engine.memory_guard import FeatureMemoryError

    model = models["sd15"]
    ids = "up-level2-repeat1-res-out\nup-level1-repeat0-vit-block0-self-map"
    tapped, capture = DFCaptureLayers().capture(model, ids, "none", "all", "both")
    (features,) = DFCollectFeatures().collect(capture, {"samples": _sample(comfy, tapped, "sd15", steps=3)})
    assert features.batch == 12  # 3 steps x 2 branches x 2 images
    known = capture.total_steps is not None
    planned = 2 * _bytes(features.tensors) // (1 if known else 3)
    _free(monkeypatch, planned)
    _sample(comfy, tapped, "sd15", steps=3)
    _free(monkeypatch, planned - 1)
    fit = "at most 2 capture steps fit at this size" if known else "not one capture step fits at this size"
    with pytest.raises(FeatureMemoryError, match=rf"^capturing 2 layers at {3 if known else 1} steps? of 4 rows at "
                                                 rf"128x64 would need .* on cpu .* is free to this process: {fit}"):
        _sample(comfy, tapped, "sd15", steps=3)
    assert capture.records == []
    _zero_hooks(model.model.diffusion_model)


def test_extraction_after_capture_layers_sizes_its_features_once(comfy, models, monkeypatch):
    """DFExtractNative on a MODEL from DFCaptureLayers reuses the capture's measured feature sizes for its memory
    plan (no second fake-tensor pass); other layers get their own pass."""
    from diffusion_feature.native import shapes
    from diffusion_feature.native.extract import extract_native

    passes = []
    original = shapes.layer_shapes
    monkeypatch.setattr(shapes, "layer_shapes", lambda *a, **k: passes.append(1) or original(*a, **k))
    ids = ["up-level2-repeat1-res-out"]
    tapped, _ = capture_layers(models["sd15"], ids)
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(4))
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    features = extract_native(tapped, _comfy_vae(comfy), [[ctx, {}]], image, None, t=50, seed=7, size="64x64")
    assert list(features.tensors) == ids and len(passes) == 1
    extract_native(tapped, _comfy_vae(comfy), [[ctx, {}]], image, ["unet-out"], t=50, seed=7, size="64x64")
    assert len(passes) == 2


def test_native_extraction_guard_float_images_and_the_prompt_text(comfy, models, monkeypatch):
    """DFExtractNative: the prompt text comes from the graph's CLIP Text Encode, through Apply ControlNet; a float
    IMAGE reaches the VAE as it is (no 8-bit round trip: the features equal those of the image encoded directly);
    refused before the VAE runs when every image's features plus a batch in flight would not fit, naming how many
    images do."""
    from diffusion_feature.engine.memory_guard import FeatureMemoryError
    from diffusion_feature.native import comfy_model
    from diffusion_feature.native.extract import extract_native

    model, vae = models["sd15"], _comfy_vae(comfy)
    ids = ["up-level2-repeat1-res-out", "up-level1-repeat0-vit-block0-self-map"]
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(4))
    graph = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["0", 1]}},
             "2": {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["1", 0], "negative": ["3", 0]}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["0", 1]}},
             "4": {"class_type": "DFExtractNative", "inputs": {"positive": ["2", 0]}}}
    (node,) = DFExtractNative().extract(model, vae, [[ctx, {}]], torch.rand(1, 8, 8, 3), t=50, seed=7,
                                        layers=ids[0], prompt=graph, unique_id="4")
    assert node.meta["prompt"] == ["a photo of a cat"]
    graph["4"]["inputs"]["positive"] = ["2", 1]  # Apply ControlNet's negative output
    assert conditioning_text(graph, "4", "positive") == "blurry"
    graph["3"]["inputs"]["text"] = ["5", 0]  # a text made by another node: not known from the graph
    assert conditioning_text(graph, "4", "positive") is None
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    assert not torch.equal((image * 255).round() / 255, image)  # values 8 bits would change

    def run(**kw):
        return extract_native(model, vae, [[ctx, {}]], image, ids, t=50, seed=7, size="64x64", **kw)

    features = run()
    ref = extract_native_latents(model, [[ctx, {}]], comfy_model.encode_pixels(vae, image, 7), ids, t=50, seed=7)
    for i in ids:
        assert torch.allclose(features.tensors[i], ref[i], atol=1e-6), i
    per_image = _bytes(features.tensors) // 2
    _free(monkeypatch, 3 * per_image)  # the output's two images and one in flight: runs
    run(batch_size=1)
    _free(monkeypatch, 3 * per_image - 1)
    monkeypatch.setattr(vae, "encode", lambda *a: pytest.fail("the VAE ran"))
    with pytest.raises(FeatureMemoryError, match=r"^extracting 2 layers from 2 images of 64x64 would need .* on "
                                                 r"cpu .* is free to this process: at most 1 image fit"):
        run(batch_size=1)
    _zero_hooks(model.model.diffusion_model)

"""Integration: DFCaptureLayers under every core node that samples (KSampler, KSamplerAdvanced, SamplerCustom,
SamplerCustomAdvanced) and DFShowLayers on ComfyUI's own MODEL, on the real servers of both ComfyUI versions.

The samplers share ComfyUI's sampling code, so with the same seed, steps, sampler, scheduler and cfg their runs make
the same model calls: the rows each capture collects must be the same tensors with the same labels. A capture that
mislabels or drops calls under one of them differs from the KSampler's."""
from __future__ import annotations

import pytest
import torch

from comfyui_harness import no_hooks, run_ok, saved_files
from diffusion_feature.engine.features_io import load_features
from native_checkpoint import NATIVE_CKPT, write_native_models

LAYER = "up-level1-repeat1-res-out"
STEPS, CFG, SEED = 5, 5.0, 11


@pytest.fixture()
def server(server):
    write_native_models(server.home / "ComfyUI")
    return server


def _graph(sampler: dict, prefix: str) -> dict:
    """Checkpoint -> prompts -> DFCaptureLayers (every step, both branches) -> `sampler` (nodes "20".., output
    "20") -> DFCollectFeatures -> DFSaveFeatures."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": NATIVE_CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "DFCaptureLayers", "inputs": {"model": ["1", 0], "layers": LAYER, "preset": "none",
                                                          "capture_steps": "all", "branch": "both"}},
        "7": {"class_type": "DFCollectFeatures", "inputs": {"capture": ["5", 1], "latent": ["20", 0]}},
        "8": {"class_type": "DFSaveFeatures", "inputs": {"features": ["7", 0], "filename_prefix": prefix,
                                                         "format": "safetensors", "layout": "per-sample"}},
    }
    graph.update(sampler)
    return graph


def _ksampler() -> dict:
    return {"20": {"class_type": "KSampler", "inputs": {
        "model": ["5", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}}


def _ksampler_advanced(start: int = 0, end: int = 10000, add_noise: str = "enable") -> dict:
    return {"20": {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["5", 0], "add_noise": add_noise, "noise_seed": SEED, "steps": STEPS, "cfg": CFG,
        "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
        "latent_image": ["4", 0], "start_at_step": start, "end_at_step": end,
        "return_with_leftover_noise": "disable"}}}


def _custom_parts() -> dict:
    return {"21": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "22": {"class_type": "BasicScheduler", "inputs": {"model": ["5", 0], "scheduler": "normal",
                                                              "steps": STEPS, "denoise": 1.0}}}


def _sampler_custom() -> dict:
    return {**_custom_parts(), "20": {"class_type": "SamplerCustom", "inputs": {
        "model": ["5", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["21", 0], "sigmas": ["22", 0], "latent_image": ["4", 0]}}}


def _sampler_custom_advanced() -> dict:
    return {**_custom_parts(),
            "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
            "24": {"class_type": "CFGGuider", "inputs": {"model": ["5", 0], "positive": ["2", 0],
                                                         "negative": ["3", 0], "cfg": CFG}},
            "20": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["23", 0], "guider": ["24", 0], "sampler": ["21", 0], "sigmas": ["22", 0],
                "latent_image": ["4", 0]}}}


def _rows(server, graph: dict) -> list:
    files = saved_files(server, run_ok(server, graph))
    return [load_features(f) for f in files]


def test_every_core_sampler_captures_the_same_labelled_rows(server):
    info = server.get("/object_info")
    samplers = {"KSamplerAdvanced": _ksampler_advanced(), "SamplerCustom": _sampler_custom()}
    if "SamplerCustomAdvanced" in info:
        samplers["SamplerCustomAdvanced"] = _sampler_custom_advanced()
    else:  # the guider/noise nodes came to ComfyUI in 2024-04: only the older server lacks them
        assert server.name == "comfy2024"
    reference = _rows(server, _graph(_ksampler(), "diffusion_feature/samplers_ksampler"))
    labels = [(f.meta["step"], f.meta["branch"]) for f in reference]
    assert labels == [(s, b) for s in range(STEPS) for b in ("cond", "uncond")]
    sigmas = [f.meta["sigma"] for f in reference]
    assert all(a > b for a, b in zip(sigmas[::2], sigmas[2::2]))  # the noise level falls step by step
    for name, sampler in samplers.items():
        rows = _rows(server, _graph(sampler, f"diffusion_feature/samplers_{name}"))
        assert [(f.meta["step"], f.meta["branch"]) for f in rows] == labels, name
        for got, ref in zip(rows, reference):
            assert got.meta["sigma"] == pytest.approx(ref.meta["sigma"], rel=1e-6), name
            assert got.meta["timestep"] == pytest.approx(ref.meta["timestep"], rel=1e-6), name
            assert torch.equal(got.tensors[LAYER], ref.tensors[LAYER]), (name, got.meta["step"], got.meta["branch"])
    # Queued again with another seed, SamplerCustom gets BasicScheduler's cached sigmas: the very tensor of the last
    # run. The capture must still start a new run (the rows replaced, not piled up: memory stays flat).
    again = _sampler_custom()
    again["20"]["inputs"]["noise_seed"] = SEED + 1
    rows = _rows(server, _graph(again, "diffusion_feature/samplers_again"))
    assert [(f.meta["step"], f.meta["branch"]) for f in rows] == labels
    assert not torch.equal(rows[0].tensors[LAYER], reference[0].tensors[LAYER])  # another seed, other features
    no_hooks(server)


def test_ksampler_advanced_part_of_a_schedule_labels_its_own_steps(server):
    """start_at_step 2: the sampler runs schedule steps 2..4; rows count the run's own steps (0, 1, 2) and carry the
    sigmas of schedule steps 2..4, which the KSampler capture labelled 2..4."""
    reference = _rows(server, _graph(_ksampler(), "diffusion_feature/samplers_full"))
    part = _rows(server, _graph(_ksampler_advanced(start=2, add_noise="disable"), "diffusion_feature/samplers_part"))
    assert [(f.meta["step"], f.meta["branch"]) for f in part] == [(s, b) for s in range(3) for b in ("cond", "uncond")]
    assert [f.meta["sigma"] for f in part] == pytest.approx([f.meta["sigma"] for f in reference[4:]], rel=1e-6)
    no_hooks(server)


def test_show_layers_on_a_native_model(server):
    """DFShowLayers takes Load Checkpoint's MODEL: the ids of this checkpoint's own (two-level) UNet, with the shapes
    a real sampling run captures (DFCollectFeatures at 64 px: 320 x 8 x 8)."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": NATIVE_CKPT}},
        "2": {"class_type": "DFShowLayers", "inputs": {"model": ["1", 0], "width": 64, "height": 64}},
    }
    entry = run_ok(server, graph)
    text = entry["outputs"]["2"]["text"][0]
    lines = text.splitlines()
    assert lines[0].startswith("# sd15: ") and "at 64x64" in lines[0]
    shapes = dict(line.split("  ", 1) for line in lines[1:])
    assert int(lines[0].split()[2]) == len(shapes)
    assert shapes[LAYER] == "320 x 8 x 8"
    assert shapes["up-level1-repeat0-vit-block0-cross-map"].endswith("x 64 x 77")  # queries: 8x8 grid; 77 tokens
    assert not any("level2" in k for k in shapes)  # a two-level UNet: no level 2, unlike the standard sd15
    captured = _rows(server, _graph(_ksampler(), "diffusion_feature/samplers_shape"))[0]
    assert " x ".join(map(str, captured.tensors[LAYER].shape[1:])) == shapes[LAYER]
    no_hooks(server)

"""Integration: the native nodes inside the real ComfyUI servers (both versions: conftest's `server`) with ComfyUI's
own loaders, samplers, ControlNet and LoRA nodes, driven over HTTP. The checkpoint is one CheckpointLoaderSimple
detects as SD1.5 (tests/native_checkpoint.py: full-size CLIP-L and VAE, a two-level UNet), cached in each ComfyUI
home's model folders."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from comfyui_harness import assert_memory_flat, execution_error, images_of, no_hooks, run_ok, saved_files
from diffusion_feature.engine.features_io import load_features
from native_checkpoint import (NATIVE_CKPT, NATIVE_CN, NATIVE_FLUX, NATIVE_LORA, NATIVE_LUMINA2, NATIVE_QWEN,
                               NATIVE_SD3, NATIVE_TAESD3, write_native_flux, write_native_lumina2, write_native_models,
                               write_native_qwen_image, write_native_sd3)

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
NATIVE_EXAMPLES = ("native_ksampler_capture_timeline", "native_content_shift_controlnet", "native_lora_extract",
                   "native_match_points",
                   "native_flux_capture_timeline", "native_sd35_cross_map", "native_flux_match_points",
                   "native_z_image_capture_timeline", "native_qwen_image_cross_map")
LAYER = "up-level1-repeat1-res-out"  # the examples' PCA layer; the two-level UNet has it (320 channels, full grid)
LAYERS = f"{LAYER}\nup-level1-repeat1-vit-block0-cross-q\nup-level1-repeat0-vit-block0-cross-map"


@pytest.fixture()
def server(server):
    """conftest's server of each ComfyUI version, with the native test models in its model folders (ComfyUI lists
    new files without a restart)."""
    write_native_models(server.home / "ComfyUI")
    return server


def native(name: str) -> dict:
    """A native example workflow with the test's models, small latents and few steps substituted."""
    graph = json.loads((EXAMPLES / f"{name}.api.json").read_text())
    for node in graph.values():
        inputs = node["inputs"]
        kind = node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = NATIVE_CKPT
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = NATIVE_CN
        elif kind == "LoraLoader":
            inputs["lora_name"] = NATIVE_LORA
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 8
        elif kind == "DFExtractNative":
            inputs.update(layers=LAYERS, preset="none", resize="stretch")
    return graph


def test_every_native_example_is_here():
    assert {p.name[:-len(".api.json")] for p in EXAMPLES.glob("native_*.api.json")} == set(NATIVE_EXAMPLES)
    for name in NATIVE_EXAMPLES:
        ui = json.loads((EXAMPLES / f"{name}.json").read_text())
        api = json.loads((EXAMPLES / f"{name}.api.json").read_text())
        assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())
        assert (EXAMPLES / f"{name}.jpg").is_file()


def test_native_nodes_are_served(server):
    info = server.get("/object_info")
    for name in ("DFCaptureLayers", "DFCollectFeatures", "DFExtractNative"):
        assert info[name]["category"] == "diffusion_feature/native"
    assert info["DFCaptureLayers"]["output"] == ["MODEL", "DF_CAPTURE"]
    assert NATIVE_CKPT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert server.get(f"/diffusion_feature/family?kind=checkpoints&name={NATIVE_CKPT}") == {"family": "sd15"}


def test_ksampler_capture_timeline_example(server):
    """Load Checkpoint -> DFCaptureLayers -> KSampler -> DFCollectFeatures -> PCA + save: one labelled row per
    captured step, their noise level falling; with branch both and cfg > 1, two rows per step; at cfg 1, cond only."""
    graph = native("native_ksampler_capture_timeline")
    entry = run_ok(server, graph)
    files = saved_files(server, entry)
    assert len(files) == 2 and all(f.name.endswith(f"step{s:03d}_cond.safetensors") for f, s in zip(files, (0, 4)))
    metas = [load_features(f) for f in files]
    for feats in metas:
        assert list(feats.tensors) == [LAYER] and tuple(feats.tensors[LAYER].shape) == (1, 320, 8, 8)
        assert feats.meta["branch"] == "cond" and feats.meta["family"] == "sd15"
    assert [f.meta["step"] for f in metas] == [0, 4]
    assert metas[0].meta["sigma"] > metas[1].meta["sigma"] > 0 and metas[0].meta["timestep"] > metas[1].meta["timestep"]
    shown = images_of(entry)
    assert len(shown["9"]) == 2 and len(shown["12"]) == 1  # a PCA image per captured step; the generated image
    both = copy.deepcopy(graph)
    both["5"]["inputs"].update(branch="both", capture_steps="all")
    both["10"]["inputs"]["filename_prefix"] = "diffusion_feature/native_both"
    rows = [load_features(f).meta for f in saved_files(server, run_ok(server, both))]
    assert [(r["step"], r["branch"]) for r in rows] == [(s, b) for s in range(8) for b in ("cond", "uncond")]
    cfg1 = copy.deepcopy(both)
    cfg1["6"]["inputs"]["cfg"] = 1.0
    cfg1["10"]["inputs"]["filename_prefix"] = "diffusion_feature/native_cfg1"
    rows = [load_features(f).meta for f in saved_files(server, run_ok(server, cfg1))]
    assert [(r["step"], r["branch"]) for r in rows] == [(s, "cond") for s in range(8)]
    no_hooks(server)


def _shown(server, image: dict):
    """A preview image the server reports, fetched over HTTP (ComfyUI's /view) as a PIL image."""
    import io
    import urllib.parse
    import urllib.request

    from PIL import Image

    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}") as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_match_points_example(server):
    """Load Checkpoint -> DFExtractNative on two images -> DFMatchPoints and DFSimilarityMap: the two images side by
    side, and a heat map over image B."""
    graph = native("native_match_points")
    graph["11"]["inputs"]["image"] = "example.png"  # B = A: current ComfyUI runs the one extraction once
    graph["6"]["inputs"]["points"] = "10,10; 50,30; 90,60"  # the test images are 96x64
    graph["8"]["inputs"].update(x=50.0, y=30.0)
    shown = images_of(run_ok(server, graph))
    assert _shown(server, shown["7"][0]).size == (2 * 96, 64)
    assert _shown(server, shown["9"][0]).size == (96, 64)
    outside = copy.deepcopy(graph)
    outside["6"]["inputs"]["points"] = "10,10; 500,30"
    error = execution_error(server.run(outside))
    assert error and "point (500, 30) lies outside image A of 96x64 pixels" in error["exception_message"]
    no_hooks(server)


def test_controlnet_example_extracts_with_canny_and_denoise_from(server):
    graph = native("native_content_shift_controlnet")
    entry = run_ok(server, graph)
    (path,) = saved_files(server, entry)
    feats = load_features(path)
    assert feats.meta["t"] == 50 and feats.meta["denoise_from"] == 60 and feats.meta["denoise_steps"] == 1
    assert [c["strength"] for c in feats.meta["controlnets"]] == [1.0]
    assert list(feats.tensors) == LAYERS.split("\n")
    assert tuple(feats.tensors[LAYER].shape) == (1, 320, 64, 64)  # 512x512 (stretch): the full latent grid
    assert len(images_of(entry)["6"]) == 1 and len(images_of(entry)["14"]) == 1  # the PCA; the canny edges
    # without the ControlNet and from t itself, the features differ
    plain = copy.deepcopy(graph)
    plain["4"]["inputs"].update(positive=["2", 0], denoise_from=0)
    plain["7"]["inputs"]["filename_prefix"] = "diffusion_feature/native_plain"
    other = load_features(saved_files(server, run_ok(server, plain))[0])
    assert "controlnets" not in other.meta and "denoise_from" not in other.meta
    assert not torch.allclose(feats.tensors[LAYER], other.tensors[LAYER])
    # the ControlNet alone (no denoising steps) changes them too: it acts inside the model call
    control_only = copy.deepcopy(graph)
    control_only["4"]["inputs"]["denoise_from"] = 0
    control_only["7"]["inputs"]["filename_prefix"] = "diffusion_feature/native_control_only"
    controlled = load_features(saved_files(server, run_ok(server, control_only))[0])
    assert not torch.allclose(controlled.tensors[LAYER], other.tensors[LAYER])
    no_hooks(server)


def test_lora_example_changes_features_and_never_leaks_into_the_plain_model(server):
    lora_graph = native("native_lora_extract")
    plain = copy.deepcopy(lora_graph)
    del plain["15"]
    plain["2"]["inputs"]["clip"] = ["1", 1]
    plain["4"]["inputs"]["model"] = ["1", 0]
    plain["7"]["inputs"]["filename_prefix"] = "diffusion_feature/native_plain_before"
    before = load_features(saved_files(server, run_ok(server, plain))[0]).tensors
    with_lora = load_features(saved_files(server, run_ok(server, lora_graph))[0]).tensors
    after_graph = copy.deepcopy(plain)
    after_graph["4"]["inputs"]["batch_size"] = 2  # a changed input: ComfyUI runs the node again (one image: same)
    after_graph["7"]["inputs"]["filename_prefix"] = "diffusion_feature/native_plain_after"
    after = load_features(saved_files(server, run_ok(server, after_graph))[0]).tensors
    assert not torch.allclose(with_lora[LAYER], before[LAYER])
    for k in before:
        assert torch.equal(before[k], after[k]), k
    no_hooks(server)


def test_bad_native_inputs_fail_in_one_sentence(server):
    graph = native("native_ksampler_capture_timeline")
    unsampled = copy.deepcopy(graph)
    unsampled["7"]["inputs"]["latent"] = ["4", 0]  # the empty latent, not the sampler's output
    for nid in ("6", "11", "12"):
        del unsampled[nid]
    err = execution_error(server.run(unsampled))
    assert err and err["node_type"] == "DFCollectFeatures"
    assert "connect the MODEL output of DFCaptureLayers to a sampler" in err["exception_message"]
    bad_id = copy.deepcopy(graph)
    bad_id["5"]["inputs"]["layers"] = "up-level2-repeat0-res-out"
    err = execution_error(server.run(bad_id))
    assert err and err["node_type"] == "DFCaptureLayers" and "up-level1-repeat0-res-out" in err["exception_message"]
    bad_steps = copy.deepcopy(graph)
    bad_steps["5"]["inputs"]["capture_steps"] = "0, 30"
    err = execution_error(server.run(bad_steps))
    assert err and err["node_type"] == "DFCollectFeatures" and "outside 0..7" in err["exception_message"]
    maps_only = copy.deepcopy(graph)  # attention maps saved with the aggregate layout: refused before sampling
    maps_only["5"]["inputs"]["layers"] = "up-level1-repeat0-vit-block0-cross-map"
    maps_only["10"]["inputs"]["layout"] = "aggregate"
    for nid in ("8", "9"):
        del maps_only[nid]
    err = execution_error(server.run(maps_only))
    assert err and err["node_type"] == "DFCaptureLayers" and "aggregate layout" in err["exception_message"]
    run_ok(server, graph)  # the server keeps serving
    no_hooks(server)


def test_an_over_large_capture_is_refused_before_it_samples(server):
    """The native memory guard on the server: 1024 images of 1024x1024 with a cross-attention map would keep
    about 80 GiB per captured step; the sampler's first tapped model call refuses it in one sentence that names what
    fits, and the server keeps serving with no hook left."""
    graph = native("native_ksampler_capture_timeline")
    graph["4"]["inputs"].update(width=1024, height=1024, batch_size=1024)
    graph["5"]["inputs"].update(layers=LAYERS, branch="both")
    err = execution_error(server.run(graph))
    assert err and err["node_type"] == "KSampler", err
    message = err["exception_message"]
    assert message.startswith("capturing 3 layers at ") and " at 1024x1024 would need " in message, message
    assert "is free to this process: not one capture step fits at this size (or capture fewer layers" in message
    run_ok(server, native("native_ksampler_capture_timeline"))
    no_hooks(server)


def test_a_cached_capture_never_serves_an_earlier_prompts_rows(server):
    """ComfyUI caches DFCaptureLayers, so a later prompt gets the very capture of an earlier one. With the sampler's
    model switched to the untapped MODEL, DFCollectFeatures says the capture saw no model call in this prompt
    (ComfyUI names our exception by its public module); the tapped graph queued again samples anew and succeeds."""
    graph = native("native_ksampler_capture_timeline")
    for nid in ("8", "9", "11", "12"):  # the features only
        del graph[nid]
    graph["10"]["inputs"]["filename_prefix"] = "diffusion_feature/native_stale"
    first_files = saved_files(server, run_ok(server, graph))
    untapped = copy.deepcopy(graph)
    untapped["6"]["inputs"]["model"] = ["1", 0]  # Load Checkpoint's own MODEL: the tapped clone reaches no sampler
    err = execution_error(server.run(untapped))
    assert err and err["node_type"] == "DFCollectFeatures", err
    assert "the capture saw no model call in this prompt" in err["exception_message"]
    assert err["exception_type"] == "diffusion_feature.native.capture.NoCaptureError"
    again_files = saved_files(server, run_ok(server, graph))
    assert again_files and not set(again_files) & set(first_files)  # written by this prompt
    first, again = ([load_features(f) for f in files] for files in (first_files, again_files))
    assert [f.meta["step"] for f in again] == [f.meta["step"] for f in first] == [0, 4]
    for a, b in zip(first, again):  # the same graph and seed sampled again: the same rows
        assert torch.equal(a.tensors[LAYER], b.tensors[LAYER])
    no_hooks(server)


def test_repeated_native_prompts_leave_memory_flat_and_no_hooks(server):
    graph = native("native_ksampler_capture_timeline")
    graph["5"]["inputs"].update(layers=LAYERS, branch="both", capture_steps="all")
    graph["6"]["inputs"]["steps"] = 2
    for nid in ("11", "12"):  # the decode and preview of the sampled image: ComfyUI's work, not ours to measure
        del graph[nid]
    assert_memory_flat(server, graph, "6")
    run_ok(server, native("native_lora_extract"))
    status = no_hooks(server)
    assert status["native_models"] >= 1


def test_layer_picker_on_capture_layers_in_a_real_browser(chromium, frontend_server):
    """DFCaptureLayers gets the picker button on every tested frontend; the family comes from the Load Checkpoint
    upstream of its MODEL."""
    from test_comfyui_server import _browser, open_layer_picker, pick_the_one_match

    server = frontend_server
    write_native_models(server.home / "ComfyUI")

    workflow = json.loads((EXAMPLES / "native_ksampler_capture_timeline.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = NATIVE_CKPT
    driver = _browser(chromium)
    try:
        _node_id, count = open_layer_picker(driver, server, workflow, "DFCaptureLayers")
        assert count == 197
        assert driver.execute_script("return document.querySelector('.df-picker-family').value") == "sd15"
        pick_the_one_match(driver, "up-level1-repeat1 cross-q")
        # the API prompt carries the chosen ids
        layers = driver.execute_script("return app.graphToPrompt().then(p => Object.values(p.output)"
                                       ".find(n => n.class_type === 'DFCaptureLayers').inputs.layers)")
        assert layers.split() == [LAYER, "up-level1-repeat1-vit-block0-cross-q"]
    finally:
        driver.quit()


def _tiny_dit_example(name: str, drop: tuple[str, ...], unet: str, vae: str | None = None) -> dict:
    """Example `name`'s API graph on this test's tiny files: the text-encoder nodes `drop` removed (the test-only
    conditioning node stands in for them), Load Diffusion Model (and Load VAE) pointed at the tiny files."""
    graph = json.loads((EXAMPLES / f"{name}.api.json").read_text())
    for key in [k for k, n in graph.items() if n["class_type"] in drop]:
        del graph[key]
    for node in graph.values():
        if node["class_type"] == "UNETLoader":
            node["inputs"]["unet_name"] = unet
        elif node["class_type"] == "VAELoader" and vae is not None:
            node["inputs"]["vae_name"] = vae
    return graph


def test_flux_capture_timeline_and_sd35_cross_map_examples(server):
    """Load Diffusion Model detects the Flux file (one double block at Flux's widths), the test-only conditioning
    node stands in for DualCLIPLoader + CLIPTextEncode + FluxGuidance (full-size T5 cannot be built here); captured
    at cfg 1 under KSampler: one cond row per captured step, t = 1000 sigma falling, the joint PCA one image per
    step. SD3.5: Load Diffusion Model detects the one-block SD3.5 medium-kind file, Load VAE a 16-channel TAESD,
    the test node (family sd3) stands in for TripleCLIPLoader + CLIPTextEncode; DFExtractNative at t = 500 gives
    sigma 0.5 and no guidance, the cross-map (1 head, image tokens x 8 text tokens) rows of a softmax, and
    DFAttentionMap one heatmap over the input image at its size. Z-Image Turbo's recipe (ModelSamplingAuraFlow
    shift 3, cfg 1) on a one-layer Lumina2 file at Lumina2's widths (v0.3.64 cannot load Z-Image; its NextDiT is
    the same backbone), the test node (family z-image: Qwen3-4B's 2560 width and the attention mask) standing in for
    CLIPLoader + CLIPTextEncode, Load VAE the 16-channel TAESD: rows labelled z-image on the 3 x 4 grid, the
    shift-3 sigmas, one PCA image per captured step. Qwen-Image: a one-block file at the real widths, the test node
    (family qwen-image: 3584 wide) for CLIPLoader + CLIPTextEncode, the TAESD for the Wan VAE; DFExtractNative at
    t = 500 as for SD3.5. The 2024-03 ComfyUI predates Flux, SD3, Lumina2 and Qwen-Image (its loader cannot detect
    the files): skipped there by version."""
    if server.name == "comfy2024":
        pytest.skip("ComfyUI 2024-03 has no Flux or SD3: Load Diffusion Model cannot detect the files")
    write_native_flux(server.home / "ComfyUI")
    graph = _tiny_dit_example("native_flux_capture_timeline", ("DualCLIPLoader", "CLIPTextEncode"), NATIVE_FLUX)
    layer = "vit-block0-out"  # the example's layer is Flux dev's block 28; this file has one block
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "FluxGuidance":
            node["class_type"] = "DFTestFluxConditioning"
            node["inputs"] = {"text": "a red house", "tokens": 8, "guidance": inputs["guidance"]}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=64, height=48)
        elif kind == "KSampler":
            inputs["steps"] = 5
        elif kind in ("DFCaptureLayers", "DFFeaturePCA"):
            inputs["layers" if kind == "DFCaptureLayers" else "layer"] = layer
    assert server.get(f"/diffusion_feature/family?kind=diffusion_models&name={NATIVE_FLUX}") == {"family": "flux"}
    entry = run_ok(server, graph)
    metas = [load_features(f) for f in saved_files(server, entry)]
    assert [(f.meta["step"], f.meta["branch"]) for f in metas] == [(0, "cond"), (4, "cond")]
    for f in metas:
        assert f.meta["family"] == "flux" and tuple(f.tensors[layer].shape) == (1, 3072, 3, 4)
        assert f.meta["timestep"] == pytest.approx(1000 * f.meta["sigma"])
    assert metas[0].meta["sigma"] > metas[1].meta["sigma"] > 0
    assert len(images_of(entry)["10"]) == 2  # the joint PCA: one image per captured step
    no_hooks(server)

    write_native_lumina2(server.home / "ComfyUI")
    write_native_sd3(server.home / "ComfyUI")  # its TAESD decodes the 16-channel latent
    graph = _tiny_dit_example("native_z_image_capture_timeline", ("CLIPLoader",), NATIVE_LUMINA2, NATIVE_TAESD3)
    layer = "vit-block0-out"  # the example's is Z-Image's layer 14; this file has one
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CLIPTextEncode":
            node["class_type"] = "DFTestFluxConditioning"
            node["inputs"] = {"text": inputs["text"], "tokens": 8, "guidance": 0.0, "family": "z-image"}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=64, height=48)
        elif kind == "KSampler":
            assert (inputs["steps"], inputs["cfg"]) == (8, 1.0)
            inputs["steps"] = 5
        elif kind in ("DFCaptureLayers", "DFFeaturePCA"):
            inputs["layers" if kind == "DFCaptureLayers" else "layer"] = layer
    entry = run_ok(server, graph)
    metas = [load_features(f) for f in saved_files(server, entry)]
    assert [(f.meta["step"], f.meta["branch"]) for f in metas] == [(0, "cond"), (4, "cond")]
    for f in metas:
        assert f.meta["family"] == "z-image" and tuple(f.tensors[layer].shape) == (1, 2304, 3, 4)
        assert f.meta["timestep"] == pytest.approx(1000 * f.meta["sigma"])
    # ModelSamplingAuraFlow's shift 3 on the simple schedule: the second captured step (4 of 5) at 3s / (1 + 2s)
    assert metas[0].meta["sigma"] == pytest.approx(1.0) and metas[1].meta["sigma"] == pytest.approx(0.6 / 1.4)
    assert len(images_of(entry)["10"]) == 2 and len(images_of(entry)["14"]) == 1  # PCA per step; the decoded image
    no_hooks(server)

    write_native_sd3(server.home / "ComfyUI")
    assert server.get(f"/diffusion_feature/family?kind=diffusion_models&name={NATIVE_SD3}") == {"family": "sd3"}
    cross = _cross_map_example(server, "native_sd35_cross_map", ("TripleCLIPLoader",), NATIVE_SD3, "sd3")
    assert cross.shape[:2] == (1, 1) and cross.shape[3] == 8  # SD3.5 medium's heads (1 in a one-block file)

    write_native_qwen_image(server.home / "ComfyUI")
    cross = _cross_map_example(server, "native_qwen_image_cross_map", ("CLIPLoader",), NATIVE_QWEN, "qwen-image")
    assert tuple(cross.shape) == (1, 24, 80 * 52, 8)  # 24 heads, the 1280 x 832 input's 80 x 52 tokens, 8 text tokens

    # correspondence on Flux: the example's ditf preset needs block 28, this file has one block (its out instead);
    # the 16-channel TAESD stands in for Flux's VAE, the test node for the text encoders; B = A (one extraction)
    graph = _tiny_dit_example("native_flux_match_points", ("DualCLIPLoader", "CLIPTextEncode"), NATIVE_FLUX,
                              NATIVE_TAESD3)
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "FluxGuidance":
            node["class_type"] = "DFTestFluxConditioning"
            node["inputs"] = {"text": "a photo", "tokens": 8, "guidance": inputs["guidance"]}
        elif kind == "DFExtractNative":
            inputs.update(layers="vit-block0-out", preset="none")
        elif kind == "LoadImage":
            inputs["image"] = "example.png"
        elif kind == "DFMatchPoints":
            inputs["points"] = "10,10; 50,30; 90,60"  # the test images are 96x64
        elif kind == "DFSimilarityMap":
            inputs.update(x=50.0, y=30.0)
    shown = images_of(run_ok(server, graph))
    match, heat = (next(k for k, n in graph.items() if n["class_type"] == "PreviewImage" and
                        n["inputs"]["images"][0] == source) for source in ("6", "8"))
    assert _shown(server, shown[match][0]).size == (2 * 96, 64)  # A and B side by side, a line per match
    assert _shown(server, shown[heat][0]).size == (96, 64)  # the similarity heat map over B
    no_hooks(server)


def _cross_map_example(server, name: str, drop: tuple[str, ...], unet: str, family: str) -> torch.Tensor:
    """A cross-map example on a tiny file and the 16-channel TAESD, the test node (of `family`) for its text
    encoder: DFExtractNative at t = 500 gives sigma 0.5 and no guidance, the cross-map (saved beside) rows of a
    joint softmax, and DFAttentionMap one heatmap over the input image at its size. Returns the cross-map."""
    graph = _tiny_dit_example(name, drop, unet, NATIVE_TAESD3)
    layer = "vit-block0-cross-map"  # the examples' are mid-depth blocks; these files have one block
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CLIPTextEncode":
            node["class_type"] = "DFTestFluxConditioning"
            node["inputs"] = {"text": inputs["text"], "tokens": 8, "guidance": 3.5, "family": family}
        elif kind in ("DFExtractNative", "DFAttentionMap"):
            inputs["layers" if kind == "DFExtractNative" else "layer"] = layer
    extract = next(k for k, n in graph.items() if n["class_type"] == "DFExtractNative")
    graph["90"] = {"class_type": "DFSaveFeatures", "inputs": {"features": [extract, 0], "filename_prefix":
                                                              f"diffusion_feature/{name}", "format": "safetensors",
                                                              "layout": "per-sample"}}
    entry = run_ok(server, graph)
    (saved,) = [load_features(f) for f in saved_files(server, entry)]
    assert (saved.meta["family"], saved.meta["t"], saved.meta["sigma"], saved.meta["guidance"]) == \
        (family, 500, 0.5, None)
    cross = saved.tensors[layer]
    assert torch.all(cross.sum(-1) < 1) and torch.all(cross > 0)  # the text keys' share of each joint softmax row
    (shown,) = images_of(entry)[next(k for k, n in graph.items() if n["class_type"] == "PreviewImage")]
    assert _shown(server, shown).size == (96, 64)  # example.png's size: the heatmap lies over the input image
    no_hooks(server)
    return cross

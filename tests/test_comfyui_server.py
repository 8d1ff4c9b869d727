"""Integration: the pack inside a real ComfyUI server, driven over HTTP as a headless user would."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from comfyui_harness import (LINKED_XL, TINY_CKPT, TINY_CN, TINY_LORA, TINY_XL, assert_memory_flat, execution_error,
                             images_of, no_hooks, run_ok, saved_files)
from diffusion_feature import NODE_CLASS_MAPPINGS
from diffusion_feature.engine.features_io import load_features

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
EXTRACT_EXAMPLES = ["attention_maps", "batch_joint_pca", "sd15_extract_pca_save", "sdxl_extract_pca_save"]
TINY_XL_LAYERS = "up-level0-repeat0-vit-block1-out\nup-level1-repeat0-vit-block0-out"


def tiny(graph: dict) -> dict:
    """An example workflow with the tiny test models substituted for the real ones."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "DFLoadCheckpoint":
            inputs["ckpt_name"] = TINY_CKPT
        if node["class_type"] == "DFLoadControlNet":
            inputs["control_net_name"] = TINY_CN
        if node["class_type"] == "DFLoadLoRA":
            inputs["lora_name"] = TINY_LORA
        if node["class_type"] == "DFGenerate":
            inputs.update(width=128, height=96)
        if node["class_type"] == "DFInvert":
            inputs["steps"] = 10
        if node["class_type"] == "DFLoadDiffusers":
            inputs["model_path"] = TINY_XL
            for other in graph.values():
                if other["class_type"] == "DFAttachHooks":
                    other["inputs"].update(layers=TINY_XL_LAYERS, preset="none")
    return graph


def test_object_info_lists_every_node_with_its_inputs(server):
    info = server.get("/object_info")
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, name
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            assert set(info[name]["input"].get(group, {})) == set(spec.get(group, {})), name
        assert info[name]["category"].startswith("diffusion_feature/")
    assert TINY_CKPT in info["DFLoadCheckpoint"]["input"]["required"]["ckpt_name"][0]
    assert TINY_XL in info["DFLoadDiffusers"]["input"]["required"]["model_path"][0]


def test_linked_model_folders_are_listed_and_resolved_but_names_stay_inside(server):
    """models/diffusers/df-linked is a link to a folder outside models/ (models on another drive)."""
    names = server.get("/object_info/DFLoadDiffusers")["DFLoadDiffusers"]["input"]["required"]["model_path"][0]
    assert LINKED_XL in names and TINY_XL in names
    assert server.get(f"/diffusion_feature/family?kind=diffusers&name={LINKED_XL}") == {"family": "sdxl"}
    for name in (f"{LINKED_XL}/../../{TINY_XL}", "../diffusers/" + TINY_XL, str(server.home / "ComfyUI" / "models")):
        code, body = server.get_with_status(f"/diffusion_feature/family?kind=diffusers&name={quote(name)}")
        assert code == 400 and "without '..'" in body["error"] and TINY_XL in body["error"], (name, body)
    graph = tiny(json.loads((EXAMPLES / "sdxl_extract_pca_save.api.json").read_text()))
    loader = next(n for n in graph.values() if n["class_type"] == "DFLoadDiffusers")
    loader["inputs"]["model_path"] = LINKED_XL
    run_ok(server, graph)


def test_node_docs_are_served_where_both_frontends_look(server):
    """The frontend asks docs/<Node>/<locale>.md first, then docs/<Node>.md (for any other locale)."""
    for name in NODE_CLASS_MAPPINGS:
        code, localised = server.get_text(f"/extensions/diffusion_feature/docs/{name}/en.md")
        assert code == 200 and localised.startswith("#"), name
        code, fallback = server.get_text(f"/extensions/diffusion_feature/docs/{name}.md")
        assert code == 200 and fallback == localised, name


def test_layer_routes(server):
    layers = server.get("/diffusion_feature/layers?family=sdxl")["layers"]
    assert len(layers) == 612 and layers[0]["group"] == "unet"
    assert server.get(f"/diffusion_feature/family?kind=checkpoints&name={TINY_CKPT}") == {"family": "sd15"}


def test_every_example_workflow_is_tested():
    from test_native_server import NATIVE_EXAMPLES  # run by tests/test_native_server.py

    names = {p.name[:-len(".api.json")] for p in EXAMPLES.glob("*.api.json")}
    assert names == set(EXTRACT_EXAMPLES) | set(NATIVE_EXAMPLES) | {
        "generate_capture_timeline", "controlnet_canny_denoise_from", "extract_with_lora", "content_shift_comparison",
        "pnp_translate", "inversion_timeline_pca"}


@pytest.mark.parametrize("name", EXTRACT_EXAMPLES)
def test_example_workflow_runs_and_saves_loadable_features(server, name):
    graph = tiny(json.loads((EXAMPLES / f"{name}.api.json").read_text()))
    entry = run_ok(server, graph)
    files = saved_files(server, entry)
    hooks = next(n for n in graph.values() if n["class_type"] == "DFAttachHooks")["inputs"]
    model = server.models["sdxl" if "sdxl" in name else "sd15"]
    images = 2 if name == "batch_joint_pca" else 1
    assert len(files) == images
    for path in files:
        feats = load_features(path)
        expected_ids = (hooks["layers"].split() if hooks["preset"] == "none"
                        else __import__("diffusion_feature").layer_catalog.preset_ids("sd15", hooks["preset"]))
        assert list(feats.tensors) == expected_ids
        shapes = model.show_layers((feats.meta["height"], feats.meta["width"]))
        for layer_id, tensor in feats.tensors.items():
            assert list(tensor.shape[1:]) == shapes[layer_id], layer_id
    previews = [o for o in entry["outputs"].values() if "images" in o]
    assert previews, "the PCA / heatmap preview produced no image"


def _run_example(server, name: str) -> tuple[dict, dict]:
    graph = tiny(json.loads((EXAMPLES / f"{name}.api.json").read_text()))
    entry = run_ok(server, graph)
    return graph, entry


def test_generate_example_captures_a_labelled_timeline(server):
    graph, entry = _run_example(server, "generate_capture_timeline")
    files = saved_files(server, entry)
    assert [f.name.split("_", 2)[-1] for f in files] == [f"step{s:03d}_cond.safetensors" for s in (0, 4, 8, 12, 16)]
    shapes = server.models["sd15"].show_layers((96, 128))
    steps = []
    for path in files:
        feats = load_features(path)
        assert list(feats.tensors) == ["up-level1-repeat1-res-out"] and feats.meta["branch"] == "cond"
        assert list(feats.tensors["up-level1-repeat1-res-out"].shape[1:]) == shapes["up-level1-repeat1-res-out"]
        steps.append((feats.meta["step"], feats.meta["timestep"]))
    assert [s for s, _ in steps] == [0, 4, 8, 12, 16] and steps[0][1] > steps[-1][1]  # noise level falls
    images = images_of(entry)
    assert len(images["6"]) == 1 and len(images["8"]) == 5  # the generated image; one PCA image per step


def test_controlnet_example_extracts_with_canny_guidance_and_denoise_from(server):
    graph, entry = _run_example(server, "controlnet_canny_denoise_from")
    (path,) = saved_files(server, entry)
    feats = load_features(path)
    assert feats.meta["denoise_from"] == 60 and feats.meta["t"] == 50
    assert feats.meta["controlnets"] == [{"name": Path(TINY_CN).stem, "strength": 1.0}]
    # without the ControlNet (and from t itself) the decoder's features differ; the encoder's do not
    plain = copy.deepcopy(graph)
    plain["4"]["inputs"].update(conditioning=["3", 0], denoise_from=0)
    plain["7"]["inputs"]["filename_prefix"] = "diffusion_feature/plain"
    (plain_path,) = saved_files(server, run_ok(server, plain))
    other = load_features(plain_path)
    assert not torch.allclose(feats.tensors["up-level1-repeat2-res-out"], other.tensors["up-level1-repeat2-res-out"])
    # the ControlNet ran under ComfyUI's memory management, as the main model does (no fallback, on any version)
    assert "memory manager did not accept" not in server.log_text()


def test_lora_example_changes_features_and_never_leaks_into_the_plain_model(server):
    def features_of(graph):
        entry = run_ok(server, graph)
        return load_features(saved_files(server, entry)[0]).tensors

    plain_graph = _sd15_graph({})
    before = features_of(plain_graph)
    _, entry = _run_example(server, "extract_with_lora")
    with_lora = load_features(saved_files(server, entry)[0]).tensors
    after = features_of(plain_graph)
    layer = "up-level1-repeat2-res-out"
    assert not torch.allclose(with_lora[layer], before[layer])
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_content_shift_comparison_shows_four_feature_sets_in_one_pca(server):
    _, entry = _run_example(server, "content_shift_comparison")
    images = images_of(entry)
    assert len(images["6"]) == 4 and len(images["14"]) == 1  # plain | fine-grained | ControlNet | LoRA; the edges


def test_pnp_example_translates_a_real_image_with_two_prompts(server):
    _, entry = _run_example(server, "pnp_translate")
    images = images_of(entry)
    assert len(images["32"]) == 2 and len(images["33"]) == 1  # two translations; the reconstruction
    assert "PSNR" in entry["outputs"]["30"]["text"][0]  # the reconstruction error, reported on the node
    no_hooks(server)


def test_inversion_timeline_example_shows_one_image_per_captured_step(server):
    graph, entry = _run_example(server, "inversion_timeline_pca")
    files = saved_files(server, entry)
    assert [load_features(f).meta["step"] for f in files] == [0]  # 10 steps in the tiny run: 'every 10' is step 0
    images = images_of(entry)
    assert len(images["6"]) == len(images["9"]) == 1
    graph["30"]["inputs"]["capture_steps"] = "every 3"
    graph["7"]["inputs"]["filename_prefix"] = "diffusion_feature/inversion3"
    entry = run_ok(server, graph)
    steps = [load_features(f).meta["step"] for f in saved_files(server, entry)]
    assert steps == [0, 3, 6, 9]
    images = images_of(entry)
    assert len(images["6"]) == len(images["9"]) == 4


def _sd15_graph(changes: dict) -> dict:
    graph = tiny(json.loads((EXAMPLES / "sd15_extract_pca_save.api.json").read_text()))
    for (node, key), value in changes.items():
        graph[node]["inputs"][key] = value
    return graph


def test_bad_inputs_fail_clearly_and_the_server_keeps_serving(server):
    bad_layer = server.run(_sd15_graph({("2", "layers"): "up-level9-repeat0-res-out", ("2", "preset"): "none"}))
    err = execution_error(bad_layer)
    assert err and err["node_type"] == "DFAttachHooks" and "nearest valid ids" in err["exception_message"]
    escaping = server.run(_sd15_graph({("7", "filename_prefix"): "../../escape/x"}))
    err = execution_error(escaping)
    assert err and err["node_type"] == "DFSaveFeatures"
    assert "must stay inside the output folder" in err["exception_message"]
    bad_t = server.run(_sd15_graph({("4", "t"): 1000}))
    # ComfyUI checks widget ranges before running anything: the prompt is refused with the node and the limit named
    assert "rejected" in bad_t and "999" in json.dumps(bad_t["rejected"]) and '"4"' in json.dumps(bad_t["rejected"])
    run_ok(server, _sd15_graph({("4", "seed"): 123}))


def test_twenty_prompts_leave_memory_flat_and_no_hooks(server):
    graph = _sd15_graph({("2", "layers"): "up-level2-repeat1-vit-block0-cross-map", ("2", "preset"): "practical"})
    assert_memory_flat(server, graph, "4")
    # ComfyUI's "free memory" request unloads managed models; the next prompt loads them again and runs
    assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    # ComfyUI's worker handles the request between prompts: wait until it has (the models are gone), so the next
    # prompt cannot run before it
    assert server.wait_for(lambda: server.get("/diffusion_feature/status")["models"] == 0, timeout=120), \
        f"the /free request never unloaded the models; held by: {server.get('/df_test/holders')}"
    graph["4"]["inputs"]["seed"] = 99
    run_ok(server, graph)
    assert no_hooks(server)["models"] >= 1


# ---- the layer picker in a real browser (Debian's chromium, headless) -------------------------------------------
def _browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    service = Service(driver)
    return webdriver.Chrome(service=service, options=options)


def _wait(driver, script: str, timeout: float = 60):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"browser condition never held: {script}")


def load_in_page(driver, server, workflow: dict, extension: str, node_type: str) -> None:
    """Open the server's page and load a UI workflow once our `extension` is registered and so is `node_type`: the
    frontend registers extensions, then fetches /object_info and registers the node types (our
    beforeRegisterNodeDef patches them then); a graph loaded in between gets nodes of unknown types, without our
    widgets (it happened once in CI under load)."""
    driver.get(server.url)
    _wait(driver, f"return window.app && app.extensions && app.extensions.some(e => e.name === '{extension}') && "
                  f"window.LiteGraph && !!LiteGraph.registered_node_types['{node_type}']")
    # the promise's value (a workflow object in current frontends) is no business of the test's
    driver.execute_script("return Promise.resolve(app.loadGraphData(arguments[0])).then(() => true)", workflow)


def open_layer_picker(driver, server, workflow: dict, node_type: str) -> tuple[int, int]:
    """Load a UI workflow in the server's page and open the layer picker of its `node_type` node, once that node
    has its picker button: (the node's id, how many ids the picker lists)."""
    load_in_page(driver, server, workflow, "diffusion_feature.layer_picker", node_type)
    node_id = _wait(driver, f"const n = app.graph._nodes.find(n => n.type === '{node_type}'); "
                            "return n && n.widgets.some(w => w.name === 'pick layers…') && n.id")
    driver.execute_script("diffusionFeaturePicker.open(app.graph.getNodeById(arguments[0]))", node_id)
    return node_id, _wait(driver, "return document.querySelectorAll('.df-picker-item').length")


def pick_the_one_match(driver, query: str, screenshot: Path | None = None) -> None:
    """In the open picker: search `query`, which must leave one id, tick it and apply (a screenshot before)."""
    driver.find_element("css selector", ".df-picker-search").send_keys(query)
    _wait(driver, "return document.querySelectorAll('.df-picker-item').length === 1")
    driver.find_element("css selector", ".df-picker-item input").click()
    if screenshot is not None:
        driver.save_screenshot(str(screenshot))
    driver.find_element("css selector", ".df-picker-apply").click()


def tiny_ui_workflow(name: str = "sd15_extract_pca_save", show_layers: bool = True) -> dict:
    """A UI-format example workflow with the tiny test checkpoint substituted and (show_layers) a DFShowLayers node
    on its checkpoint loader."""
    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    loader = next(n for n in workflow["nodes"] if n["type"] == "DFLoadCheckpoint")
    loader["widgets_values"][0] = TINY_CKPT
    if not show_layers:
        return workflow
    node_id, link_id = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
    workflow["nodes"].append({
        "id": node_id, "type": "DFShowLayers", "pos": [loader["pos"][0], loader["pos"][1] + 400], "size": [440, 120],
        "flags": {}, "order": len(workflow["nodes"]), "mode": 0,
        "inputs": [{"name": "model", "type": "DF_MODEL", "link": link_id}],
        "outputs": [{"name": "layers", "type": "STRING", "links": None}],
        "properties": {"Node name for S&R": "DFShowLayers"}, "widgets_values": [512, 512]})
    workflow["links"].append([link_id, loader["id"], 0, node_id, 0, "DF_MODEL"])
    loader["outputs"][0]["links"] = [*(loader["outputs"][0]["links"] or []), link_id]
    workflow["last_node_id"], workflow["last_link_id"] = node_id, link_id
    return workflow


def test_layer_picker_in_a_real_browser(chromium, frontend_server, tmp_path):
    server = frontend_server
    workflow = tiny_ui_workflow()
    driver = _browser(chromium)
    try:
        node_id, count = open_layer_picker(driver, server, workflow, "DFAttachHooks")
        assert count == 197  # sd15's ids: the family was detected from the connected checkpoint
        assert driver.execute_script("return document.querySelector('.df-picker-family').value") == "sd15"
        pick_the_one_match(driver, "up-level1-repeat1 cross-q", screenshot=tmp_path / "picker.png")
        value = driver.execute_script("return app.graph.getNodeById(arguments[0]).widgets"
                                      ".find(w => w.name === 'layers').value", node_id)
        assert value.split() == ["up-level1-repeat1-vit-block0-cross-q"]
        assert driver.execute_script("return document.querySelectorAll('.df-picker').length") == 0
        # the API prompt built from the graph carries the chosen ids and no value for the button
        prompt = driver.execute_script("return app.graphToPrompt().then(p => p.output)")
        hooks = next(n for n in prompt.values() if n["class_type"] == "DFAttachHooks")
        assert hooks["inputs"]["layers"] == "up-level1-repeat1-vit-block0-cross-q"
        _check_layer_list(driver, server, tmp_path)
    finally:
        driver.quit()


def _check_layer_list(driver, server, tmp_path):
    """Run the graph from the page: DFShowLayers' list shows as readable multi-line read-only text, and is sent back
    in no later prompt and stored in no saved workflow."""
    show_id = driver.execute_script("return app.graph._nodes.find(n => n.type === 'DFShowLayers').id")
    driver.execute_script("app.queuePrompt(0, 1)")
    text = _wait(driver, "const a = document.querySelector('.df-layer-list'); return a && a.value", timeout=180)
    lines = text.splitlines()
    assert lines[0] == "# sd15: 197 layer ids at 512x512" and len(lines) == 198
    driver.execute_script("const c = app.canvas; c.ds.scale = 1; c.centerOnNode(app.graph.getNodeById(arguments[0])); "
                          "c.setDirty(true, true); c.draw(true, true)", show_id)
    _wait(driver, "const a = document.querySelector('.df-layer-list'); "
                  "return a.offsetParent !== null && a.getBoundingClientRect().height > 100")
    box = driver.execute_script(
        "const a = document.querySelector('.df-layer-list'); const r = a.getBoundingClientRect(); "
        "const line = parseFloat(getComputedStyle(a).lineHeight) || 1.2 * parseFloat(getComputedStyle(a).fontSize); "
        "return {readOnly: a.readOnly, rows: r.height / line, width: r.width, shown: a.offsetParent !== null, "
        "textarea: a.tagName}")
    assert box["textarea"] == "TEXTAREA" and box["readOnly"] and box["shown"], box
    assert box["rows"] >= 8 and box["width"] >= 300, box  # many lines at once, not one truncated line
    driver.save_screenshot(str(tmp_path / "layer_list.png"))
    prompt = driver.execute_script("return app.graphToPrompt().then(p => ({output: p.output, workflow: p.workflow}))")
    show = prompt["output"][str(show_id)]
    assert show["class_type"] == "DFShowLayers" and set(show["inputs"]) == {"model", "width", "height"}, show
    saved = driver.execute_script("return JSON.stringify(app.graph.serialize())")
    for workflow in (json.dumps(prompt["workflow"]), saved):
        assert lines[1] not in workflow and "layer ids at 512x512" not in workflow
    nodes = {str(n["id"]): n for n in json.loads(saved)["nodes"]}
    assert nodes[str(show_id)]["widgets_values"] == [512, 512], (show_id, nodes.get(str(show_id)), list(nodes))


# ---- DFSimilarityMap's click-to-query in a real browser --------------------------------------------------------------
def _similarity_workflow(server) -> dict:
    """DFLoadFeatures of two small feature files written here + the server's two 96x64 input images ->
    DFSimilarityMap (A beside the heat map over B), as a UI workflow."""
    import importlib.util

    from diffusion_feature.engine.features_io import Features, save_features

    g = torch.Generator().manual_seed(0)
    meta = {"family": "sd15", "width": 96, "height": 64, "input_width": 96, "input_height": 64}
    folder = server.output_dir / "df_click"
    if not folder.exists():
        for name in ("a", "b"):
            save_features(Features({"up-level2-repeat0-res-out": torch.randn(1, 8, 8, 12, generator=g)}, meta),
                          folder, names=[name])
    spec = importlib.util.spec_from_file_location("build_examples", EXAMPLES / "build_examples.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    graph = {"1": {"class_type": "DFLoadFeatures", "inputs": {"path": "df_click/a.safetensors"}},
             "2": {"class_type": "DFLoadFeatures", "inputs": {"path": "df_click/b.safetensors"}},
             "3": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
             "4": {"class_type": "LoadImage", "inputs": {"image": "example2.png"}},
             "5": {"class_type": "DFSimilarityMap", "inputs": {
                 "features_a": ["1", 0], "features_b": ["2", 0], "x": 10.0, "y": 10.0, "layers": "",
                 "image_b": ["4", 0], "image_a": ["3", 0]}}}
    return builder.to_ui(graph)


def test_similarity_map_click_to_query_in_a_real_browser(chromium, frontend_server, tmp_path):
    """Run the graph from the page; DFSimilarityMap shows A beside the heat map; a click on A's pixel (60, 40) sets
    the node's x and y to it and runs the graph again, whose prompt carries them and whose preview is new."""
    from selenium.webdriver.common.action_chains import ActionChains

    server = frontend_server
    workflow = _similarity_workflow(server)
    driver = _browser(chromium)
    try:
        load_in_page(driver, server, workflow, "diffusion_feature.similarity_map", "DFSimilarityMap")
        node_id = driver.execute_script("return app.graph._nodes.find(n => n.type === 'DFSimilarityMap').id")
        driver.execute_script("app.queuePrompt(0, 1)")
        first = _wait(driver, "const i = document.querySelector('.df-similarity-preview'); "
                              "return i && i.complete && i.naturalWidth > 0 && i.src", timeout=180)
        assert first.startswith("data:image/jpeg;base64,")
        driver.execute_script("const c = app.canvas; c.ds.scale = 1; c.centerOnNode(app.graph.getNodeById(arguments[0]));"
                              " c.setDirty(true, true); c.draw(true, true)", node_id)
        _wait(driver, "const i = document.querySelector('.df-similarity-preview'); "
                      "return i.offsetParent !== null && i.getBoundingClientRect().width > 100")
        # where A's pixel (60, 40) is drawn: the picture is object-fit: contain in the element's box, 192x64 in all
        box = driver.execute_script("const r = document.querySelector('.df-similarity-preview').getBoundingClientRect();"
                                    " return {w: r.width, h: r.height}")
        scale = min(box["w"] / 192, box["h"] / 64)
        dx = (box["w"] - 192 * scale) / 2 + 60.5 * scale - box["w"] / 2  # offsets from the element's centre
        dy = (box["h"] - 64 * scale) / 2 + 40.5 * scale - box["h"] / 2
        image = driver.find_element("css selector", ".df-similarity-preview")
        ActionChains(driver).move_to_element_with_offset(image, round(dx), round(dy)).click().perform()
        # the frontend may be redrawing the node's widgets right after the click (it queues the graph): read them
        # only once both are there again
        xy = _wait(driver, f"const n = app.graph.getNodeById({node_id}); "
                           "const w = (name) => ((n && n.widgets) || []).find(v => v.name === name); "
                           "const x = w('x'), y = w('y'); return x && y && x.value !== 10 && [x.value, y.value]",
                   timeout=30)
        assert abs(xy[0] - 60.5) <= 1.5 and abs(xy[1] - 40.5) <= 1.5, xy
        second = _wait(driver, "const i = document.querySelector('.df-similarity-preview'); "
                               f"return i.src !== {json.dumps(first)} && i.dataset.x !== '10' && "
                               "[i.dataset.x, i.dataset.y]", timeout=180)
        assert [float(v) for v in second] == [float(v) for v in xy]  # the new preview is the clicked point's
        driver.save_screenshot(str(tmp_path / "similarity.png"))
    finally:
        driver.quit()
    ran = [entry["prompt"][2][str(node_id)]["inputs"] for entry in server.get("/history").values()
           if entry["prompt"][2].get(str(node_id), {}).get("class_type") == "DFSimilarityMap"]
    assert any((float(i["x"]), float(i["y"])) == (float(xy[0]), float(xy[1])) for i in ran), ran

"""Every node's function on tiny models, without ComfyUI installed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import hook_state, save_sd15_folder
from diffusion_feature import NODE_CLASS_MAPPINGS
from diffusion_feature.layer_catalog import LayerIdError
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.output_paths import OutputPathError, resolve_prefix, sample_names
from diffusion_feature.nodes.routes import group_of, layers_payload
from ldm_export import sd15_single_file_state

N = {name: cls() for name, cls in NODE_CLASS_MAPPINGS.items()}
IDS = "up-level2-repeat1-vit-block0-cross-q\nmid-repeat0-res-out, up-level2-repeat1-vit-block0-cross-map"


@pytest.fixture(scope="module")
def model(tiny_sd15):
    return tiny_sd15


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("DF_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("DF_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    return tmp_path


def test_every_node_declares_its_contract():
    assert set(NODE_CLASS_MAPPINGS) == {"DFLoadCheckpoint", "DFLoadDiffusers", "DFEncodePrompt", "DFAttachHooks",
                                        "DFExtractFeatures", "DFShowLayers", "DFFeaturePCA", "DFAttentionMap",
                                        "DFSaveFeatures", "DFLoadFeatures", "DFGenerate", "DFLoadControlNet",
                                        "DFApplyControlNet", "DFLoadLoRA", "DFInvert", "DFPnPTranslate",
                                        "DFSelfAttentionPCA", "DFCaptureLayers", "DFCollectFeatures",
                                        "DFExtractNative", "DFMatchPoints", "DFSimilarityMap"}
    docs = Path(__file__).resolve().parents[1] / "web" / "docs"
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert (docs / f"{name}.md").is_file(), f"{name} has no web/docs page"
        # current frontends ask docs/<Node>/<locale>.md first, then docs/<Node>.md: English is the same page
        assert (docs / name / "en.md").read_text() == (docs / f"{name}.md").read_text(), name
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("diffusion_feature/"), name
        spec = cls.INPUT_TYPES()
        for group in (spec["required"], spec.get("optional", {})):  # "hidden" ones are ComfyUI's, not widgets
            for input_name, (_type, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert hasattr(cls(), cls.FUNCTION)


def _widget_names(cls) -> list[str]:
    """The node's widgets in the order ComfyUI stores their values in a saved (UI) workflow."""
    spec = cls.INPUT_TYPES()
    return [name for group in ("required", "optional") for name, (kind, *_) in spec.get(group, {}).items()
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")]


EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"


@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.glob("*.json") if not p.name.endswith(".api.json")),
                         ids=lambda p: p.stem)
def test_saved_workflows_keep_their_widget_order(path):
    """A saved workflow holds widget values by position: read back by today's widget order, every value of the
    pack's nodes is the one its API twin (which names its inputs) gives that widget."""
    import json

    api = json.loads(path.with_name(f"{path.stem}.api.json").read_text())
    checked = 0
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        values, names = list(node["widgets_values"]), _widget_names(NODE_CLASS_MAPPINGS[node["type"]])
        if "seed" in names:  # the frontend's control_after_generate value follows the seed
            assert values.pop(names.index("seed") + 1) == "fixed"
        inputs = api[str(node["id"])]["inputs"]
        assert dict(zip(names, values)) == {n: inputs[n] for n in names}, (path.name, node["type"])
        assert len(values) == len(names), (path.name, node["type"])
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", ["DFExtractFeatures", "DFExtractNative"])
def test_extract_nodes_share_their_widgets_and_defaults(name):
    """DFExtractNative offers DFExtractFeatures' widgets with the same names, order, ranges and defaults, and each
    node's function defaults are its widgets' defaults (a workflow missing a value runs as the widget shows)."""
    import inspect

    cls = NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    shared = ["t", "seed", "resize", "ensemble", "feature_resize", "offload", "batch_size", "denoise_from",
              "denoise_steps"]
    assert [n for n in _widget_names(cls) if n in shared] == shared
    main = NODE_CLASS_MAPPINGS["DFExtractFeatures"].INPUT_TYPES()
    for group in ("required", "optional"):
        for n in set(spec[group]) & set(main[group]) & set(shared):
            strip = {k: v for k, v in spec[group][n][1].items() if k != "tooltip"}
            assert (spec[group][n][0], strip) == (main[group][n][0],
                                                  {k: v for k, v in main[group][n][1].items() if k != "tooltip"}), n
    signature = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for n, (_kind, opts) in spec["optional"].items():
        assert signature[n].default == opts["default"], n

def _images(n=2, h=64, w=96):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_graph_attach_extract_pca_save_load(model, dirs):
    before = hook_state(model.denoiser)
    (cond,) = N["DFEncodePrompt"].encode(model, "a photo of a cat")
    (hooked,) = N["DFAttachHooks"].attach(model, IDS, "none")
    assert model.layers is None and hooked.denoiser is model.denoiser  # a cheap clone; the input is unchanged
    images = _images()
    (features,) = N["DFExtractFeatures"].extract(hooked, images, cond, 50, 7, batch_size=1)
    want = extract(model, images, "a photo of a cat", hooked.layers, t=50, seed=7)
    for k in want.tensors:
        torch.testing.assert_close(features.tensors[k], want.tensors[k], atol=1e-5, rtol=1e-5)
    assert hook_state(model.denoiser) == before
    (pca,) = N["DFFeaturePCA"].pca(features, "up-level2-repeat1-vit-block0-cross-q", True)
    assert pca.shape == (2, 64, 96, 3) and 0.0 <= float(pca.min()) and float(pca.max()) <= 1.0
    heat, mask = N["DFAttentionMap"].show(features, "", 1, 0.5, 0.5, images)
    assert heat.shape == (2, 64, 96, 3) and mask.shape == (2, 64, 96)
    out = N["DFSaveFeatures"].save(features, "runs/cat", "safetensors", "per-sample")
    names = [e["filename"] for e in out["ui"]["features"]]
    assert names == ["cat_00001_.safetensors", "cat_00002_.safetensors"]
    assert {e["subfolder"] for e in out["ui"]["features"]} == {"runs"}
    again = N["DFSaveFeatures"].save(features, "runs/cat", "safetensors", "per-sample")
    assert [e["filename"] for e in again["ui"]["features"]] == ["cat_00003_.safetensors", "cat_00004_.safetensors"]
    (loaded,) = N["DFLoadFeatures"].load("runs/cat_00002_.safetensors")
    for k in want.tensors:
        assert torch.equal(loaded.tensors[k][0], features.tensors[k][1])


def test_graph_generate_capture_timeline_pca_save(model, dirs):
    from diffusion_feature.engine.generation import generate

    (pos,) = N["DFEncodePrompt"].encode(model, "a red house")
    (hooked,) = N["DFAttachHooks"].attach(model, "mid-repeat1-res-out", "none")
    image, features = N["DFGenerate"].run(hooked, pos, 4, 6, 5.0, "ddim", 64, 96, 1, "every 2", "cond")
    want = generate(model, pos, None, steps=6, cfg=5.0, seed=4, width=64, height=96, scheduler="ddim",
                    layers=["mid-repeat1-res-out"], capture_steps=[0, 2, 4])
    assert torch.equal(image, want.images) and image.shape == (1, 96, 64, 3)
    assert torch.equal(features.tensors["mid-repeat1-res-out"], want.features.tensors["mid-repeat1-res-out"])
    (timeline,) = N["DFFeaturePCA"].pca(features, "", True)
    assert timeline.shape == (3, 96, 64, 3)  # one image per captured step, at the generated size
    out = N["DFSaveFeatures"].save(features, "gen/run", "safetensors", "per-sample")
    assert [e["filename"] for e in out["ui"]["features"]] == [
        f"run_{k:05d}_step{s:03d}_cond.safetensors" for k, s in ((1, 0), (2, 2), (3, 4))]
    (loaded,) = N["DFLoadFeatures"].load("gen/run_00002_step002_cond.safetensors")
    assert loaded.meta["step"] == 2 and loaded.meta["branch"] == "cond" and loaded.meta["scheduler"] == "ddim"
    assert loaded.meta["timestep"] == features.meta["rows"][1]["timestep"]
    assert torch.equal(loaded.tensors["mid-repeat1-res-out"][0], features.tensors["mid-repeat1-res-out"][1])
    # nothing attached: the image alone, empty features that a save refuses clearly
    image2, empty = N["DFGenerate"].run(model, pos, 4, 6, 5.0, "ddim", 64, 96, 1, "every 2", "cond")
    assert torch.equal(image2, image) and empty.tensors == {}
    with pytest.raises(ValueError, match="nothing was captured"):
        N["DFSaveFeatures"].save(empty, "gen/none")


def test_pca_of_several_feature_sets_is_one_joint_fit(model, dirs):
    from diffusion_feature.engine.visualize import pca_rgb

    (hooked,) = N["DFAttachHooks"].attach(model, "up-level1-repeat2-res-out", "none")
    sets = []
    for text in ("a photo", "a photo of a small red house with a white door"):
        (cond,) = N["DFEncodePrompt"].encode(model, text)
        sets.append(N["DFExtractFeatures"].extract(hooked, _images(1), cond, 50, 0)[0])
    (both,) = N["DFFeaturePCA"].pca(sets[0], "", True, size="feature grid", features_2=sets[1])
    layer = sets[0].tensors["up-level1-repeat2-res-out"]
    want = pca_rgb([layer[0], sets[1].tensors["up-level1-repeat2-res-out"][0]], joint=True)
    assert both.shape == (2, *layer.shape[-2:], 3)
    assert torch.equal((both * 255).round().to(torch.uint8), torch.from_numpy(__import__("numpy").stack(want)))


def test_graph_invert_translate_and_self_attention_timeline(model, dirs):
    from diffusion_feature.engine.pnp import translate
    from diffusion_feature.engine.visualize import self_attention_pca

    self_map = "up-level1-repeat1-vit-block0-self-map"  # 1/4 of the latent grid: 14 x 20 queries at 448 x 640
    (hooked,) = N["DFAttachHooks"].attach(model, f"{self_map}\nup-level1-repeat1-res-increment", "none")
    image = _images(1)
    out = N["DFInvert"].run(hooked, image, "", 4, check_reconstruction=True, capture_steps="all")
    inversion, recon, features = out["result"]
    assert recon.shape == (1, 448, 640, 3) and "PSNR" in out["ui"]["text"][0]  # keep-aspect: sd15's area
    assert [r["step"] for r in features.meta["rows"]] == [0, 1, 2, 3]
    (timeline,) = N["DFSelfAttentionPCA"].pca(features, "", True, size="feature grid")
    want = self_attention_pca(features.tensors[self_map], (448, 640), joint=True)
    assert timeline.shape == (4, 14, 20, 3)  # one image per inversion step, on the query grid
    assert torch.equal((timeline * 255).round().to(torch.uint8), torch.from_numpy(__import__("numpy").stack(want)))
    images, translated = N["DFPnPTranslate"].run(hooked, inversion, "a cat\n\na dog\n", 5.0, 0.8, 0.5,
                                                 capture_steps="last")
    direct = translate(model, inversion, ["a cat", "a dog"], cfg=5.0, negative_schedule="linear")
    assert images.shape == (2, 448, 640, 3)
    torch.testing.assert_close(images, direct.images, atol=1e-4, rtol=0)  # explicit softmax (the map) vs SDPA
    assert [r["branch"] for r in translated.meta["rows"]] == ["cond", "cond"]
    with pytest.raises(ValueError, match="is not an attention map; use DFFeaturePCA"):
        N["DFSelfAttentionPCA"].pca(features, "up-level1-repeat1-res-increment", True)


def test_node_errors_are_clear(model, dirs):
    with pytest.raises(LayerIdError, match="nearest valid ids"):
        N["DFAttachHooks"].attach(model, "up-level7-repeat0-res-out", "none")
    with pytest.raises(ValueError, match="no layers chosen"):
        N["DFAttachHooks"].attach(model, "  ", "none")
    (cond,) = N["DFEncodePrompt"].encode(model, "")
    with pytest.raises(ValueError, match="no layers attached"):
        N["DFExtractFeatures"].extract(model, _images(1), cond, 50, 0)
    (hooked,) = N["DFAttachHooks"].attach(model, "", "legacy")
    with pytest.raises(ValueError, match="t must be an integer training timestep"):
        N["DFExtractFeatures"].extract(hooked, _images(1), cond, 1000, 0)
    (features,) = N["DFExtractFeatures"].extract(hooked, _images(1), cond, 10, 0)
    with pytest.raises(OutputPathError, match="contains '..'; names must stay inside the output folder"):
        N["DFSaveFeatures"].save(features, "../escape/x")
    with pytest.raises(OutputPathError, match="absolute path"):
        N["DFSaveFeatures"].save(features, "/tmp/x")
    with pytest.raises(ValueError, match="contains '..'; names must stay inside the output folder"):
        N["DFLoadFeatures"].load("../../etc/passwd")
    with pytest.raises(ValueError, match="not in these features"):
        N["DFFeaturePCA"].pca(features, "unet-out", True)
    with pytest.raises(ValueError, match="no attention-map layer"):
        N["DFAttentionMap"].show(features, "", 1, 0.5, 0.5)


def test_interrupt_stops_between_batches_and_leaves_nothing(model, dirs, monkeypatch):
    from diffusion_feature.nodes import comfy_env

    class Interrupted(Exception):
        pass

    calls = []

    def interrupt_after_first_batch():
        calls.append(1)
        if len(calls) > 2:  # one check before the run, one after batch 1, then the user pressed Cancel
            raise Interrupted

    monkeypatch.setattr(comfy_env, "check_interrupt", interrupt_after_first_batch)
    before = hook_state(model.denoiser)
    (cond,) = N["DFEncodePrompt"].encode(model, "")
    (hooked,) = N["DFAttachHooks"].attach(model, "mid-repeat0-res-out", "none")
    with pytest.raises(Interrupted):
        N["DFExtractFeatures"].extract(hooked, _images(4), cond, 50, 0, batch_size=1)
    assert len(calls) == 3 and hook_state(model.denoiser) == before


def test_one_prompt_per_line_and_per_image_batches(model, dirs):
    (cond,) = N["DFEncodePrompt"].encode(model, "a cat\n\na dog", one_per_line=True)
    assert cond.batch == 2 and cond.prompts == ["a cat", "a dog"]
    (hooked,) = N["DFAttachHooks"].attach(model, "mid-repeat0-res-out", "none")
    (together,) = N["DFExtractFeatures"].extract(hooked, _images(2), cond, 50, 1, batch_size=2)
    (apart,) = N["DFExtractFeatures"].extract(hooked, _images(2), cond, 50, 1, batch_size=1)
    torch.testing.assert_close(together.tensors["mid-repeat0-res-out"], apart.tensors["mid-repeat0-res-out"],
                               atol=1e-5, rtol=1e-5)
    assert together.meta["prompt"] == ["a cat", "a dog"]


def test_checkpoint_loader_uses_the_model_folder(model, dirs):
    ckpt_dir = dirs / "checkpoints"
    ckpt_dir.mkdir()
    save_file(sd15_single_file_state(model.denoiser, model.vae, model.text_encoders[0]),
              str(ckpt_dir / "tiny.safetensors"))
    assert N["DFLoadCheckpoint"].INPUT_TYPES()["required"]["ckpt_name"][0] == ["tiny.safetensors"]
    with pytest.raises(ValueError, match="not in the checkpoints folder"):
        N["DFLoadCheckpoint"].load(ckpt_name="../elsewhere.safetensors")
    save_sd15_folder(model, ckpt_dir / "tiny.config")
    loaded = N["DFLoadCheckpoint"].load(ckpt_name="tiny.safetensors", family="sd15", dtype="float32", device="cpu")
    assert loaded[0].family == "sd15" and loaded[0].source.endswith("tiny.safetensors")


def test_show_layers_node(model):
    result = N["DFShowLayers"].show(model, 96, 64)
    text = result["result"][0]
    assert result["ui"]["text"] == [text]
    assert "mid-repeat0-res-out  32 x 1 x 2" in text.splitlines()


def test_output_prefix_rules(tmp_path):
    assert resolve_prefix("a/b/name", tmp_path)[1:] == ("name", "a/b")
    folder, names, sub = sample_names("x", tmp_path, 2)
    assert folder == tmp_path.resolve() and names == ["x_00001_", "x_00002_"] and sub == ""
    (tmp_path / "x_00007_.safetensors").write_bytes(b"")
    assert sample_names("x", tmp_path, 1)[1] == ["x_00008_"]
    for bad in ("", "..", "a/../../b", "/abs/x"):
        with pytest.raises(OutputPathError):
            resolve_prefix(bad, tmp_path)


def test_layer_picker_payload():
    payload = layers_payload("sdxl")
    assert len(payload["layers"]) == 612 and payload["presets"]["practical"]
    assert payload["layers"][0] == {"id": "unet-in", "shape": [4, 128, 128], "group": "unet"}
    assert group_of("up-level1-repeat0-vit-block0-cross-q") == "up-level1"
    assert group_of("mid-vit-block3-out") == "mid" and group_of("vit-block13-out") == "vit-block12-15"
    assert group_of("vit-refiner1-txt-out") == group_of("vit-refiner0-self-map") == "vit-refiners"  # Z-Image
    with pytest.raises(ValueError, match="unknown family"):
        layers_payload("sd4")

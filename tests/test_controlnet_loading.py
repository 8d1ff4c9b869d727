"""Loading ControlNets offline in every format we accept (diffusers folder, original-layout and diffusers-layout
single files, pickles read with weights_only), the bundled full-size configs, family detection, compatibility
checks against a model, and the loader node."""
from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_controlnet, tiny_feature_model, tiny_pixart, tiny_sd15_unet, tiny_sdxl_unet
from diffusion_feature.layer_catalog.families import dummy_inputs, meta_denoiser
from diffusion_feature.engine.controlnet import (CONTROLNET_FAMILIES, ControlNet, ControlNetError, bundled_config,
                                                 check_compatible, detect_family, layout_of, load_controlnet)
from diffusion_feature.engine.checkpoint_files import CheckpointError
from diffusion_feature.nodes.node_controlnet import DFLoadControlNet
from ldm_export import controlnet_to_ldm



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd15_net():
    return tiny_controlnet(tiny_sd15_unet())


@pytest.fixture(scope="module")
def sdxl_net():
    return tiny_controlnet(tiny_sdxl_unet(), seed=1)


def _outputs(net):
    """Down residuals and mid residual for one random input (image in [0, 1] at 8x the latent size)."""
    unet_like = SimpleNamespace(config=net.config, parameters=net.parameters)
    g = torch.Generator().manual_seed(3)
    kw = dummy_inputs(unet_like, 64, 96, batch=2, text_tokens=5, generator=g)
    kw.setdefault("added_cond_kwargs", None)
    image = torch.rand(2, 3, 64, 96, generator=g)
    with torch.no_grad():
        down, mid = net(kw["sample"], kw["timestep"], encoder_hidden_states=kw["encoder_hidden_states"],
                        controlnet_cond=image, added_cond_kwargs=kw["added_cond_kwargs"], return_dict=False)
    return [*down, mid]


def _assert_same(loaded: ControlNet, original):
    # Loaded modules are frozen, and PyTorch's CPU kernels may differ in the last bit between frozen weights and
    # weights that require grad (seen on this CI's CPUs): compare like with like, bit for bit.
    original.requires_grad_(False)
    got, want = _outputs(loaded.module), _outputs(original)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert not loaded.module.training


def _config(net) -> dict:
    return {k: v for k, v in dict(net.config).items() if not k.startswith("_")}


# ---- formats -------------------------------------------------------------------------------------------------
def test_diffusers_folder_round_trip(tmp_path, sd15_net):
    sd15_net.save_pretrained(tmp_path / "cn")
    loaded = load_controlnet(tmp_path / "cn")
    assert loaded.family is None and loaded.name == "cn" and loaded.dtype == torch.float32
    _assert_same(loaded, sd15_net)


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_original_layout_safetensors_with_sidecar(tmp_path, which, sd15_net, sdxl_net):
    net = {"sd15": sd15_net, "sdxl": sdxl_net}[which]
    path = tmp_path / "cn.safetensors"
    # old lllyasviel files carry the whole SD model beside the ControlNet: only control_model.* is read
    save_file({**controlnet_to_ldm(net), "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(path))
    with pytest.raises(ControlNetError, match="cn.json"):  # tiny sizes fit no bundled config
        load_controlnet(path)
    (tmp_path / "cn.json").write_text(json.dumps(_config(net)))
    assert layout_of({k: v.shape for k, v in controlnet_to_ldm(net).items()}) == "original"
    _assert_same(load_controlnet(path), net)


def test_original_layout_without_prefix_loads(tmp_path, sd15_net):
    state = {k[len("control_model."):]: v for k, v in controlnet_to_ldm(sd15_net).items()}
    path = tmp_path / "bare.safetensors"
    save_file(state, str(path))
    (tmp_path / "bare.json").write_text(json.dumps(_config(sd15_net)))
    _assert_same(load_controlnet(path), sd15_net)


def test_original_layout_ckpt_through_weights_only(tmp_path, sd15_net):
    path = tmp_path / "cn.ckpt"
    torch.save({"state_dict": controlnet_to_ldm(sd15_net)}, path)
    (tmp_path / "cn.config").mkdir()
    (tmp_path / "cn.config" / "config.json").write_text(json.dumps(_config(sd15_net)))
    _assert_same(load_controlnet(path), sd15_net)


class Payload:  # a custom class: torch.load(weights_only=True) must refuse to rebuild it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises((ControlNetError, CheckpointError), match="evil.pth"):
        load_controlnet(path)


def test_diffusers_layout_single_file_with_config_folder(tmp_path, sdxl_net):
    path = tmp_path / "xl-canny.safetensors"
    save_file({k: v.contiguous() for k, v in sdxl_net.state_dict().items()}, str(path))
    (tmp_path / "xl-canny.config").mkdir()
    (tmp_path / "xl-canny.config" / "config.json").write_text(json.dumps(_config(sdxl_net)))
    loaded = load_controlnet(path)
    assert loaded.source == str(path) and loaded.name == "xl-canny"
    _assert_same(loaded, sdxl_net)


def test_dtype_and_bad_inputs(tmp_path, sd15_net):
    sd15_net.save_pretrained(tmp_path / "cn")
    half = load_controlnet(tmp_path / "cn", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    assert half.to(dtype="float32") is half and half.dtype == torch.float32
    with pytest.raises(ControlNetError, match="valid: sd15, sd21, sdxl"):
        load_controlnet(tmp_path / "cn", family="pixart-sigma")
    with pytest.raises(ControlNetError, match="does not exist"):
        load_controlnet(tmp_path / "missing.safetensors")
    other = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd15_unet().state_dict().items()}, str(other))
    with pytest.raises(ControlNetError, match="unet.safetensors' is no ControlNet"):
        load_controlnet(other)


# ---- full-size bundled configs and family detection ----------------------------------------------------------
@pytest.fixture(scope="module")
def meta_nets():
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return {f: ControlNetModel.from_config(bundled_config(f)) for f in CONTROLNET_FAMILIES}


@pytest.mark.parametrize("family", CONTROLNET_FAMILIES)
def test_bundled_config_drives_the_family_unet(family, meta_nets):
    net, unet = meta_nets[family], meta_denoiser(family)
    kw = dummy_inputs(unet, 512, 512, text_tokens=77)
    image = torch.empty(1, 3, 512, 512, device="meta")
    down, mid = net(kw["sample"], kw["timestep"], encoder_hidden_states=kw["encoder_hidden_states"],
                    controlnet_cond=image, added_cond_kwargs=kw.get("added_cond_kwargs"), return_dict=False)
    # the UNet's own skip tensors, captured on meta with hooks: conv_in's output and every down block's states
    skips = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: skips.append(out))]
    hooks += [b.register_forward_hook(lambda m, a, out: skips.extend(out[1])) for b in unet.down_blocks]
    mid_out = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: mid_out.append(out)))
    # and the UNet accepts them as residuals: a mismatch in count or shape raises here
    out = unet(**kw, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    for h in hooks:
        h.remove()
    assert out.shape == kw["sample"].shape
    assert [tuple(t.shape) for t in down] == [tuple(t.shape) for t in skips]
    assert mid.shape == mid_out[0].shape
    assert family == {768: "sd15", 1024: "sd21", 2048: "sdxl"}[net.config.cross_attention_dim]


@pytest.mark.parametrize("family", CONTROLNET_FAMILIES)
def test_family_detected_from_shapes_in_both_layouts(family, meta_nets):
    net = meta_nets[family]
    diffusers_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    original_shapes = {k: tuple(v.shape) for k, v in controlnet_to_ldm(net).items()}
    assert detect_family(diffusers_shapes) == family
    assert detect_family(original_shapes) == family
    assert layout_of(diffusers_shapes) == "diffusers" and layout_of(original_shapes) == "original"


def test_full_size_file_without_sidecar_uses_the_bundled_config(tmp_path, monkeypatch, meta_nets):
    """A full-size sd15 file needs no sidecar. Writing 1.4 GB is too slow for a unit test, so the reader hands
    meta tensors of the real shapes, and the build step records what it was given."""
    import diffusion_feature.engine.controlnet as cn

    shapes = {k: tuple(v.shape) for k, v in controlnet_to_ldm(meta_nets["sd15"]).items()}
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    path.write_bytes(b"")
    built = {}
    monkeypatch.setattr(cn, "read_key_shapes", lambda p: shapes)
    monkeypatch.setattr(cn, "_read_state", lambda p: {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    monkeypatch.setattr(cn, "_build", lambda config, state, p: built.update(config=config, state=state) or "module")
    monkeypatch.setattr(cn, "_finish", lambda module, family, p, dtype, device: (module, family))
    assert load_controlnet(path) == ("module", "sd15")
    assert built["config"] == bundled_config("sd15")
    want = {k: tuple(v.shape) for k, v in meta_nets["sd15"].state_dict().items()}
    assert {k: tuple(v.shape) for k, v in built["state"].items()} == want
    with pytest.raises(ControlNetError, match="given as a sdxl ControlNet but its weights are for sd15"):
        load_controlnet(path, family="sdxl")


# ---- compatibility -------------------------------------------------------------------------------------------
def test_check_compatible(sd15_net, sdxl_net):
    sd15_model, sdxl_model = tiny_feature_model("sd15"), tiny_feature_model("sdxl")
    sd15_cn = ControlNet(sd15_net, None, "tiny", "tiny-sd15")
    check_compatible(sd15_cn, sd15_model)
    check_compatible(ControlNet(sdxl_net, None, "tiny", "tiny-sdxl"), sdxl_model)
    with pytest.raises(ControlNetError, match="cross_attention_dim 32 vs 80") as e:
        check_compatible(sd15_cn, sdxl_model)
    assert "tiny-sd15" in str(e.value) and "down residuals" in str(e.value)
    with pytest.raises(ControlNetError, match="this ControlNet is for sd15; the model is sdxl"):
        check_compatible(ControlNet(sd15_net, "sd15", "tiny", "tiny-sd15"), sdxl_model)
    pixart = SimpleNamespace(family="pixart-sigma", denoiser=tiny_pixart())
    with pytest.raises(ControlNetError, match="supported for sd15, sd21 and sdxl UNets; this model is pixart-sigma"):
        check_compatible(sd15_cn, pixart)


# ---- the node ------------------------------------------------------------------------------------------------
def test_node_lists_and_loads_files_and_folders(tmp_path, monkeypatch, sd15_net):
    monkeypatch.setenv("DF_CONTROLNET_DIR", str(tmp_path))
    sd15_net.save_pretrained(tmp_path / "folder-cn")
    save_file(controlnet_to_ldm(sd15_net), str(tmp_path / "file-cn.safetensors"))
    (tmp_path / "file-cn.config").mkdir()
    (tmp_path / "file-cn.config" / "config.json").write_text(json.dumps(_config(sd15_net)))
    spec = DFLoadControlNet.INPUT_TYPES()
    for group in spec.values():
        for input_name, (_type, *opts) in group.items():
            assert opts and opts[0].get("tooltip"), input_name
    assert DFLoadControlNet.RETURN_TYPES == ("DF_CONTROLNET",) and DFLoadControlNet.CATEGORY == "diffusion_feature/load"
    names = spec["required"]["control_net_name"][0]
    assert names == ["file-cn.safetensors", "folder-cn"]
    node = DFLoadControlNet()
    for name in names:
        (loaded,) = node.load(name, dtype="float32", family="auto")
        _assert_same(loaded, sd15_net)
        assert node.load(name, dtype="float32", family="auto")[0] is loaded
    assert node.load("folder-cn", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_node_listing_inside_comfyui_shows_folders_through_their_weights(tmp_path, monkeypatch, sd15_net):
    """ComfyUI lists only files with model extensions and resolves only files: a diffusers folder is still
    listed (as the folder) and resolved through its config.json."""
    from pathlib import Path

    from diffusion_feature.nodes import comfy_env, node_controlnet

    class FakeFolderPaths:  # the two calls of ComfyUI's folder_paths that comfy_env makes for controlnets
        @staticmethod
        def get_filename_list(kind):
            exts = (".ckpt", ".pt", ".bin", ".pth", ".safetensors")
            return [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.suffix in exts]

        @staticmethod
        def get_full_path(kind, name):
            p = tmp_path / name
            return str(p) if p.is_file() else None

    sd15_net.save_pretrained(tmp_path / "sub" / "folder-cn")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    monkeypatch.setattr(comfy_env, "folder_paths", FakeFolderPaths)
    assert node_controlnet.controlnet_names() == ["a.safetensors", str(Path("sub") / "folder-cn")]
    assert node_controlnet.resolve(str(Path("sub") / "folder-cn")) == tmp_path / "sub" / "folder-cn"
    assert node_controlnet.resolve("a.safetensors") == tmp_path / "a.safetensors"

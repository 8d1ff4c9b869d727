"""DFShowLayers on ComfyUI's own MODEL (both ComfyUI versions, in-process): the ids and shapes of the native network
equal what the diffusers twin's catalog computes (an independent path: diffusers' modules on the meta device), no
weight is touched and no hook stays; the socket type takes DF_MODEL and MODEL on both servers' validation rules."""
from __future__ import annotations

import pytest
import torch

import native_comfy as nc
from diffusion_feature.layer_catalog.catalog import compute_shapes
from diffusion_feature.native.names import UnsupportedModelError
from diffusion_feature.nodes.comfy_env import AnyOfTypes
from diffusion_feature.nodes.node_hooks import DFShowLayers
from test_native import _zero_hooks


def _parse(text: str) -> tuple[str, dict[str, list[int]]]:
    head, *lines = text.splitlines()
    shapes = {}
    for line in lines:
        layer_id, shape = line.split("  ", 1)
        shapes[layer_id] = [int(d) for d in shape.split(" x ")]
    return head, shapes


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_show_layers_of_a_native_model_equals_the_diffusers_catalog(comfy, kind):
    twin = nc.diffusers_unet(kind, as_model=True)
    model = nc.model_patcher(comfy, kind, nc.comfy_state_dict(comfy, kind, twin.state_dict()))
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out = DFShowLayers().show(model, width=192, height=128)
    head, shapes = _parse(out["result"][0])
    assert out["ui"]["text"] == [out["result"][0]]
    assert head == f"# {kind}: {len(shapes)} layer ids at 192x128"
    expected = compute_shapes(twin.to("meta"), 128, 192)  # diffusers' own modules on the meta device
    assert list(shapes) == list(expected)  # same ids, forward order
    assert shapes == expected
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
    _zero_hooks(unet)


def test_the_shape_pass_is_no_model_call_for_other_hooks(comfy):
    """DFShowLayers and DFCaptureLayers' memory plan run the network once on fake tensors: other code's hooks on it
    do not see that pass, stay registered, and see the next real call."""
    from diffusion_feature.native import capture_layers

    twin = nc.diffusers_unet("sd15", as_model=True)
    model = nc.model_patcher(comfy, "sd15", nc.comfy_state_dict(comfy, "sd15", twin.state_dict()))
    unet = model.model.diffusion_model
    seen = []
    handles = [unet.register_forward_pre_hook(lambda m, a: seen.append("pre")),
               unet.output_blocks[0][0].register_forward_hook(lambda m, a, o: seen.append(type(o).__name__))]
    try:
        DFShowLayers().show(model, width=64, height=64)
        capture_layers(model, "practical")
        assert seen == []
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), context=torch.randn(1, 7, 32))
        assert seen == ["pre", "Tensor"]
    finally:
        for h in handles:
            h.remove()
    _zero_hooks(unet)


def test_show_layers_runs_in_the_inference_dtype_and_leaves_no_layer_state(comfy, monkeypatch):
    """fp8-stored weights that ComfyUI computes in float32 (manual cast): the pass feeds the network float32, as
    ComfyUI's call does, and reports the right shapes. A layer that caches a cast weight on itself (current
    ComfyUI's streamed weights) keeps no fake tensor: a sample after DFShowLayers is bit-identical to one before."""
    from diffusion_feature.native import shapes as shapes_module
    from test_native import _sample

    twin = nc.diffusers_unet("sd15", as_model=True)
    state = nc.comfy_state_dict(comfy, "sd15", twin.state_dict())
    config = comfy.supported_models.SD15(dict(nc.CONFIGS["sd15"]["comfy"]))
    config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    base = config.get_model({})
    base.diffusion_model.load_state_dict(state, strict=True)
    cpu = torch.device("cpu")
    fp8 = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    assert next(base.diffusion_model.parameters()).dtype == torch.float8_e4m3fn
    seen = []

    class Spy(shapes_module.FeatureCapture):  # the pass's input, as the network receives it
        def run(self, x, *args, **kwargs):
            seen.append(x.dtype)
            return super().run(x, *args, **kwargs)

    monkeypatch.setattr(shapes_module, "FeatureCapture", Spy)
    _, shapes = _parse(DFShowLayers().show(fp8, width=192, height=128)["result"][0])
    assert seen == [torch.float32]
    assert shapes == compute_shapes(twin.to("meta"), 128, 192)

    model = nc.model_patcher(comfy, "sd15", state)
    before = _sample(comfy, model, "sd15", steps=2)
    layer = model.model.diffusion_model.output_blocks[3][1].transformer_blocks[0].attn2.to_k

    def streamed(x):  # the cast weight is cached on the layer on first use, reused after
        if getattr(layer, "cached_weight", None) is None:
            layer.cached_weight = layer.weight.to(x.dtype, copy=True)
        return torch.nn.functional.linear(x, layer.cached_weight, layer.bias)

    layer.forward = streamed
    DFShowLayers().show(model, width=192, height=128)
    assert "cached_weight" not in vars(layer)
    assert torch.equal(_sample(comfy, model, "sd15", steps=2), before)
    _zero_hooks(model.model.diffusion_model)


def test_show_layers_refuses_an_unsupported_model(comfy):
    class FluxLike(torch.nn.Module):
        pass

    base = torch.nn.Module()
    base.diffusion_model = FluxLike()
    with pytest.raises(UnsupportedModelError, match="sd15, sd21, sdxl and playground-v2"):
        DFShowLayers().show(base, 64, 64)


def test_the_socket_takes_both_model_types(comfy):
    socket = DFShowLayers.INPUT_TYPES()["required"]["model"][0]
    assert isinstance(socket, AnyOfTypes) and str(socket) == "DF_MODEL,MODEL"  # what /object_info serves
    # the 2024-03 server compares `received != expected` with the link's plain type on the left
    assert not ("MODEL" != socket) and not ("DF_MODEL" != socket) and not (socket != "MODEL")
    assert "LATENT" != socket and "CONDITIONING" != socket
    if comfy.version == "0.3.64":  # current ComfyUI's own validation function
        from comfy_execution.validation import validate_node_input

        assert validate_node_input("MODEL", socket) and validate_node_input("DF_MODEL", socket)
        assert not validate_node_input("LATENT", socket)

"""LoRA files of every supported format, merged per run against weights merged by hand, and never leaking."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import inputs_for, tiny_feature_model
from diffusion_feature.engine.lora import (COMPONENTS, LoraError, _component_module, _is_lora_layer, load_lora,
                                          lora_applied, lora_targets, with_lora)
from diffusion_feature.engine.prompts import encode_prompt


# What a run computes with: the tests' own reading of the model's weights (base weight plus enabled adapters).
def lora_residue(model, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of the model's weights (denoiser, text encoders) that differ bit-wise from `reference` (a saved
    state, see lora_snapshot): what a run left behind. Empty when nothing leaked."""
    now = lora_snapshot(model)
    return sorted(k for k in reference if k not in now or not torch.equal(now[k], reference[k]))


def lora_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every weight the denoiser and text encoders compute with now, under the modules' own names: a
    LoRA layer's base weight plus the updates of its enabled adapters."""
    out = {}
    for component in COMPONENTS:
        root = _component_module(model, component)
        if root is None:
            continue
        out.update({f"{component}.{k.replace('.base_layer', '')}": v.detach().clone()
                    for k, v in root.state_dict().items() if ".lora_" not in k})
        for name, layer in root.named_modules():
            if _is_lora_layer(layer) and not layer.disable_adapters:
                weight = out[f"{component}.{name}.weight"]
                for adapter in layer.active_adapters:
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)
    return out

RANK = 2
ALPHA = 1.0  # scale alpha / rank = 0.5: a file without alpha (scale 1) would give other weights
SD15_TARGETS = {  # kohya name -> (component, module path)
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
        ("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_down_blocks_1_resnets_0_conv1": ("denoiser", "down_blocks.1.resnets.0.conv1"),  # LoCon, 3x3
    "lora_unet_down_blocks_1_attentions_0_proj_in": ("denoiser", "down_blocks.1.attentions.0.proj_in"),  # 1x1 conv
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
}


def component(model, name):
    return model.denoiser if name == "denoiser" else model.text_encoders[("text_encoder", "text_encoder_2").index(name)]


def module_of(model, comp, path):
    return dict(component(model, comp).named_modules())[path]


def make_pair(weight: torch.Tensor, seed: int, linear_on_conv: bool = False):
    """(down, up) for a weight: linear (r,in)/(out,r), conv (r,in,kh,kw)/(out,r,1,1), or linear for a 1x1 conv."""
    g = torch.Generator().manual_seed(seed)
    out, inp = weight.shape[:2]
    if weight.ndim == 4 and not linear_on_conv:
        return torch.randn(RANK, inp, *weight.shape[2:], generator=g), torch.randn(out, RANK, 1, 1, generator=g)
    return torch.randn(RANK, inp, generator=g), torch.randn(out, RANK, generator=g)


def kohya_state(model, targets=SD15_TARGETS, alpha=ALPHA, seed=0) -> dict:
    state = {}
    for i, (key, (comp, path)) in enumerate(targets.items()):
        down, up = make_pair(module_of(model, comp, path).weight, seed + i, linear_on_conv=key.endswith("proj_in"))
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
    return state


def hand_delta(down, up, weight, strength, alpha=ALPHA):
    """The update a LoRA means, written out: strength * alpha / rank * up @ down, shaped like the weight."""
    return ((up.flatten(1) @ down.flatten(1)) * (strength * (alpha / down.shape[0]))).reshape(weight.shape)


def save(tmp_path, state, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd15():
    return tiny_feature_model("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_feature_model("sdxl")


@pytest.fixture()
def kohya_file(tmp_path, sd15):
    return save(tmp_path, kohya_state(sd15))


def run_denoiser(model, seed=1):
    with torch.no_grad():
        return model.denoiser(**inputs_for(model.denoiser, latent_hw=(8, 8), batch=1, seed=seed)).sample


# ---- what a merged LoRA computes -----------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, -0.5])
def test_each_module_computes_its_hand_merged_weight(sd15, kohya_file, strength):
    lora = load_lora(kohya_file)
    state = kohya_state(sd15)
    lora_model = with_lora(sd15, lora, strength, strength)
    g = torch.Generator().manual_seed(3)
    for key, (comp, path) in SD15_TARGETS.items():
        m = module_of(sd15, comp, path)  # the module as the model calls it (a peft LoRA layer around the original)
        base = m.get_base_layer()
        w = base.weight.detach().double()
        merged = w + hand_delta(state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], w, strength)
        bias = None if base.bias is None else base.bias.double()
        if isinstance(base, torch.nn.Conv2d):
            x = torch.randn(1, w.shape[1], 8, 8, generator=g)
            want = F.conv2d(x.double(), merged, bias, base.stride, base.padding)
        else:
            x = torch.randn(3, w.shape[1], generator=g)
            want = F.linear(x.double(), merged, bias)
        with torch.no_grad():
            before = m(x)
            with lora_applied(lora_model):
                got = m(x)
            after = m(x)
        # the merged weight in float64 against float32's W x + s * up (down x): float32 rounding apart
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, before), path  # the LoRA does change this module
        assert torch.equal(after, before), path


def test_denoiser_output_equals_a_hand_merged_copy_and_strength_zero_is_the_original(sd15, kohya_file):
    lora, state = load_lora(kohya_file), kohya_state(sd15)
    manual = copy.deepcopy(sd15.denoiser)
    with torch.no_grad():
        for key, (comp, path) in SD15_TARGETS.items():
            if comp == "denoiser":
                w = dict(manual.named_modules())[path].weight
                w += hand_delta(state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], w, 1.0)
        want = manual(**inputs_for(manual, latent_hw=(8, 8), batch=1, seed=1)).sample
    original = run_denoiser(sd15)
    with lora_applied(with_lora(sd15, lora)) as m:
        merged = run_denoiser(m)
    with lora_applied(with_lora(sd15, lora, 0.0, 0.0)) as m:
        zero = run_denoiser(m)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-6)
    assert (merged - original).abs().max() > 1e-3
    assert torch.equal(zero, original)


def test_peft_and_old_diffusers_formats_merge_the_same_weights_as_kohya(tmp_path, sd15):
    kohya = kohya_state(sd15)
    dotted = {"denoiser": "unet.", "text_encoder": "text_encoder.text_model."}
    peft, old, processor = {}, {}, {}
    for key, (comp, path) in SD15_TARGETS.items():
        down, up, alpha = (kohya[f"{key}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        name = dotted[comp] + path
        peft.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": alpha})
        old.update({f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up, f"{name}.alpha": alpha})
        if path.endswith("attn1.to_q"):  # the attention-processor spelling of the oldest diffusers files
            base = dotted[comp] + path[: -len(".to_q")] + ".processor.to_q_lora"
            processor.update({f"{base}.down.weight": down, f"{base}.up.weight": up, f"{base}.alpha": alpha})
        elif path.endswith("self_attn.q_proj"):
            base = dotted[comp] + path[: -len(".q_proj")] + ".to_q_lora"
            processor.update({f"{base}.down.weight": down, f"{base}.up.weight": up, f"{base}.alpha": alpha})
    merged = []
    for i, state in enumerate([kohya, peft, old]):
        lora = load_lora(save(tmp_path, state, f"f{i}.safetensors"))
        assert len(lora) == len(SD15_TARGETS)
        with lora_applied(with_lora(sd15, lora)):
            merged.append(lora_snapshot(sd15))
    for other in merged[1:]:
        assert all(torch.equal(merged[0][k], other[k]) for k in merged[0])
    lora = load_lora(save(tmp_path, processor, "processor.safetensors"))
    where = set(lora_targets(sd15, lora).values())
    assert where == {"denoiser:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                     "text_encoder:encoder.layers.0.self_attn.q_proj"}
    with lora_applied(with_lora(sd15, lora)):
        for name in ("denoiser.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                     "text_encoder.encoder.layers.0.self_attn.q_proj.weight"):
            assert torch.equal(lora_snapshot(sd15)[name], merged[0][name])


def test_a_file_without_alpha_has_scale_one_and_peft_metadata_gives_alpha(tmp_path, sd15):
    import json

    comp, path = next(iter(SD15_TARGETS.values()))
    w = module_of(sd15, comp, path).weight.detach().clone()  # a LoRA layer's weight is its base layer's
    down, up = make_pair(w, 0)
    name = f"unet.{path}"
    plain = save(tmp_path, {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, "plain.safetensors")
    meta_path = tmp_path / "meta.safetensors"
    save_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, str(meta_path),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 8})})
    for path_, scale in ((plain, 1.0), (meta_path, 8 / RANK)):
        with lora_applied(with_lora(sd15, load_lora(path_))):
            got = lora_snapshot(sd15)[f"{comp}.{path}.weight"]
        torch.testing.assert_close(got, w + scale * (up @ down), rtol=1e-6, atol=1e-6)


def test_pixart_peft_lora_reaches_the_transformer_and_t5(tmp_path):
    from conftest import tiny_pixart_model

    model = tiny_pixart_model()
    targets = {"transformer.transformer_blocks.1.attn2.to_k": ("denoiser", "transformer_blocks.1.attn2.to_k"),
               "text_encoder.encoder.block.0.layer.0.SelfAttention.q":
                   ("text_encoder", "encoder.block.0.layer.0.SelfAttention.q")}
    state = {}
    for i, (key, (comp, path)) in enumerate(targets.items()):
        down, up = make_pair(module_of(model, comp, path).weight, i)
        state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    lora = load_lora(save(tmp_path, state))
    assert lora_targets(model, lora) == {k: f"{c}:{p}" for k, (c, p) in targets.items()}
    before = lora_snapshot(model)
    with lora_applied(with_lora(model, lora)):
        changed = {k for k, v in lora_snapshot(model).items() if not torch.equal(v, before[k])}
    assert changed == {f"{c}.{p}.weight" for c, p in targets.values()}
    assert lora_residue(model, before) == []


# ---- SDXL: two text encoders, LDM block names ----------------------------------------------------------------
SDXL_TARGETS = {
    "lora_te1_text_model_encoder_layers_1_self_attn_q_proj": ("text_encoder", "encoder.layers.1.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k":
        ("denoiser", "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k"),
    "lora_unet_input_blocks_4_0_in_layers_2": ("denoiser", "down_blocks.1.resnets.0.conv1"),
    "lora_unet_input_blocks_4_0_skip_connection": ("denoiser", "down_blocks.1.resnets.0.conv_shortcut"),
    "lora_unet_input_blocks_3_0_op": ("denoiser", "down_blocks.0.downsamplers.0.conv"),
    "lora_unet_middle_block_1_proj_out": ("denoiser", "mid_block.attentions.0.proj_out"),
    "lora_unet_middle_block_2_emb_layers_1": ("denoiser", "mid_block.resnets.1.time_emb_proj"),
    "lora_unet_output_blocks_2_0_out_layers_3": ("denoiser", "up_blocks.0.resnets.2.conv2"),
    "lora_unet_output_blocks_2_2_conv": ("denoiser", "up_blocks.0.upsamplers.0.conv"),
    "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2":
        ("denoiser", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2"),
    "lora_unet_input_blocks_0_0": ("denoiser", "conv_in"),
    "lora_unet_label_emb_0_0": ("denoiser", "add_embedding.linear_1"),
}


def test_sdxl_kohya_keys_reach_both_encoders_and_ldm_blocks(tmp_path, sdxl):
    assert sdxl.denoiser.config.layers_per_block == 2
    lora = load_lora(save(tmp_path, kohya_state(sdxl, SDXL_TARGETS)))
    assert {k: v for k, v in lora_targets(sdxl, lora).items()} == {
        k: f"{comp}:{path}" for k, (comp, path) in SDXL_TARGETS.items()}
    before = lora_snapshot(sdxl)
    with lora_applied(with_lora(sdxl, lora)):
        inside = lora_snapshot(sdxl)
    changed = {k for k in before if not torch.equal(before[k], inside[k])}
    assert changed == {f"{comp}.{path}.weight" for comp, path in SDXL_TARGETS.values()}
    assert lora_residue(sdxl, before) == []


def test_every_sdxl_unet_layer_named_the_ldm_way_resolves_to_itself(tmp_path, sdxl):
    """Round trip through the tests' own diffusers -> LDM renaming (ldm_export), for every linear and conv layer."""
    from types import SimpleNamespace

    from ldm_export import unet_to_ldm

    unet = sdxl.denoiser
    layers = {f"{n}.weight" for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.startswith("add_embedding")
              and ".lora_" not in n and not n.endswith(".base_layer")}  # the original layers, not peft's parts
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
             if k.replace(".base_layer", "") in layers}
    ldm = unet_to_ldm(SimpleNamespace(state_dict=lambda: state, config=unet.config, up_blocks=unet.up_blocks))
    assert len(ldm) == len(layers) > 100
    want, tensors = {}, {}
    for diffusers_key, ldm_key in zip(state, ldm):
        key = "lora_unet_" + ldm_key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        want[key] = f"denoiser:{diffusers_key[:-len('.weight')]}"
        tensors.update({f"{key}.lora_down.weight": torch.zeros(1, 1), f"{key}.lora_up.weight": torch.zeros(1, 1)})
    got = lora_targets(sdxl, load_lora(save(tmp_path, tensors)))
    assert {k: v for k, v in got.items() if v != want[k]} == {}


# ---- nothing leaks -------------------------------------------------------------------------------------------
def test_the_base_model_never_sees_the_lora(sd15, kohya_file):
    base = sd15
    lora_model = with_lora(base, load_lora(kohya_file))
    assert base.loras == () and len(lora_model.loras) == 1
    assert lora_model.denoiser is base.denoiser  # a clone: the very same weights
    saved = lora_snapshot(base)
    first = run_denoiser(base)
    with lora_applied(lora_model):
        patched = run_denoiser(lora_model)
        with lora_applied(lora_model), lora_applied(lora_model.clone()):  # nested: nothing applied twice
            again = run_denoiser(lora_model)
    assert lora_residue(base, saved) == []
    assert torch.equal(run_denoiser(base), first)
    assert not torch.allclose(patched, first)
    assert torch.equal(again, patched)


def test_a_lora_run_never_writes_the_shared_weights_and_waits_for_a_base_run(sd15, kohya_file):
    """The LoRA is an adapter beside the shared weights, not merged into them; a base run that is going on is
    never changed under it by a LoRA run starting."""
    lora_model = with_lora(sd15, load_lora(kohya_file))
    shared = {n: p.detach().clone() for n, p in sd15.denoiser.named_parameters() if ".lora_" not in n}
    first = run_denoiser(sd15)
    with lora_applied(lora_model):
        patched = run_denoiser(lora_model)
        assert [n for n, p in sd15.denoiser.named_parameters() if n in shared and not torch.equal(p, shared[n])] == []
    assert not torch.allclose(patched, first)
    with lora_applied(sd15):
        with pytest.raises(RuntimeError, match="different set of LoRAs"), lora_applied(lora_model):
            pass
        assert torch.equal(run_denoiser(sd15), first)


def test_an_adapter_goes_away_with_its_lora(sd15, tmp_path):
    import gc

    lora = load_lora(save(tmp_path, kohya_state(sd15, seed=11)))
    lora_model, adapter = with_lora(sd15, lora), lora.adapter
    roots = [sd15.denoiser, sd15.text_encoders[0]]
    holders = lambda: [n for r in roots for n, m in r.named_modules() if adapter in getattr(m, "lora_A", {})]  # noqa
    assert len(holders()) == len(SD15_TARGETS)
    del lora, lora_model
    gc.collect()
    assert holders() == [] and all(adapter not in getattr(r, "peft_config", {}) for r in roots)
    # the last adapter gone, each module is the original again: the state dict has its own names, no peft wrapper
    assert not [k for r in roots for k in r.state_dict() if ".base_layer." in k or ".lora_" in k]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_run_restores_every_weight(sd15, kohya_file, error):
    lora_model = with_lora(sd15, load_lora(kohya_file))
    saved = lora_snapshot(sd15)
    with pytest.raises(error), lora_applied(lora_model):
        assert lora_residue(sd15, saved)  # merged inside
        raise error("stop")
    assert lora_residue(sd15, saved) == []
    with lora_applied(lora_model):  # and the next run starts clean
        assert len(lora_residue(sd15, saved)) == 4
    assert lora_residue(sd15, saved) == []


def test_differently_patched_clones_cannot_run_at_the_same_time(sd15, kohya_file, tmp_path):
    a = with_lora(sd15, load_lora(kohya_file))
    b = with_lora(sd15, load_lora(save(tmp_path, kohya_state(sd15, seed=7), "other.safetensors")))
    saved = lora_snapshot(sd15)
    with lora_applied(a):
        with pytest.raises(RuntimeError, match="different set of LoRAs"), lora_applied(b):
            pass
        with pytest.raises(RuntimeError, match="different set of LoRAs"), lora_applied(sd15):
            pass  # the base model would run with a's weights
        with lora_applied(a):  # the same set is fine
            pass
    assert lora_residue(sd15, saved) == []
    with lora_applied(b):  # once a's run is over, b runs
        assert lora_residue(sd15, saved)
    assert lora_residue(sd15, saved) == []


def test_stacked_loras_add_up(sd15, kohya_file, tmp_path):
    a, b = load_lora(kohya_file), load_lora(save(tmp_path, kohya_state(sd15, seed=7), "b.safetensors"))
    state_a, state_b = kohya_state(sd15), kohya_state(sd15, seed=7)
    key, (comp, path) = next(iter(SD15_TARGETS.items()))
    w = module_of(sd15, comp, path).weight.detach().clone()
    with lora_applied(with_lora(with_lora(sd15, a, 1.0), b, 0.5)):
        got = lora_snapshot(sd15)[f"{comp}.{path}.weight"]
    want = w + (hand_delta(state_a[f"{key}.lora_down.weight"], state_a[f"{key}.lora_up.weight"], w, 1.0)
                + hand_delta(state_b[f"{key}.lora_down.weight"], state_b[f"{key}.lora_up.weight"], w, 0.5))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_encode_prompt_uses_the_text_encoder_lora_at_strength_clip(sd15, kohya_file):
    lora = load_lora(kohya_file)
    base = encode_prompt(sd15, "a cat").encoder_hidden_states
    with_clip = encode_prompt(with_lora(sd15, lora, 1.0, 1.0), "a cat").encoder_hidden_states
    without = encode_prompt(with_lora(sd15, lora, 1.0, 0.0), "a cat").encoder_hidden_states
    assert not torch.allclose(with_clip, base)
    assert torch.equal(without, base)
    assert torch.equal(encode_prompt(sd15, "a cat").encoder_hidden_states, base)


# ---- errors --------------------------------------------------------------------------------------------------
def test_a_lora_for_another_model_is_refused_with_the_file_named(tmp_path, sd15, sdxl, caplog):
    path = save(tmp_path, {"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 8),
                           "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(8, 2)}, "foreign.safetensors")
    with pytest.raises(LoraError, match="foreign.safetensors.*matches no module.*another"):
        with_lora(sd15, load_lora(path))
    # SD1.5's LoRA on the SDXL model: the same module name, another text width (32 vs 80)
    to_k = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
            ("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")}
    with pytest.raises(LoraError, match="sd15.safetensors.*attn2.to_k whose weight is \\(16, 80\\).*\\(16, 32\\)"):
        with_lora(sdxl, load_lora(save(tmp_path, kohya_state(sd15, to_k), "sd15.safetensors")))
    # some keys unmatched: a warning, not an error
    state = dict(kohya_state(sd15), **{"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 8),
                                       "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 2)})
    with caplog.at_level(logging.WARNING, logger="diffusion_feature"):
        with_lora(sd15, load_lora(save(tmp_path, state, "partial.safetensors")))
    assert "lora_unet_nowhere" in caplog.text and "4 of its 5" in caplog.text


def test_unreadable_and_non_lora_files_are_clear_errors(tmp_path, sd15):
    pickled = tmp_path / "evil.ckpt"
    torch.save({"x": Payload()}, str(pickled))  # unpickling it would run this module's code
    assert "Payload" in pickled.read_bytes().decode("latin-1")
    with pytest.raises(LoraError, match="evil.ckpt.*weights_only"):
        load_lora(pickled)
    plain = tmp_path / "plain.pt"
    torch.save(kohya_state(sd15), str(plain))  # a plain pickle of tensors loads
    assert len(load_lora(plain)) == 4
    with pytest.raises(LoraError, match="model.safetensors.*no usable LoRA.*Supported"):
        load_lora(save(tmp_path, {"conv_in.weight": torch.zeros(3)}, "model.safetensors"))
    dora = dict(kohya_state(sd15), **{"lora_unet_down_blocks_1_resnets_0_conv1.dora_scale": torch.ones(16, 1, 1, 1)})
    lora = load_lora(save(tmp_path, dora, "dora.safetensors"))  # a DoRA module is skipped, not half-applied
    assert len(lora) == 3 and any("conv1 (DoRA)" in k for k in lora.ignored)
    with pytest.raises(LoraError, match="LoHa"):
        load_lora(save(tmp_path, {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "loha.safetensors"))
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")


class Payload:
    """A class only a full unpickler can rebuild."""


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "strong"])
def test_strength_must_be_a_finite_number(sd15, kohya_file, bad):
    with pytest.raises(ValueError, match="strength_model"):
        with_lora(sd15, load_lora(kohya_file), bad, 1.0)


# ---- the node ------------------------------------------------------------------------------------------------
def test_load_lora_node_lists_loads_and_returns_a_clone(tmp_path, monkeypatch, sd15):
    from diffusion_feature.nodes import node_lora
    from diffusion_feature.nodes.node_lora import DFLoadLoRA

    save(tmp_path, kohya_state(sd15), "style.safetensors")
    monkeypatch.setenv("DF_LORAS_DIR", str(tmp_path))
    spec = DFLoadLoRA.INPUT_TYPES()["required"]
    assert spec["lora_name"][0] == ["style.safetensors"]
    assert spec["strength_model"][1]["min"] == -10.0 and spec["strength_clip"][1]["default"] == 1.0
    (out,) = DFLoadLoRA().apply(sd15, "style.safetensors", 0.8, 0.5)
    assert sd15.loras == () and len(out.loras) == 1
    lora, sm, sc = out.loras[0]
    assert (lora.name, sm, sc) == ("style.safetensors", 0.8, 0.5)
    (again,) = DFLoadLoRA().apply(sd15, "style.safetensors")
    assert again.loras[0][0] is lora  # cached: the file is not read twice
    node_lora._CACHE.clear()
    with pytest.raises(ValueError):
        DFLoadLoRA().apply(sd15, "../outside.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_restores_bit_exactly(kohya_file, dtype):
    """Half-precision weights (on the GPU when there is one: pinned host backups) come back bit for bit."""
    model = tiny_feature_model("sd15")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for m in [model.denoiser, *model.text_encoders]:
        m.to(device, dtype)
    lora_model = with_lora(model, load_lora(kohya_file))
    saved = lora_snapshot(model)
    first = run_denoiser(model)
    with lora_applied(lora_model):
        assert lora_residue(model, saved)
        patched = run_denoiser(lora_model)
    assert lora_residue(model, saved) == []
    assert torch.equal(run_denoiser(model), first) and not torch.equal(patched, first)


def test_extraction_in_batches_enables_the_lora_once(sd15, kohya_file, monkeypatch):
    """A multi-batch extraction (DFExtractFeatures) enables the LoRA's adapters once for all its chunks, not once
    per chunk, and gives the same features as chunk-by-chunk runs would."""
    from diffusion_feature.engine import lora as lora_module
    from diffusion_feature.engine.extraction import extract, extract_in_batches

    lora_model = with_lora(sd15, load_lora(kohya_file))
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    enabled = []
    real_enable = lora_module._enable
    monkeypatch.setattr(lora_module, "_enable", lambda root, *a: enabled.append(root) or real_enable(root, *a))
    feats = extract_in_batches(lora_model, images, "a cat", ["mid-repeat1-res-out"], batch_size=1, size="64x64")
    assert enabled == [sd15.denoiser, *sd15.text_encoders]  # once per component, for three chunks
    enabled.clear()
    one = extract(lora_model, images[1:2], "a cat", ["mid-repeat1-res-out"], size="64x64")
    assert enabled == [sd15.denoiser, *sd15.text_encoders]
    torch.testing.assert_close(feats.tensors["mid-repeat1-res-out"][1:2], one.tensors["mid-repeat1-res-out"],
                               atol=1e-6, rtol=1e-5)

"""The hook engine's contract: no effect on the output, nothing left behind, early exit, options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hook_state, inputs_for
from diffusion_feature.layer_catalog import FeatureCapture, enumerate_ids, resolve_taps

SPATIAL_MIX = ["unet-in", "down-level0-repeat0-res-increment", "down-level1-repeat1-vit-block0-self-q",
               "mid-vit-out", "up-level1-upsampler-out", "up-level3-repeat2-vit-block0-ffn-inner", "unet-out"]


def plain_forward(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def test_capture_leaves_output_bit_identical(sd15_unet):
    kwargs = inputs_for(sd15_unet)
    want = plain_forward(sd15_unet, kwargs)
    no_maps = [i for i in enumerate_ids(sd15_unet) if not i.endswith("-map")]
    with torch.no_grad(), FeatureCapture(sd15_unet, resolve_taps(no_maps, sd15_unet)) as cap:
        got = cap.run(**kwargs)[0]
    assert len(cap.features) == len(no_maps)
    assert torch.equal(got, want)


def test_maps_leave_output_bit_identical(sdxl_unet):
    """Maps are rebuilt from the attention's own q and k projections: its own kernel still computes the output."""
    kwargs = inputs_for(sdxl_unet)
    want = plain_forward(sdxl_unet, kwargs)
    maps = [i for i in enumerate_ids(sdxl_unet) if i.endswith("-map")]
    with torch.no_grad(), FeatureCapture(sdxl_unet, resolve_taps(maps, sdxl_unet)) as cap:
        got = cap.run(**kwargs)[0]
    assert torch.equal(got, want)
    for probs in cap.features.values():  # rows of a softmax sum to one
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)


def test_a_map_hooks_only_its_attention_and_swaps_no_processor(sd15_unet):
    map_id = "up-level2-repeat1-vit-block0-cross-map"
    attn_path = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    seen = {}

    def inspect(_id, _x):
        for name, m in sd15_unet.named_modules():
            if m._forward_hooks or m._forward_pre_hooks:
                seen[name] = type(getattr(sd15_unet.get_submodule(name), "processor", None)).__name__

    taps = resolve_taps([map_id], sd15_unet)
    with torch.no_grad(), FeatureCapture(sd15_unet, taps, on_capture=inspect) as cap:
        cap.run(**inputs_for(sd15_unet))
    # the attention (for its mask), its q and k projections, and the transformer whose input gives the grid
    assert sorted(seen) == sorted([attn_path, f"{attn_path}.to_q", f"{attn_path}.to_k", "up_blocks.2.attentions.1"])
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in sd15_unet.modules() if hasattr(m, "processor"))


def test_nothing_left_after_100_runs_including_failures(sd15_unet):
    before = hook_state(sd15_unet)
    processors = {n: m.processor for n, m in sd15_unet.named_modules() if hasattr(m, "processor")}
    ids = SPATIAL_MIX + ["down-level0-repeat0-vit-block0-self-map", "up-level1-repeat0-vit-block0-cross-map"]
    taps = resolve_taps(ids, sd15_unet)
    kwargs = inputs_for(sd15_unet, batch=1)
    bad = dict(kwargs, sample=torch.randn(1, 3, 8, 8))  # wrong channel count: conv_in raises mid-forward
    outcomes = {"ok": 0, "error": 0, "interrupt": 0, "early": 0}

    def interrupt(layer_id, _x):
        if layer_id == "mid-vit-out":
            raise KeyboardInterrupt

    for i in range(100):
        kind = ("ok", "error", "interrupt", "early")[i % 4]
        try:
            with torch.no_grad(), FeatureCapture(sd15_unet, taps, early_exit=kind == "early",
                                                 on_capture=interrupt if kind == "interrupt" else None) as cap:
                cap.run(**(bad if kind == "error" else kwargs))
            outcomes[kind] += 1
        except KeyboardInterrupt:
            outcomes["interrupt"] += 1
        except RuntimeError:
            outcomes["error"] += 1
        assert hook_state(sd15_unet) == before
    assert outcomes == {"ok": 25, "error": 25, "interrupt": 25, "early": 25}
    assert {n: m.processor for n, m in sd15_unet.named_modules() if hasattr(m, "processor")} == processors


def test_failure_while_attaching_removes_what_was_attached(sd15_unet):
    before = hook_state(sd15_unet)
    taps = resolve_taps(SPATIAL_MIX, sd15_unet)
    broken = taps + [type(taps[0])("fake-id", "no_such.module", "spatial")]
    with pytest.raises(KeyError, match="no_such.module"):
        with FeatureCapture(sd15_unet, broken):
            pass
    assert hook_state(sd15_unet) == before


def test_early_exit_gives_the_same_tensors_and_skips_the_rest(sd15_unet):
    ids = ["down-level1-repeat1-res-out", "down-level1-repeat0-vit-block0-self-map",
           "down-level1-repeat1-vit-block0-self-k"]
    kwargs = inputs_for(sd15_unet)
    with torch.no_grad(), FeatureCapture(sd15_unet, resolve_taps(ids, sd15_unet)) as full:
        full.run(**kwargs)
    calls = []
    handle = sd15_unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), FeatureCapture(sd15_unet, resolve_taps(ids, sd15_unet), early_exit=True) as early:
            assert early.run(**kwargs) is None
    finally:
        handle.remove()
    assert calls == []  # the mid block never ran
    assert list(early.features) == ids
    for i in ids:
        assert torch.equal(early.features[i], full.features[i]), i


def test_dtype_device_and_feature_resize(sd15_unet):
    ids = ["up-level3-repeat0-vit-block0-self-k", "down-level0-repeat0-res-out", "down-level0-repeat0-vit-block0-self-map"]
    kwargs = inputs_for(sd15_unet)  # latent 8x12
    with torch.no_grad(), FeatureCapture(sd15_unet, resolve_taps(ids, sd15_unet)) as ref:
        ref.run(**kwargs)
    with torch.no_grad(), FeatureCapture(sd15_unet, resolve_taps(ids, sd15_unet), dtype=torch.float16,
                                         device="cpu", feature_resize=2) as cap:
        cap.run(**kwargs)
    for i in ids:
        assert cap.features[i].dtype == torch.float16
        assert cap.features[i].device.type == "cpu"
    for i in ids[:2]:  # spatial taps are pooled 2x2 ...
        assert cap.features[i].shape[-2:] == (4, 6)
        torch.testing.assert_close(cap.features[i].float(), F.avg_pool2d(ref.features[i], 2), atol=2e-3, rtol=2e-3)
    # ... maps never: they are (B, heads, Nq, Nk), not images
    assert cap.features[ids[2]].shape == ref.features[ids[2]].shape == (2, 2, 96, 96)


def test_captured_tensor_is_a_copy_not_a_view_of_live_activations(sd15_unet):
    taps = resolve_taps(["unet-in", "down-level0-repeat0-res-out"], sd15_unet)
    kwargs = inputs_for(sd15_unet)
    with torch.no_grad(), FeatureCapture(sd15_unet, taps) as cap:
        cap.run(**kwargs)
    kwargs["sample"].add_(1.0)  # the caller reuses its buffer
    assert not torch.equal(cap.features["unet-in"], kwargs["sample"])


def test_bad_engine_use_is_refused(sd15_unet):
    taps = resolve_taps(["unet-out"], sd15_unet)
    with pytest.raises(ValueError, match="requested twice"):
        FeatureCapture(sd15_unet, taps + taps)
    with pytest.raises(ValueError, match="feature_resize"):
        FeatureCapture(sd15_unet, taps, feature_resize=0)
    cap = FeatureCapture(sd15_unet, taps)
    with pytest.raises(RuntimeError, match="context"):
        cap.run(**inputs_for(sd15_unet))
    with cap:
        with pytest.raises(RuntimeError, match="already attached"):
            cap.__enter__()


def test_pixart_batch_and_non_square(pixart):
    ids = ["vit-block0-out", "vit-block1-self-map", "vit-block2-cross-map"]
    kwargs = inputs_for(pixart, (8, 12), batch=3, tokens=6)
    with torch.no_grad(), FeatureCapture(pixart, resolve_taps(ids, pixart)) as cap:
        cap.run(**kwargs)
    assert cap.features["vit-block0-out"].shape == (3, 16, 4, 6)  # patch 2: a 4x6 token grid
    assert cap.features["vit-block1-self-map"].shape == (3, 2, 24, 24)
    assert cap.features["vit-block2-cross-map"].shape == (3, 2, 24, 6)

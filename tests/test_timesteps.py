"""Several timesteps in one pass: the VAE encodes once, each t's features equal a run with that t alone."""
from __future__ import annotations

import pytest
import torch

from conftest import VaeCalls, tiny_controlnet, tiny_feature_model
from diffusion_feature.engine import extraction
from diffusion_feature.engine.control import attach_control
from diffusion_feature.engine.controlnet import ControlNet
from diffusion_feature.engine.extraction import extract, extract_timesteps
from diffusion_feature.engine.memory_guard import FeatureMemoryError
from diffusion_feature.engine.prompts import encode_prompt
from diffusion_feature.engine.schedule import parse_timesteps

SIZE = "64x96"
LAYERS = ["down-level1-repeat1-res-out", "mid-repeat1-res-out", "up-level1-repeat0-vit-block0-cross-q",
          "up-level3-repeat2-res-out"]
TS = [25, 50, 100]


@pytest.fixture(scope="module")
def sd15():
    return tiny_feature_model("sd15")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0))  # a batch of 2


def _conditioning(sd15, case, images):
    cond = encode_prompt(sd15, "a house")
    if case == "controlnet":
        net = ControlNet(tiny_controlnet(sd15.denoiser, seed=1), None, "test", "net1")
        edges = (torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(1)) > 0.8).float()
        cond = attach_control(cond, net, edges, strength=0.8)
    return cond


CASES = {"plain": {}, "ensemble": {"ensemble": 2}, "denoise_from": {"denoise_from": 150, "denoise_steps": 2},
         "controlnet": {}, "controlnet+denoise_from": {"denoise_from": 120}}


@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_equals_separate_runs_bit_for_bit(sd15, images, case):
    kw = CASES[case]
    cond = _conditioning(sd15, case.split("+")[0], images)
    with VaeCalls(sd15) as one_pass:
        passes = extract_timesteps(sd15, images, cond, LAYERS, TS, seed=7, size=SIZE, **kw)
    assert one_pass.n == 1  # the VAE encodes the batch once for every t
    with VaeCalls(sd15) as separate:
        singles = [extract(sd15, images, cond, LAYERS, t=t, seed=7, size=SIZE, **kw) for t in TS]
    assert separate.n == len(TS)
    assert [f.meta["t"] for f in passes] == TS
    for got, want in zip(passes, singles):
        assert got.meta == want.meta  # t and every other setting recorded as a single-t run records them
        for layer in LAYERS:
            assert got.tensors[layer].shape[0] == 2
            assert torch.equal(got.tensors[layer], want.tensors[layer]), (case, got.meta["t"], layer)
    # the timesteps really differ (equality above is not that of one t repeated)
    assert not torch.equal(passes[0].tensors[LAYERS[-1]], passes[1].tensors[LAYERS[-1]])


def test_order_is_kept_and_a_single_t_is_extract(sd15, images):
    backwards = extract_timesteps(sd15, images, "a cat", LAYERS[:2], [100, 25], seed=1, size=SIZE)
    assert [f.meta["t"] for f in backwards] == [100, 25]
    alone = extract(sd15, images, "a cat", LAYERS[:2], t=25, seed=1, size=SIZE)
    assert torch.equal(backwards[1].tensors[LAYERS[1]], alone.tensors[LAYERS[1]])


def test_denoise_from_must_exceed_every_t_before_the_vae_runs(sd15, images):
    with VaeCalls(sd15) as calls:
        with pytest.raises(ValueError, match=r"denoise_from \(60\) must be above t \(100\)"):
            extract_timesteps(sd15, images, "a cat", LAYERS, TS, size=SIZE, denoise_from=60)
        with pytest.raises(ValueError, match="3 denoising steps do not fit between timesteps 102 and 100"):
            extract_timesteps(sd15, images, "a cat", LAYERS, TS, size=SIZE, denoise_from=102, denoise_steps=3)
    assert calls.n == 0


def test_bad_timestep_lists(sd15, images):
    for bad, message in (([50, 50], "timestep 50 appears twice"), ([], "no timesteps given"),
                         ([25, 1000], "t must be an integer training timestep in 0..999, got 1000"),
                         ([2.5], "got 2.5"), ("25,50", "parse text with parse_timesteps")):
        with pytest.raises(ValueError, match=message):
            extract_timesteps(sd15, images, "a cat", LAYERS, bad, size=SIZE)


def test_the_memory_plan_counts_every_timestep(sd15, images, monkeypatch):
    from diffusion_feature.layer_catalog import resolve_taps

    taps = resolve_taps(LAYERS, sd15.denoiser, "sd15")
    plan = lambda n: extraction.extraction_needs(sd15.denoiser, taps, 2, (8, 12), 77, vae=sd15.vae,  # noqa: E731
                                                 timesteps=n)[torch.device("cpu")]
    one, three = plan(1), plan(3)
    features = lambda need, label: dict(need.parts)[label]  # noqa: E731
    assert features(three, "the features of 2 images at 3 timesteps") == 3 * features(one, "the features of 2 images")
    # between the two plans: one t runs, three are refused before the VAE, naming the timesteps
    monkeypatch.setattr(extraction, "_free_bytes", lambda device: (one.total + three.total) // 2)
    extract(sd15, images, "a cat", LAYERS, t=50, size=SIZE)
    with VaeCalls(sd15) as calls:
        with pytest.raises(FeatureMemoryError, match="at 3 timesteps"):
            extract_timesteps(sd15, images, "a cat", LAYERS, TS, size=SIZE)
    assert calls.n == 0


def test_parse_timesteps():
    assert parse_timesteps("25,50,100") == [25, 50, 100]
    assert parse_timesteps(" 100, 0 ,999") == [100, 0, 999]  # order kept, spaces allowed, both ends of 0..999
    assert parse_timesteps("50") == [50]
    for text, message in (
            ("25,50,25", r"timestep 25 appears twice in '25,50,25'"),
            ("25,1000", r"timestep '1000' \(entry 2 of '25,1000'\) is outside 0..999"),
            ("-1", r"timestep '-1' \(entry 1 of '-1'\) is outside 0..999"),
            ("25,abc", r"timestep 'abc' \(entry 2 of '25,abc'\) is not an integer"),
            ("2.5", r"timestep '2.5' \(entry 1 of '2.5'\) is not an integer"),
            ("5_0", r"timestep '5_0' \(entry 1 of '5_0'\) is not an integer"),
            ("25,,50", r"timestep entry 2 of '25,,50' is empty"),
            ("25,", r"timestep entry 2 of '25,' is empty"),
            ("", "no timesteps given"), ("  ", "no timesteps given")):
        with pytest.raises(ValueError, match=message):
            parse_timesteps(text)
    with pytest.raises(ValueError, match="as text"):
        parse_timesteps([25, 50])

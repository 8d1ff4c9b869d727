"""Half precision: every run in float16 and bfloat16 agrees with the same run in float32 to that precision.

A dtype slip (latents left in float32 beside a half model, a map softmax in half without an upcast, a scheduler step
in half) shows as an error of order one, far above the bound; rounding alone stays near a few units of the format's
epsilon. The bound is 10 epsilons of the reduced format, relative to the float32 result's norm.

Runs on the CPU here; `DF_TEST_DEVICE=cuda` runs the same checks on a GPU (its kernels: SDPA's flash and
memory-efficient paths, cuDNN convolutions), which is what the lent GPU machine is for.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import tiny_feature_model, tiny_pixart_model
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.generation import generate
from diffusion_feature.engine.inversion import invert
from diffusion_feature.engine.loading import _finish
from diffusion_feature.engine.pnp import translate

DEVICE = os.environ.get("DF_TEST_DEVICE", "cpu")
HALF = [torch.float16, torch.bfloat16]
SIZE = "96x64"  # the photo's own size (keep-aspect would scale it up to the native area)
TAPS = {
    "sd15": ["up-level1-repeat1-res-out", "up-level1-repeat0-vit-block0-cross-q",
             "up-level1-repeat0-vit-block0-self-map", "down-level1-repeat0-vit-block0-cross-map"],
    "sdxl": ["up-level0-repeat0-vit-block1-out", "up-level1-repeat1-res-increment",
             "up-level0-repeat0-vit-block1-self-map", "mid-vit-block0-cross-map"],
    "pixart-sigma": ["vit-block1-out", "vit-block2-ffn-inner", "vit-block1-self-map", "vit-block0-cross-map"],
}


def _models(family: str, dtype: torch.dtype):
    """The float32 reference and a copy of the same weights in `dtype`, both on DEVICE."""
    ref = tiny_pixart_model() if family == "pixart-sigma" else tiny_feature_model(family)
    half = copy.deepcopy(ref)
    return _finish(ref, torch.float32, DEVICE), _finish(half, dtype, DEVICE)


def _bound(dtype: torch.dtype, epsilons: int = 10) -> float:
    return epsilons * torch.finfo(dtype).eps


def _relative_error(half: torch.Tensor, ref: torch.Tensor) -> float:
    half, ref = half.float().cpu(), ref.float().cpu()
    return ((half - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", autouse=True)
def exact_float32_reference():
    """On a GPU, float32 convolutions default to TF32 (float16's mantissa): the reference must be true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 64, 96, 3, generator=g)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart-sigma"])
def test_extraction_in_half_precision_matches_float32(family, dtype, photo):
    ref_model, half_model = _models(family, dtype)
    ids = TAPS[family]
    ref = extract(ref_model, photo, "a photo of a cat", ids, t=261, seed=5, size=SIZE)
    half = extract(half_model, photo, "a photo of a cat", ids, t=261, seed=5, size=SIZE)
    assert list(half.tensors) == ids
    for layer in ids:
        h, r = half.tensors[layer], ref.tensors[layer]
        assert h.dtype == dtype and h.shape == r.shape, layer
        assert torch.isfinite(h).all(), layer
        assert _relative_error(h, r) < _bound(dtype), (layer, _relative_error(h, r))
        if layer.endswith("-map"):  # probabilities: every row sums to one in the format's precision
            sums = h.float().sum(-1)
            assert torch.allclose(sums, torch.ones_like(sums), atol=_bound(dtype)), layer


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart-sigma"])
def test_generation_in_half_precision_matches_float32(family, dtype):
    ref_model, half_model = _models(family, dtype)
    layer = TAPS[family][0]
    kwargs = dict(steps=3, cfg=5.0, seed=2, height=64, width=64, layers=[layer], capture_steps="all")
    ref = generate(ref_model, "a red house", **kwargs)
    half = generate(half_model, "a red house", **kwargs)
    assert half.images.dtype == torch.float32 and torch.isfinite(half.images).all()
    assert _relative_error(half.images, ref.images) < _bound(dtype)
    feats = half.features.tensors[layer]
    assert feats.dtype == dtype and _relative_error(feats, ref.features.tensors[layer]) < _bound(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_inversion_and_pnp_in_half_precision_match_float32(family, dtype, photo):
    """DDIM inversion amplifies whatever error a step makes in every later step (measured here: about 2, 5, 6 and 9
    epsilons after steps 1..4 in both formats, i.e. rounding alone), so the chains are kept to two steps."""
    ref_model, half_model = _models(family, dtype)
    ref_inv = invert(ref_model, photo, "a photo of a cat", steps=2, size=SIZE)
    half_inv = invert(half_model, photo, "a photo of a cat", steps=2, size=SIZE)
    assert half_inv.latents.dtype == torch.float32  # kept on the CPU in float32 whatever the model's dtype
    assert _relative_error(half_inv.latents, ref_inv.latents) < _bound(dtype)
    assert _relative_error(half_inv.reconstruction, ref_inv.reconstruction) < _bound(dtype)
    ref = translate(ref_model, ref_inv, ["a photo of a dog"], cfg=5.0)
    half = translate(half_model, half_inv, ["a photo of a dog"], cfg=5.0)
    assert torch.isfinite(half.images).all()
    # cfg 5 scales the conditional-unconditional difference, and its rounding, five times (measured: 7 to 8 epsilons).
    assert _relative_error(half.images, ref.images) < _bound(dtype, 20)


def test_sdxl_vae_stays_float32_when_the_model_is_half():
    """SDXL's VAE overflows in float16 (diffusers' pipelines upcast it too): loading in half keeps it float32."""
    _, half_model = _models("sdxl", torch.float16)
    assert half_model.dtype == torch.float16
    assert next(half_model.vae.parameters()).dtype == torch.float32
    assert all(next(e.parameters()).dtype == torch.float16 for e in half_model.text_encoders)

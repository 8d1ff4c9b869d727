"""Gradient mode: extract(..., grad=True) keeps the features on the autograd graph, so a head on the features (and
the denoiser under it) trains; without it nothing is recorded for autograd."""
from __future__ import annotations

import torch

from conftest import tiny_feature_model
from diffusion_feature.engine.commands import SAMPLES
from diffusion_feature.engine.extraction import extract

LAYERS = ["down-level1-repeat0-res-out", "down-level1-repeat0-vit-block0-self-map"]


def test_a_linear_head_trains_through_the_features_and_gradients_reach_the_denoiser():
    model = tiny_feature_model("sd15")  # its own: this test writes gradients and weights
    images = [str(SAMPLES / "house.jpg"), str(SAMPLES / "cat.jpg")]
    torch.manual_seed(0)
    # a per-cell regression from the 16 channels of down-level1: a student head learns a fixed teacher's output
    head, teacher = torch.nn.Conv2d(16, 1, 1), torch.nn.Conv2d(16, 1, 1)
    optimiser = torch.optim.Adam([{"params": head.parameters(), "lr": 0.1},
                                  {"params": list(model.denoiser.parameters()), "lr": 1e-3}])
    losses, target = [], None
    for _ in range(6):
        optimiser.zero_grad()
        feats = extract(model, images, "a photo", LAYERS, t=50, seed=0, size=(64, 64), grad=True)
        x = feats.tensors[LAYERS[0]]
        assert x.requires_grad and feats.tensors[LAYERS[1]].requires_grad  # the map too (rebuilt from q and k)
        target = teacher(x).detach() if target is None else target
        loss = torch.nn.functional.mse_loss(head(x), target)
        loss.backward()
        losses.append(loss.item())
        optimiser.step()
    assert losses[-1] < losses[0] * 0.3, losses
    grads = {name: p.grad for name, p in model.denoiser.named_parameters()}
    # the layers before the tap got gradients; the rest never ran (the forward stops at the last tap)
    for name in ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "down_blocks.1.resnets.0.conv2.weight",
                 "time_embedding.linear_1.weight"]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in ["conv_out.weight", "up_blocks.3.resnets.0.conv1.weight", "mid_block.resnets.0.conv1.weight",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]:
        assert grads[name] is None, name
    # the attention map's graph reaches the projections it is built from
    optimiser.zero_grad(set_to_none=True)
    attention = extract(model, images, "a photo", LAYERS, t=50, seed=0, size=(64, 64), grad=True).tensors[LAYERS[1]]
    attention.pow(2).sum().backward()
    for name in ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"]:
        assert model.denoiser.get_parameter(name).grad.abs().sum() > 0, name


def test_without_grad_mode_nothing_is_recorded(tiny_sd15):
    feats = extract(tiny_sd15, [str(SAMPLES / "house.jpg")], "", LAYERS, t=50, seed=0, size=(64, 64))
    assert not any(v.requires_grad for v in feats.tensors.values())
    with torch.enable_grad():  # even when the caller records: the default is no autograd at all
        feats = extract(tiny_sd15, [str(SAMPLES / "house.jpg")], "", LAYERS, t=50, seed=0, size=(64, 64))
    assert not any(v.requires_grad for v in feats.tensors.values())

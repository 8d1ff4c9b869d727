"""The shared hook lifecycle (layer_catalog/hook_set.py): what a run registers through a HookSet comes off again,
all of it, however the run ends; nothing of other code on the same modules is touched."""
from __future__ import annotations

import pytest
import torch

from conftest import hook_state, inputs_for
from diffusion_feature.engine.interrupts import InterruptChecks
from diffusion_feature.layer_catalog import FeatureCapture, FeatureInjection, resolve_taps
from diffusion_feature.layer_catalog.hook_set import AttachedHooks, HookSet, module_lookup

ATTN = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"


def _calls(log, name):
    return lambda *_: log.append(name)


def test_remove_takes_off_every_hook_and_only_those(sd15_unet):
    """Other code's hooks on the very modules the set hooks stay, and keep firing."""
    conv = sd15_unet.conv_in
    log = []
    theirs = [conv.register_forward_hook(_calls(log, "their hook")),
              conv.register_forward_pre_hook(_calls(log, "their pre-hook"))]
    before = hook_state(sd15_unet)
    try:
        hooks = HookSet()
        hooks.forward_hook(conv, _calls(log, "our hook"))
        hooks.forward_pre_hook(conv, _calls(log, "our pre-hook"), with_kwargs=True)
        assert len(hooks) == 2
        with torch.no_grad():
            sd15_unet(**inputs_for(sd15_unet))
        assert sorted(log) == ["our hook", "our pre-hook", "their hook", "their pre-hook"]
        hooks.remove()
        assert len(hooks) == 0
        assert hook_state(sd15_unet) == before
        log.clear()
        with torch.no_grad():
            sd15_unet(**inputs_for(sd15_unet))
        assert sorted(log) == ["their hook", "their pre-hook"]
    finally:
        for handle in theirs:
            handle.remove()


def test_the_set_as_a_context_removes_all_on_an_exception_and_exits_twice_safely(sd15_unet):
    before = hook_state(sd15_unet)
    blocks = [sd15_unet.conv_in, *sd15_unet.down_blocks, sd15_unet.mid_block]
    with pytest.raises(KeyboardInterrupt):
        with HookSet() as hooks:
            for block in blocks:
                hooks.forward_pre_hook(block, lambda *_: None)
            assert hook_state(sd15_unet) != before
            raise KeyboardInterrupt
    assert hook_state(sd15_unet) == before
    hooks.remove()  # a second exit finds nothing to undo and undoes nothing else
    hooks.__exit__(None, None, None)
    assert hook_state(sd15_unet) == before


class _StuckModule(torch.nn.Module):
    """A module whose hooks can be registered but never taken off."""

    def register_forward_hook(self, hook, **kwargs):
        class Handle:
            def remove(self):
                raise OSError("cannot remove the hook")
        return Handle()


def test_a_failing_undo_does_not_keep_the_others_on():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    hooks = HookSet()
    hooks.forward_hook(net[0], lambda *_: None)
    hooks.forward_hook(_StuckModule(), lambda *_: None)  # undone between the hooks registered before and after it
    hooks.forward_pre_hook(net[1], lambda *_: None)
    with pytest.raises(OSError, match="cannot remove the hook"):
        hooks.remove()
    assert not net[0]._forward_hooks and not net[1]._forward_pre_hooks and len(hooks) == 0


class _Probe(AttachedHooks):
    """Hooks each given module, failing after `fail_after` of them when asked to."""

    def __init__(self, modules, fail_after=None):
        self.modules, self.fail_after, self.detached = modules, fail_after, 0

    def _attach(self, hooks):
        for i, module in enumerate(self.modules):
            if i == self.fail_after:
                raise KeyError("no such module")
            hooks.forward_hook(module, lambda *_: None)

    def _detached(self):
        self.detached += 1


def test_attached_hooks_roll_back_a_failed_attach_and_refuse_a_second_entry(sd15_unet):
    before = hook_state(sd15_unet)
    blocks = list(sd15_unet.down_blocks)
    probe = _Probe(blocks, fail_after=2)
    with pytest.raises(KeyError, match="no such module"):
        with probe:
            pytest.fail("the block must not run when attaching failed")
    assert hook_state(sd15_unet) == before and not probe.attached and probe.detached == 1

    probe = _Probe(blocks)
    with probe:
        assert probe.attached and sum(len(b._forward_hooks) for b in blocks) == len(blocks)
        with pytest.raises(RuntimeError, match="_Probe is already attached"):
            probe.__enter__()
        assert sum(len(b._forward_hooks) for b in blocks) == len(blocks)  # the refused entry added nothing
    assert hook_state(sd15_unet) == before and probe.detached == 1
    probe.__exit__(None, None, None)  # exiting again is harmless
    assert hook_state(sd15_unet) == before
    with probe:  # and the instance can be attached again after
        assert probe.attached
    assert hook_state(sd15_unet) == before


def test_module_lookup_names_the_missing_path(sd15_unet):
    lookup = module_lookup(sd15_unet, "network")
    assert lookup("conv_in") is sd15_unet.conv_in
    with pytest.raises(KeyError, match="the network has no module 'nope.0'"):
        lookup("nope.0")


def test_the_pack_context_managers_nest_and_leave_nothing_after_an_interrupt(sd15_unet):
    """FeatureInjection, FeatureCapture and InterruptChecks, nested as PnP nests them, all on one model: an
    interrupt raised from inside the forward leaves the model as it was."""
    before = hook_state(sd15_unet)
    ids = ["down-level1-repeat0-res-out", "up-level2-repeat1-vit-block0-cross-map"]
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with FeatureInjection(sd15_unet, resolve_taps(ids[:1], sd15_unet)), \
                FeatureCapture(sd15_unet, resolve_taps(ids, sd15_unet)) as cap, InterruptChecks(check, sd15_unet):
            with torch.no_grad():
                cap.run(**inputs_for(sd15_unet))
    assert len(calls) == 5
    assert hook_state(sd15_unet) == before

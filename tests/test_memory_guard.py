"""The memory guard: what is available (host, cgroup, rlimits), what a run keeps and needs at its peak (measured on
the meta device and compared with what real runs return), refusals before any forward, and interrupt checks
between blocks that leave no hooks behind."""
from __future__ import annotations

import re
import threading
import time
import weakref

import pytest
import torch
import torch.nn.functional as F

from conftest import hook_state
from diffusion_feature.layer_catalog import resolve_taps
from diffusion_feature.engine import memory_guard
from diffusion_feature.engine.extraction import extract_in_batches, extraction_needs
from diffusion_feature.engine.generation import generate, generation_needs
from diffusion_feature.engine.inversion import invert
from diffusion_feature.engine.memory_guard import FeatureMemoryError
from diffusion_feature.engine.prompts import encode_prompt

SELF_MAP = "down-level0-repeat0-vit-block0-self-map"
IDS = [SELF_MAP, "up-level3-repeat1-vit-block0-cross-map", "mid-repeat0-res-out",
       "up-level2-repeat1-vit-block0-cross-q"]
NUMBERS = re.compile(r"would need ([\d.]+) (MiB|GiB) on cpu \(.*\) but only ([\d.]+) (MiB|GiB) is free")


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class ForwardTrap:
    """Fails the test at the first forward of the denoiser or the VAE: a refusal must come before any of them (and
    a guard that missed would otherwise start a run of minutes)."""

    def __init__(self, *modules):
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]
        self.handles += [getattr(m, part).register_forward_pre_hook(self._hook) for m in modules
                         for part in ("encoder", "decoder") if hasattr(m, part)]

    @staticmethod
    def _hook(module, _args):
        raise AssertionError(f"a {type(module).__name__} forward ran before the memory guard refused")

    def close(self):
        for h in self.handles:
            h.remove()


def _budget(monkeypatch, n):
    monkeypatch.setattr(memory_guard, "available_bytes", lambda device, root="/": n)


# ---- what is available ---------------------------------------------------------------------------------------
def test_cgroup_v2_takes_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    _write(tmp_path, "proc/self/cgroup", "0::/user.slice/app\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/app/memory.max", "1000000\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/app/memory.current", "400000\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/app/memory.stat", "anon 300000\ninactive_file 100000\n")
    assert memory_guard.cgroup_available(tmp_path) == 1000000 - (400000 - 100000)  # page cache is reclaimable
    _write(tmp_path, "sys/fs/cgroup/user.slice/memory.max", "800000\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/memory.current", "750000\n")
    assert memory_guard.cgroup_available(tmp_path) == 50000  # the parent's limit binds first
    _write(tmp_path, "sys/fs/cgroup/user.slice/memory.max", "max\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/app/memory.max", "max\n")
    assert memory_guard.cgroup_available(tmp_path) is None  # no limit anywhere


def test_cgroup_v2_in_a_container_namespace_reads_the_mount_root(tmp_path):
    # /proc/self/cgroup names a path of the host's hierarchy that the container does not see
    _write(tmp_path, "proc/self/cgroup", "0::/kubepods/pod1/c1\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", str(8 * 2**30))
    _write(tmp_path, "sys/fs/cgroup/memory.current", str(6 * 2**30))
    assert memory_guard.cgroup_available(tmp_path) == 2 * 2**30


def test_cgroup_v1_limit_and_its_unlimited_value(tmp_path):
    _write(tmp_path, "proc/self/cgroup", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    folder = "sys/fs/cgroup/memory/docker/abc"
    _write(tmp_path, f"{folder}/memory.limit_in_bytes", "4000000\n")
    _write(tmp_path, f"{folder}/memory.usage_in_bytes", "3500000\n")
    _write(tmp_path, f"{folder}/memory.stat", "cache 0\ntotal_inactive_file 500000\n")
    assert memory_guard.cgroup_available(tmp_path) == 4000000 - 3000000
    _write(tmp_path, f"{folder}/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert memory_guard.cgroup_available(tmp_path) is None


def test_rlimits_count_what_the_process_already_uses(tmp_path):
    import resource

    _write(tmp_path, "proc/self/status", "Name:\tpython\nVmSize:\t  1000 kB\nVmData:\t   400 kB\n")
    limits = {resource.RLIMIT_AS: (3000 * 1024, resource.RLIM_INFINITY),
              resource.RLIMIT_DATA: (resource.RLIM_INFINITY, resource.RLIM_INFINITY)}
    assert memory_guard.rlimit_available(tmp_path, limits.__getitem__) == 2000 * 1024
    limits[resource.RLIMIT_DATA] = (1000 * 1024, resource.RLIM_INFINITY)
    assert memory_guard.rlimit_available(tmp_path, limits.__getitem__) == 600 * 1024
    unlimited = lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY)  # noqa: E731
    assert memory_guard.rlimit_available(tmp_path, unlimited) is None


def test_available_is_the_least_of_host_cgroup_and_rlimits(tmp_path, monkeypatch):
    _write(tmp_path, "proc/meminfo", "MemTotal: 64000000 kB\nMemAvailable:   30000000 kB\n")
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", str(4 * 2**30))
    _write(tmp_path, "sys/fs/cgroup/memory.current", str(2**30))
    monkeypatch.setattr(memory_guard, "rlimit_available", lambda root: None)  # this machine's own are not faked
    assert memory_guard.available_bytes("cpu", root=tmp_path) == 3 * 2**30
    _write(tmp_path, "sys/fs/cgroup/memory.max", "max")
    assert memory_guard.available_bytes("cpu", root=tmp_path) == 30000000 * 1024
    monkeypatch.setattr(memory_guard, "rlimit_available", lambda root: 2**20)
    assert memory_guard.available_bytes("cpu", root=tmp_path) == 2**20


# ---- what a forward needs --------------------------------------------------------------------------------------
def test_sdpa_is_counted_as_a_fused_kernel_and_explicit_scores_are_counted():
    q = torch.empty(1, 2, 4096, 8, device="meta")
    module = torch.nn.Identity()
    fused = memory_guard.traced_peak(module, lambda: F.scaled_dot_product_attention(q, q, q))
    explicit = memory_guard.traced_peak(module, lambda: (q @ q.transpose(-1, -2)).softmax(-1) @ q)
    scores = 2 * 4096 * 4096 * 4
    assert fused < scores / 100  # the output and the log-sum-exp, never the (4096, 4096) scores
    assert explicit >= 2 * scores  # the scores and their softmax are alive at once


def test_estimated_kept_bytes_equal_what_extract_in_batches_returns(sd15):
    images = torch.rand(5, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    features = extract_in_batches(sd15, images, "a cat", IDS, batch_size=2, feature_resize=2, size="96x64")
    real = sum(v.nbytes for v in features.tensors.values())
    taps = resolve_taps(IDS, sd15.denoiser)
    needs = extraction_needs(sd15.denoiser, taps, 2, (8, 12), 77, feature_resize=2, kept_images=5)
    assert dict(needs[torch.device("cpu")].parts)["the features of 5 images"] == real
    assert features.tensors[SELF_MAP].shape == (5, 2, 96, 96)


def test_estimated_kept_bytes_equal_what_generate_returns(sd15):
    pos, neg = encode_prompt(sd15, "a cat"), encode_prompt(sd15, "blurry")
    out = generate(sd15, pos, neg, steps=5, cfg=3.0, width=96, height=64, batch=2, layers=IDS,
                   capture_steps="0, 2-4", capture_branch="both", feature_resize=2)
    real = sum(v.nbytes for v in out.features.tensors.values())
    taps = resolve_taps(IDS, sd15.denoiser)
    cost = memory_guard.denoiser_cost(sd15.denoiser, taps, 4, (8, 12), 77, dtype=torch.float32, feature_resize=2)
    assert cost.kept // 4 * 4 * 4 == real  # per row x (2 branches x 2 images) x 4 captured steps
    assert out.features.tensors[SELF_MAP].shape[0] == 16
    needs = generation_needs(sd15, taps, 4, 4, 4, 64, 96, 77, feature_resize=2, images=2)
    kept = dict(needs[torch.device("cpu")].parts)["the features of 4 captured steps x 4 rows"]
    assert kept == real + real // 4  # the output and one step in flight: no final concatenation


def test_a_real_forward_fits_in_its_measured_peak(sd15):
    """The measured peak is a real bound: the forward runs under it on the CPU's allocator, counted by a dispatch
    mode on the real tensors (an independent count: real storages, real kernels)."""
    taps = resolve_taps(IDS, sd15.denoiser)
    cost = memory_guard.denoiser_cost(sd15.denoiser, taps, 2, (8, 12), 77)
    from conftest import inputs_for
    from diffusion_feature.layer_catalog import FeatureCapture

    kwargs = inputs_for(sd15.denoiser, (8, 12), batch=2, tokens=77)
    tracker = memory_guard._LiveBytes([*sd15.denoiser.parameters(), *sd15.denoiser.buffers(),
                                       *[v for v in kwargs.values() if torch.is_tensor(v)]], device_type="cpu")
    kept = {}
    capture = FeatureCapture(sd15.denoiser, taps, on_capture=lambda k, x: kept.update({k: x.nbytes}))
    with torch.no_grad(), capture, tracker:
        capture.run(**kwargs)
    assert sum(kept.values()) == cost.kept
    # the real run keeps its features on the model's device: measured peak + kept features bound it
    assert tracker.peak <= cost.peak + cost.kept
    assert tracker.peak >= cost.kept  # and the count is not trivially small


def _real_peak(run, *modules, inputs=()):
    """Peak bytes of the real tensors `run()` creates (the modules' weights and the inputs excluded: views of them
    allocate nothing), counted as they live."""
    tracker = memory_guard._LiveBytes([t for m in modules for t in (*m.parameters(), *m.buffers())] + list(inputs),
                                      device_type="cpu")
    with tracker:
        run()
    return tracker.peak


def test_a_whole_extraction_stays_within_its_plan(sd15):
    """Every batch's features kept, the output filled in place: the real run's peak stays within the plan (a final
    concatenation would hold all features twice and exceed it)."""
    images = torch.rand(24, 64, 96, 3, generator=torch.Generator().manual_seed(0))  # enough for features to dominate
    taps = resolve_taps(IDS, sd15.denoiser)
    plan = extraction_needs(sd15.denoiser, taps, 2, (8, 12), 77, kept_images=24, in_flight=2,
                            vae=sd15.vae)[torch.device("cpu")]
    kept = dict(plan.parts)["the features of 24 images"]
    assert kept > plan.total / 2
    peak = _real_peak(lambda: extract_in_batches(sd15, images, "a cat", IDS, batch_size=2, size="96x64"),
                      sd15.denoiser, sd15.vae, *sd15.text_encoders, inputs=[images])
    assert kept < peak <= plan.total


def test_a_whole_generation_stays_within_its_plan(sd15):
    taps = resolve_taps(IDS, sd15.denoiser)
    plan = generation_needs(sd15, taps, 2, 1, 20, 64, 96, 77, images=1)[torch.device("cpu")]
    kept = dict(plan.parts)["the features of 20 captured steps x 1 row"]
    assert kept > plan.total / 2
    peak = _real_peak(lambda: generate(sd15, "a cat", steps=20, cfg=5.0, width=96, height=64, layers=IDS,
                                       capture_steps="all"),
                      sd15.denoiser, sd15.vae, *sd15.text_encoders)
    assert kept * 20 // 21 < peak <= plan.total


# ---- refusals before any forward -----------------------------------------------------------------------------
def test_extract_in_batches_refuses_what_all_batches_keep_before_any_forward(sd15, monkeypatch):
    n = 8
    images = torch.rand(n, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    taps = resolve_taps([SELF_MAP], sd15.denoiser)
    one = extraction_needs(sd15.denoiser, taps, 1, (8, 12), 77, vae=sd15.vae)[torch.device("cpu")].total
    every = extraction_needs(sd15.denoiser, taps, 1, (8, 12), 77, kept_images=n, in_flight=1,
                             vae=sd15.vae)[torch.device("cpu")].total
    assert every > one  # (the VAE encoder's peak dominates one batch of this tiny model)
    budget = (one + every) // 2  # one batch fits, the run's accumulation does not
    _budget(monkeypatch, budget)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(FeatureMemoryError) as err:
            extract_in_batches(sd15, images, "a cat", [SELF_MAP], batch_size=1, size="96x64")
    finally:
        trap.close()
    message = str(err.value)
    assert "the features of 8 images" in message and "fewer images" in message and "feature_resize" in message
    need, _, free, _ = NUMBERS.search(message).groups()
    assert float(need) == pytest.approx(every / 2**20, abs=0.05) and float(free) == pytest.approx(
        budget / 2**20, abs=0.05)
    _budget(monkeypatch, every)  # exactly what the plan says: it runs
    out = extract_in_batches(sd15, images, "a cat", [SELF_MAP], batch_size=1, size="96x64")
    assert out.tensors[SELF_MAP].shape == (n, 2, 96, 96)


def test_generate_refuses_many_capture_steps_before_any_forward(sd15, monkeypatch):
    taps = resolve_taps([SELF_MAP], sd15.denoiser)
    one = generation_needs(sd15, taps, 1, 1, 1, 64, 96, 77)[torch.device("cpu")].total
    every = generation_needs(sd15, taps, 1, 1, 40, 64, 96, 77)[torch.device("cpu")].total
    budget = (one + every) // 2
    _budget(monkeypatch, budget)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(FeatureMemoryError) as err:
            generate(sd15, "a cat", steps=40, cfg=1.0, width=96, height=64, layers=[SELF_MAP], capture_steps="all")
    finally:
        trap.close()
    message = str(err.value)
    assert "at 40 steps" in message and "40 captured steps" in message
    most = int(re.search(r"at most (\d+) capture steps? fit", message).group(1))
    assert 1 <= most < 40
    assert generation_needs(sd15, taps, 1, 1, most, 64, 96, 77)[torch.device("cpu")].total <= budget
    assert generation_needs(sd15, taps, 1, 1, most + 1, 64, 96, 77)[torch.device("cpu")].total > budget
    _budget(monkeypatch, budget)
    out = generate(sd15, "a cat", steps=40, cfg=1.0, width=96, height=64, layers=[SELF_MAP],
                   capture_steps=f"0-{most - 1}")  # the advice followed: it runs
    assert out.features.tensors[SELF_MAP].shape[0] == most


def test_a_huge_generation_is_refused_up_front_with_a_size_that_fits(sd15, monkeypatch):
    budget = 4 * 2**30  # the output image (1.5 GiB) fits; one forward and the VAE decode at 8192x8192 do not
    _budget(monkeypatch, budget)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(FeatureMemoryError) as err:
            generate(sd15, "a cat", steps=20, cfg=5.0, width=8192, height=8192)
    finally:
        trap.close()
    message = str(err.value)
    assert "generating 1 image of 8192x8192" in message
    peak = re.search(r"the peak of one denoiser forward of 2 rows or the VAE ([\d.]+) GiB", message).group(1)
    assert float(peak) > 4.0
    need, unit, _, _ = NUMBERS.search(message).groups()
    assert unit == "GiB" and float(need) > 1.0
    w, h = (int(v) for v in re.search(r"(\d+)x(\d+) fits", message).groups())
    assert w == h and 64 <= w < 8192 and w % 64 == 0
    assert generation_needs(sd15, [], 2, 0, 0, h, w, 77)[torch.device("cpu")].total <= budget
    assert generation_needs(sd15, [], 2, 0, 0, h + 64, w + 64, 77)[torch.device("cpu")].total > budget


def test_a_too_large_batch_is_refused_with_the_batch_that_fits(sd15, monkeypatch):
    one = generation_needs(sd15, [], 2, 0, 0, 512, 512, 77, images=1)[torch.device("cpu")].total
    eight = generation_needs(sd15, [], 16, 0, 0, 512, 512, 77, images=8)[torch.device("cpu")].total
    _budget(monkeypatch, (one + eight) // 2)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(FeatureMemoryError) as err:
            generate(sd15, "a cat", steps=20, cfg=5.0, width=512, height=512, batch=8)
    finally:
        trap.close()
    most = int(re.search(r"a batch of at most (\d+) fits", str(err.value)).group(1))
    assert 1 <= most < 8
    assert generation_needs(sd15, [], 2 * most, 0, 0, 512, 512, 77, images=most)[torch.device("cpu")].total <= (
        one + eight) // 2 < generation_needs(sd15, [], 2 * most + 2, 0, 0, 512, 512, 77,
                                             images=most + 1)[torch.device("cpu")].total


def test_inversion_counts_every_latent_and_captured_step(sd15, monkeypatch):
    photo = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    taps = resolve_taps([SELF_MAP], sd15.denoiser)
    latents = 31 * 4 * 8 * 12 * 4
    one = generation_needs(sd15, taps, 1, 1, 1, 64, 96, 77, encode=1,
                           extra=(("cpu", "latents", latents),))[torch.device("cpu")].total
    every = generation_needs(sd15, taps, 1, 1, 30, 64, 96, 77, encode=1,
                             extra=(("cpu", "latents", latents),))[torch.device("cpu")].total
    _budget(monkeypatch, (one + every) // 2)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(FeatureMemoryError, match=r"inverting a 96x64 image in 30 steps capturing 1 layer"):
            invert(sd15, photo, "", steps=30, size="96x64", layers=[SELF_MAP], capture_steps="all")
    finally:
        trap.close()


# ---- interrupts inside forwards --------------------------------------------------------------------------------
class Stop(Exception):
    pass


def _interrupt_at(n):
    calls = []

    def check():
        calls.append(1)
        if len(calls) == n:
            raise Stop()
    return check, calls


def test_an_interrupt_inside_a_forward_stops_generation_mid_step_and_leaves_no_hooks(sd15):
    before_unet, before_vae = hook_state(sd15.denoiser), hook_state(sd15.vae)
    ran = []
    marks = [sd15.denoiser.conv_in.register_forward_hook(lambda *a: ran.append("conv_in")),
             sd15.denoiser.conv_out.register_forward_hook(lambda *a: ran.append("conv_out"))]
    steps = []
    check, calls = _interrupt_at(4)
    try:
        with pytest.raises(Stop):
            generate(sd15, "a cat", steps=3, cfg=5.0, width=96, height=64, layers=[SELF_MAP], capture_steps="all",
                     on_step=lambda *a: steps.append(a[0]), interrupt=check)
    finally:
        for m in marks:
            m.remove()
    assert ran == ["conv_in"] and steps == [] and len(calls) == 4  # stopped inside the first forward
    assert hook_state(sd15.denoiser) == before_unet and hook_state(sd15.vae) == before_vae
    # the checks run between blocks all along a step: one full run calls them many times per forward
    check, calls = _interrupt_at(-1)
    generate(sd15, "a cat", steps=2, cfg=1.0, width=96, height=64, interrupt=check)
    assert len(calls) > 2 * 10  # two forwards and a decode, each checked at every block
    assert hook_state(sd15.denoiser) == before_unet and hook_state(sd15.vae) == before_vae


def test_an_interrupt_stops_extraction_inversion_and_the_vae_inside_their_forwards(sd15):
    images = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    before_unet, before_vae = hook_state(sd15.denoiser), hook_state(sd15.vae)
    for n in (2, 16):  # inside the VAE encoder (13 blocks), then inside the denoiser
        check, calls = _interrupt_at(n)
        with pytest.raises(Stop):
            extract_in_batches(sd15, images, "a cat", IDS, batch_size=1, size="96x64", interrupt=check)
        assert len(calls) == n
        check, calls = _interrupt_at(n)
        with pytest.raises(Stop):
            invert(sd15, images[:1], "", steps=2, size="96x64", interrupt=check)
        assert hook_state(sd15.denoiser) == before_unet and hook_state(sd15.vae) == before_vae


# ---- a dataset run never piles up batches -----------------------------------------------------------------------
def test_dataset_run_keeps_at_most_two_batches_whatever_the_writer_speed(sd15, tmp_path, monkeypatch):
    from PIL import Image

    from diffusion_feature.engine import extraction
    from diffusion_feature.engine.dataset import runner, sources

    for i in range(5):
        Image.new("RGB", (96, 64), (40 * i, 0, 0)).save(tmp_path / f"im{i}.png")
    alive, most = [], []
    real_extract, real_save = extraction.extract_timesteps, runner._save_batch

    def extract_timesteps(*a, **kw):
        features = real_extract(*a, **kw)
        alive.append(weakref.ref(features[0]))
        most.append(sum(r() is not None for r in alive))
        return features

    lock = threading.Lock()

    def slow_save(*a):
        with lock:
            time.sleep(0.6)  # a writer much slower than the model
        return real_save(*a)

    monkeypatch.setattr(extraction, "extract_timesteps", extract_timesteps)
    monkeypatch.setattr(runner, "_save_batch", slow_save)
    result = runner.extract_dataset(sd15, sources.collect(str(tmp_path)), tmp_path / "out", IDS, [50], 0,
                                    prompts="a cat", size=(64, 96), progress=False, log=None)
    assert result.status == 0 and result.stats.written == 5
    assert len(most) == 5 and max(most) <= 2


# ---- the nodes -------------------------------------------------------------------------------------------------
@pytest.fixture()
def nodes():
    from diffusion_feature import NODE_CLASS_MAPPINGS

    return {name: cls() for name, cls in NODE_CLASS_MAPPINGS.items()}


def test_dfgenerate_refuses_a_huge_size_before_any_forward(sd15, nodes, monkeypatch):
    (pos,) = nodes["DFEncodePrompt"].encode(sd15, "a cat")
    _budget(monkeypatch, 4 * 2**30)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(ValueError, match=r"generating 1 image of 8192x8192 would need [\d.]+ GiB on cpu .* "
                                             r"but only 4\.00 GiB is free to this process: \d+x\d+ fits"):
            nodes["DFGenerate"].run(sd15, pos, 0, 20, 5.0, "ddim", 8192, 8192, 1, "", "cond")
    finally:
        trap.close()


def test_dfextract_refuses_what_its_batches_accumulate_before_any_forward(sd15, nodes, monkeypatch):
    from diffusion_feature.engine.images import target_size

    (cond,) = nodes["DFEncodePrompt"].encode(sd15, "a cat")
    (hooked,) = nodes["DFAttachHooks"].attach(sd15, SELF_MAP, "none")
    w, h = target_size(96, 64, sd15.native_size)
    taps = resolve_taps([SELF_MAP], sd15.denoiser)
    one = extraction_needs(sd15.denoiser, taps, 1, (h // 8, w // 8), 77, offload=True, vae=sd15.vae)
    every = extraction_needs(sd15.denoiser, taps, 1, (h // 8, w // 8), 77, offload=True, kept_images=8,
                             in_flight=1, vae=sd15.vae)
    cpu = torch.device("cpu")
    _budget(monkeypatch, (one[cpu].total + every[cpu].total) // 2)
    trap = ForwardTrap(sd15.denoiser, sd15.vae)
    try:
        with pytest.raises(ValueError, match=rf"extracting 1 layer from 8 images of {w}x{h} would need .*the "
                                             r"features of 8 images .* fewer images or a smaller batch_size"):
            nodes["DFExtractFeatures"].extract(hooked, torch.rand(8, 64, 96, 3), cond, 50, 0, batch_size=1)
    finally:
        trap.close()


def test_nodes_check_comfyui_interrupts_inside_forwards_and_leave_no_hooks(sd15, nodes, monkeypatch):
    from diffusion_feature.nodes import comfy_env

    before_unet, before_vae = hook_state(sd15.denoiser), hook_state(sd15.vae)
    (pos,) = nodes["DFEncodePrompt"].encode(sd15, "a cat")
    check, calls = _interrupt_at(20)
    monkeypatch.setattr(comfy_env, "interrupt_callback", lambda: check)
    with pytest.raises(Stop):
        nodes["DFGenerate"].run(sd15, pos, 0, 3, 5.0, "ddim", 96, 64, 1, "all", "cond")
    assert len(calls) == 20
    check, calls = _interrupt_at(20)
    with pytest.raises(Stop):
        nodes["DFInvert"].run(sd15, torch.rand(1, 64, 96, 3), "", 3)
    assert len(calls) == 20
    assert hook_state(sd15.denoiser) == before_unet and hook_state(sd15.vae) == before_vae

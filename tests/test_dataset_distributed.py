"""Several processes through torchrun (CPU, gloo): the split, the union equal to one process, a killed rank."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_feature.engine.dataset import distributed, index, sources
from diffusion_feature.engine.dataset.runner import extract_dataset
from diffusion_feature.engine.loading import load_model
from test_dataset_run import HW, LAYERS, SHIM, _base, _consistent, _content, _done, _png, _records, _run

NAMES = ["a", "b", "c", "d", "e"]


def _torchrun(*args, fault=None):
    """`torchrun --nproc-per-node 2 --standalone -m diffusion_feature extract ...`, the venv's torchrun."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if fault:
        env.update(DF_TEST_FAULT=fault, DF_TEST_FAULT_RANK="1",
                   PYTHONPATH=os.pathsep.join([str(SHIM), env.get("PYTHONPATH", "")]))
    return subprocess.run([*launcher, "--nproc-per-node", "2", "--standalone", "-m", "diffusion_feature", "extract",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    for i, name in enumerate(NAMES):
        _png(root / "in" / ("city" if i % 2 else "town") / f"{name}.png", i)
    (root / "in" / "town" / "zero.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(dataset, sd15_folder):
    """One process's run of the same dataset and settings."""
    from diffusion_feature.engine import cli

    out = dataset / "reference"
    try:
        cli.main(["extract", *map(str, _base(sd15_folder, dataset / "in", out, "--t", "25,50", "--seed", 3))])
    except SystemExit:
        pass
    return out


def test_the_split_and_devices():
    ranks = [distributed.Ranks(r, 3, r, False) for r in range(3)]
    items = list(range(8))
    assert [r.share(items) for r in ranks] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert distributed.device_for("cuda", ranks[2]) == "cuda:2" and distributed.device_for("cuda:0", ranks[1]) == \
        "cuda:1"
    assert distributed.device_for("cpu", ranks[1]) == "cpu"
    assert distributed.device_for("cuda:1", distributed.Ranks()) == "cuda:1"  # one process keeps its device
    assert distributed.from_env().world == 1  # no launcher: one process, nothing initialised


@pytest.mark.distributed
def test_two_processes_equal_one(dataset, reference, sd15_folder, tmp_path):
    out = tmp_path / "out"
    run = _torchrun(*_base(sd15_folder, dataset / "in", out, "--t", "25,50", "--seed", 3))
    assert run.returncode != 0  # zero.png failed: every process exits 1 once all good images are written
    assert _content(out) == _content(reference)  # the union, bit for bit
    parts = sorted(p.name for p in (out / "df_index").glob("part-*.jsonl"))
    assert parts == ["part-00000.jsonl", "part-00001.jsonl"]
    order = sorted(r["image"] for r in _records(reference))  # the run's order: sorted relative names
    for record in _records(out):
        assert order.index(record["image"]) % 2 == record["rank"]  # image i went to rank i % 2
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["written"] == 5 and summary["status"] == 1
    assert [f["image"] for f in summary["failures"]] == ["town/zero.png"]
    assert "5 written" in run.stdout and "2 processes" in run.stdout  # one summary line, from rank 0
    assert run.stdout.count("extract: ") == 1
    assert "rank 0/2" in run.stderr and "rank 1/2" in run.stderr  # a progress bar per rank


@pytest.mark.distributed
def test_a_killed_rank_leaves_a_folder_resume_completes(dataset, reference, sd15_folder, tmp_path, capsys):
    out = tmp_path / "out"
    run = _torchrun(*_base(sd15_folder, dataset / "in", out, "--t", "25,50", "--seed", 3), fault="kill:2")
    assert run.returncode != 0  # torchrun's own status when a child fails
    # the survivor stops with 3 (the group is gone) or 130 (the launcher's SIGTERM came first), never 1, and
    # writes summary.json itself
    survivor = re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: (-?\d+)", run.stderr)
    assert survivor and int(survivor.group(1)) in (3, 130), run.stderr[-3000:]
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert summary["status"] in (3, 130) and summary["processes"] == 2 and summary["reported"] == [0]
    done = _done(out)
    # run order: city/b, city/d, town/a, town/c, town/e, town/zero; rank 1's first image is city/d, and it was
    # killed inside its second write (d's t050 file)
    assert "city/d.png" not in done and all(r["rank"] == 0 for r in done.values())
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, dataset / "in", out, "--t", "25,50", "--seed", 3, "--resume"))
    assert rc == 1 and f"{5 - len(done)} written" in stdout  # 1: zero.png still fails
    assert _content(out) == _content(reference)
    _consistent(out)
    assert not index.stop_requested(out)


class _PartnerGone(distributed.Ranks):
    """One process of a two-process group whose partner died: the start went through (rank 0's refusal, naming
    root and attempt reach rank 1), every collective after it fails as gloo's do."""

    start: dict = {}

    def broadcast(self, obj):
        if self.rank == 0:
            _PartnerGone.start["obj"] = obj
        return _PartnerGone.start["obj"]

    def gather(self, obj):
        raise distributed.GroupLost("another process of the run is gone (Connection closed by peer)")


@pytest.fixture
def sigterm_restored():
    """The test process's own SIGTERM handler back after a test whose run leaves SIGTERM ignored."""
    previous = signal.getsignal(signal.SIGTERM)
    yield previous
    signal.signal(signal.SIGTERM, previous)


def test_survivors_stop_with_their_status_and_write_the_summary(dataset, reference, sd15_folder, tmp_path,
                                                                 monkeypatch, capsys, sigterm_restored):
    from diffusion_feature.engine import extraction

    torch.set_num_threads(1)
    model = load_model(sd15_folder)  # as the CLI loads it: the resume below continues these runs bit for bit
    out = tmp_path / "out"
    items = sources.collect(str(dataset / "in"))
    kw = dict(seed=3, size=HW, progress=False, log=None)
    first = extract_dataset(model, items, out, LAYERS, [25, 50], ranks=_PartnerGone(0, 2), **kw)
    assert first.status == 3 and first.stats.written == 3  # its whole share, then the group was gone
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert (summary["status"], summary["reported"], summary["processes"], summary["written"]) == (3, [0], 2, 3)
    # a process of a group keeps ignoring SIGTERM on its way out: the launcher's SIGTERM, sent because the other
    # process died, must not turn its status into -15 (a race the torchrun kill test lost on a loaded machine)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.signal(signal.SIGTERM, sigterm_restored)
    real, calls = extraction.extract_timesteps, [0]

    def sigterm_on_the_second_image(*a, **k):  # the launcher stopping the survivors
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(extraction, "extract_timesteps", sigterm_on_the_second_image)
        second = extract_dataset(model, items, out, LAYERS, [25, 50], ranks=_PartnerGone(1, 2), **kw)
    assert second.status == 130 and second.stats.written == 3 + 1  # the counts of both survivors
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert (summary["status"], summary["reported"], summary["written"], summary["interrupted"]) == (130, [0, 1], 4,
                                                                                                   True)
    assert "interrupted (SIGTERM)" in (out / "df_index" / "stop-requested").read_text()
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, dataset / "in", out, "--t", "25,50", "--seed", 3, "--resume"))
    assert rc == 1 and "1 written" in stdout and "4 skipped" in stdout  # 1: zero.png fails, as in the reference
    assert _content(out) == _content(reference)

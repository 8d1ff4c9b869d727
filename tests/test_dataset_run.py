"""Dataset runs through `extract` (engine/dataset/): recursion and names, bad files, the index, resume, several
timesteps, the latent cache, ControlNet hints, a full disk, Ctrl-C and SIGKILL.

Features are compared with torch.equal against `extract` on the same model loaded from the same folder (the CLI's
model), so every comparison is bit for bit."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_feature.engine import cli, features_io
from diffusion_feature.engine.dataset import index, naming, sources
from diffusion_feature.engine.dataset.run_file import ResumeError
from diffusion_feature.engine.dataset.runner import extract_dataset
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.features_io import load_features
from diffusion_feature.engine.images import ImageInputError, open_image
from diffusion_feature.engine.loading import load_model

LAYERS = "mid-repeat0-res-out,up-level1-repeat0-res-out"
SIZE = "96x64"
HW = (64, 96)
SHIM = Path(__file__).resolve().parent / "fault_shim"


@pytest.fixture(scope="module")
def model(sd15_folder):
    torch.set_num_threads(1)
    return load_model(sd15_folder)


def _png(path: Path, seed: int, size=(96, 64), mode="RGB") -> Path:
    g = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def _pngs(folder: Path, names: str) -> None:
    """One random PNG per letter of `names` in `folder` (a.png, b.png, ...), seeded by its position."""
    for i, name in enumerate(names):
        _png(folder / f"{name}.png", i)


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = cli.main(["extract", *map(str, args)])
    except SystemExit as e:  # argparse's exit(2) for refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _base(folder, inputs, out, *extra):
    return ["--model", folder, "--layers", LAYERS, "--size", SIZE, "--input", inputs, "--output", out, *extra]


def _want(model, path, t=50, seed=0, **kw):
    return extract(model, [path], "", LAYERS, t=t, seed=seed, size=HW, **kw)


def _same(saved_path: Path, want) -> bool:
    saved = load_features(saved_path)
    return list(saved.tensors) == list(want.tensors) and all(
        torch.equal(saved.tensors[k], want.tensors[k]) for k in want.tensors)


def _records(out: Path) -> list[dict]:
    return index.read_records(out)


def _done(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in _records(out) if r["status"] == "done"}


def _files(out: Path) -> dict[str, bytes]:
    """Every output file but the index, with its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and naming.INDEX_DIR not in p.relative_to(out).parts}


def _content(out: Path) -> dict:
    """Every output file but the index by what it holds: safetensors as (metadata, tensors as bytes) - the header's
    key order is not fixed from one write to the next -, other files as their bytes."""
    from safetensors import safe_open

    held = {}
    for rel, data in _files(out).items():
        if rel.endswith(".safetensors"):
            with safe_open(str(out / rel), "pt") as f:
                held[rel] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
        else:
            held[rel] = data
    return held


def _no_temporaries(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.startswith(".df-")]


# ---- sources and names -------------------------------------------------------------------------------------------
def test_folder_recurses_and_outputs_mirror_relative_names(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    images = [_png(inp / "city" / "a.png", 1), _png(inp / "town" / "a.png", 2), _png(inp / "b.PNG", 3),
              _png(inp / "sub.jpg" / "c.JPEG", 4)]  # a folder named like an image is a folder
    (inp / "notes.txt").write_text("not an image")
    (inp / "weights.safetensors").write_bytes(b"\0" * 8)
    _png(inp / ".hidden" / "x.png", 5)
    _png(inp / "._b.png", 6)  # a macOS resource fork: hidden, skipped
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 0, stdout
    assert sorted(_files(out)) == ["b.safetensors", "city/a.safetensors", "sub.jpg/c.safetensors",
                                   "town/a.safetensors"]
    for path in images:
        rel = path.relative_to(inp).with_suffix(".safetensors")
        assert _same(out / rel, _want(model, path))
    done = _done(out)
    assert sorted(done) == ["b.PNG", "city/a.png", "sub.jpg/c.JPEG", "town/a.png"]
    rec = done["city/a.png"]
    saved = out / "city/a.safetensors"
    assert rec["outputs"] == [{"path": "city/a.safetensors", "bytes": saved.stat().st_size,
                               "mtime_ns": saved.stat().st_mtime_ns,
                               "sha256": hashlib.sha256(saved.read_bytes()).hexdigest()}]
    assert rec["source"] == str(images[0]) and rec["t"] == [50] and rec["seed"] == 0
    assert "4 written" in stdout and "0 failed" in stdout


def test_globs_take_image_files_only_and_lists_keep_their_order(tmp_path):
    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    _png(inp / "deep" / "b.Jpg", 2)
    (inp / "c.png.txt").write_text("x")
    (inp / "d.png").mkdir()
    got = sources.from_pattern(str(inp / "**" / "*"))
    assert [s.relative for s in got] == ["a.png", "deep/b.Jpg"]
    assert [s.relative for s in sources.from_pattern(str(inp / "*.png"))] == ["a.png"]  # d.png/ is a folder
    (inp / "loop.png").symlink_to("loop.png")  # a link to itself
    (inp / "dangling.png").symlink_to("gone.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nin/deep/b.Jpg\n\n{inp / 'a.png'}\nin/a.png\nin/missing.png\nin/d.png\n"
                       "in/c.png.txt\nin/loop.png\nin/dangling.png\n")
    got = sources.from_list(listing)
    assert [s.relative for s in got] == ["deep/b.Jpg", "a.png", "missing.png", "d.png", "c.png.txt", "loop.png",
                                         "dangling.png"]
    problems = [s.problem for s in got]
    assert problems[:2] == [None, None]
    assert "does not exist" in problems[2] and "is a folder" in problems[3]
    assert "not an image file by its extension" in problems[4]
    assert "is a symbolic link loop" in problems[5]  # not "does not exist"
    assert "symbolic link to 'gone.png', which does not exist" in problems[6]
    with pytest.raises(ImageInputError, match="is a symbolic link loop"):
        sources.from_pattern(str(inp / "loop.png"))
    with pytest.raises(ImageInputError, match="no image files match"):
        sources.from_pattern(str(tmp_path / "nothing" / "*.png"))


def test_output_names_keep_the_first_runs_root_when_the_input_list_grows(tmp_path, capsys, sd15_folder):
    """The naming root is fixed in run.json by the first run: a list that grows past its old common folder renames
    nothing, and an input outside that root is refused by name."""
    data = tmp_path / "data"
    for i, rel in enumerate(["in/a/img01.png", "in/b/img02.png", "in/c/img03.png", "other/x.png"]):
        _png(data / rel, i)
    listing = data / "list.txt"
    listing.write_text("in/a/img01.png\nin/b/img02.png\n")
    out = tmp_path / "out"
    args = ["--model", sd15_folder, "--layers", LAYERS, "--size", SIZE, "--input-list", listing, "--output", out]
    assert _run(capsys, *args)[0] == 0
    before = _files(out)
    assert sorted(before) == ["a/img01.safetensors", "b/img02.safetensors"]
    listing.write_text("in/a/img01.png\nin/b/img02.png\nin/c/img03.png\nother/x.png\n")  # x moves the common root
    rc, _, stderr = _run(capsys, *args, "--resume")
    assert rc == 2 and f"{str(data / 'other' / 'x.png')!r} lies outside {str(data / 'in')!r}" in stderr
    assert _files(out) == before
    run_file = out / "df_index" / "run.json"
    run = json.loads(run_file.read_text())
    assert run["naming_root"] == str(data / "in")
    del run["naming_root"]  # a run file of an older version: the root comes from its index records
    run_file.write_text(json.dumps(run))
    rc, _, stderr = _run(capsys, *args, "--resume")
    assert rc == 2 and "lies outside" in stderr
    listing.write_text("in/a/img01.png\nin/b/img02.png\nin/c/img03.png\n")
    rc, stdout, _ = _run(capsys, *args, "--resume")
    assert rc == 0 and "1 written" in stdout and "2 skipped" in stdout
    assert sorted(_files(out)) == ["a/img01.safetensors", "b/img02.safetensors", "c/img03.safetensors"]
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, data / "in" / "c", out, "--resume"))  # a subfolder: same names
    assert rc == 0 and "0 written" in stdout and "1 skipped" in stdout


def test_input_list_with_prompt_file_and_failures(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    a, b = _png(inp / "x" / "a.png", 1), _png(inp / "y" / "b.png", 2)
    listing = tmp_path / "list.txt"
    listing.write_text("in/y/b.png\nin/x/a.png\nin/x/gone.png\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of b\na photo of a\nnothing\n")
    out = tmp_path / "out"
    args = ["--model", sd15_folder, "--layers", LAYERS, "--size", SIZE, "--input-list", listing, "--output", out,
            "--prompt-file", prompts]
    rc, stdout, _ = _run(capsys, *args)
    assert rc == 1  # one listed image is missing; the others are written
    assert sorted(_files(out)) == ["x/a.safetensors", "y/b.safetensors"]
    assert _same(out / "y/b.safetensors", extract(model, [b], "a photo of b", LAYERS, t=50, seed=0, size=HW))
    assert _same(out / "x/a.safetensors", extract(model, [a], "a photo of a", LAYERS, t=50, seed=0, size=HW))
    failed = [r for r in _records(out) if r["status"] == "failed"]
    assert [r["image"] for r in failed] == ["x/gone.png"] and "does not exist" in failed[0]["error"]
    assert "failed: x/gone.png" in stdout


def test_names_that_collide_fail_and_the_rest_go_on(tmp_path, capsys, sd15_folder):
    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    _png(inp / "a.jpg", 2)
    _png(inp / "b.png", 3)
    _png(inp / "df_index.png", 4)  # per-sample npy would write into the index folder
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--format", "npy"))
    assert rc == 1
    failed = {r["image"]: r["error"] for r in _records(out) if r["status"] == "failed"}
    assert sorted(failed) == ["a.jpg", "a.png", "df_index.png"]
    assert "a.jpg and a.png would both be written as a/" in failed["a.jpg"]
    assert "a.png and a.jpg would both be written as a/" in failed["a.png"]
    assert "inside the run's index folder" in failed["df_index.png"]
    assert sorted(_done(out)) == ["b.png"]


def test_planned_files_are_what_save_features_writes(tmp_path, model):
    feats = _want(model, _png(tmp_path / "a.png", 1))
    ids = list(feats.tensors)
    for fmt, layout in [("safetensors", "per-sample"), ("safetensors", "per-layer"), ("safetensors", "aggregate"),
                        ("npy", "per-sample"), ("npy", "per-layer"), ("npy", "aggregate")]:
        out = tmp_path / f"{fmt}-{layout}"
        written = features_io.save_features(feats, out / "city", ["a_t050"], fmt, layout)
        assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(
            naming.entry_files("city/a_t050", ids, fmt, layout)), (fmt, layout)


# ---- bad input -----------------------------------------------------------------------------------------------
def _png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (zlib + struct), so the test does not rely on Pillow to make it."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_image_modes_are_converted_not_refused(tmp_path):
    g = np.random.default_rng(0)
    grey16 = g.integers(0, 65536, (8, 12), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    want = np.round(grey16 / 65535 * 255).astype(np.uint8)
    got = np.asarray(open_image(tmp_path / "g16.png"))
    assert got.shape == (8, 12, 3) and (got == want[..., None]).all()  # Pillow's own convert clips at 255
    rgb16 = g.integers(0, 65536, (8, 12, 3), dtype=np.uint16)
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    assert (np.abs(np.asarray(open_image(tmp_path / "rgb16.png")).astype(int) - (rgb16 >> 8)) <= 1).all()
    grey = g.integers(0, 256, (8, 12), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    assert (np.asarray(open_image(tmp_path / "g8.png")) == grey[..., None]).all()
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert open_image(tmp_path / "cmyk.jpg").getpixel((1, 1)) == (255, 0, 255)  # no magenta ink -> magenta... RGB
    rgba = np.dstack([g.integers(0, 256, (8, 12, 3), dtype=np.uint8), np.zeros((8, 12), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert (np.asarray(open_image(tmp_path / "rgba.png")) == rgba[..., :3]).all()
    pal = Image.new("P", (4, 4))
    pal.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns about palette transparency unless it goes through RGBA
        assert open_image(tmp_path / "pal.png").getpixel((0, 0)) == (10, 20, 30)


def test_bad_files_are_refused_with_their_reason(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match="is empty"):
        open_image(tmp_path / "zero.png")
    _png(tmp_path / "full.jpg", 1, size=(256, 256))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match="truncated"):
        open_image(tmp_path / "cut.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageInputError, match="is a folder"):
        open_image(tmp_path / "dir.png")
    Image.new("L", (20000, 1)).save(tmp_path / "huge.png")
    with pytest.raises(ImageInputError, match="20000x1 pixels"):
        open_image(tmp_path / "huge.png")


def test_a_run_goes_past_bad_files_and_reports_them(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    good = [_png(inp / "a.png", 1), _png(inp / "c.png", 3)]
    (inp / "b.png").write_bytes(b"")
    (inp / "d.png").write_text("not an image")
    full = _png(tmp_path / "e.jpg", 5, size=(256, 256)).read_bytes()
    (inp / "e.jpg").write_bytes(full[: len(full) // 2])
    Image.new("L", (20000, 1)).save(inp / "f.png")
    Image.fromarray(np.random.default_rng(7).integers(0, 65536, (64, 96), dtype=np.uint16)).save(inp / "g16.png")
    Image.new("CMYK", (96, 64), (10, 200, 30, 0)).save(inp / "h.jpg")
    out = tmp_path / "out"
    rc, stdout, stderr = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 1
    assert sorted(_done(out)) == ["a.png", "c.png", "g16.png", "h.jpg"]  # converted modes are done, not failed
    for path in good + [inp / "g16.png", inp / "h.jpg"]:
        assert _same(out / path.with_suffix(".safetensors").name, _want(model, path))
    failed = {r["image"]: r["error"] for r in _records(out) if r["status"] == "failed"}
    assert sorted(failed) == ["b.png", "d.png", "e.jpg", "f.png"]
    assert "empty" in failed["b.png"] and "not a readable image" in failed["d.png"]
    assert "truncated" in failed["e.jpg"] and "20000x1" in failed["f.png"]
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert summary["status"] == 1 and summary["written"] == 4 and summary["failed"] == 4
    assert sorted(f["image"] for f in summary["failures"]) == sorted(failed)
    assert "4 written" in stdout and "4 failed" in stdout and "failed: e.jpg" in stdout
    assert "img/s" in stderr and "failed=4" in stderr  # the progress bar: rate, ETA, failures so far
    assert _no_temporaries(out)


def test_stop_on_error_stops_at_the_first_failure(tmp_path, capsys, sd15_folder):
    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    (inp / "b.png").write_bytes(b"")
    _png(inp / "c.png", 3)
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--stop-on-error"))
    assert rc == 1 and "stopped: --stop-on-error: b.png failed" in stdout
    assert sorted(_done(out)) == ["a.png"] and not (out / "c.safetensors").exists()
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume"))  # without it: every good image
    assert rc == 1 and sorted(_done(out)) == ["a.png", "c.png"]


def test_an_image_deleted_during_the_run_fails_alone(tmp_path, capsys, sd15_folder, monkeypatch):
    from diffusion_feature.engine.dataset import runner

    inp = tmp_path / "in"
    _pngs(inp, "abc")
    real = runner._decode

    def decode_after_deleting(batch, job):
        if batch[0][0].relative == "b.png":
            (inp / "b.png").unlink()
        return real(batch, job)

    monkeypatch.setattr(runner, "_decode", decode_after_deleting)
    out = tmp_path / "out"
    rc, _, _ = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 1 and sorted(_done(out)) == ["a.png", "c.png"]
    assert [r["error"] for r in _records(out) if r["status"] == "failed"] == [f"image {str(inp / 'b.png')!r} does "
                                                                              "not exist"]


# ---- resume ------------------------------------------------------------------------------------------------
def test_resume_skips_complete_images_and_does_the_rest(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    _pngs(inp, "abc")
    out = tmp_path / "out"
    assert _run(capsys, *_base(sd15_folder, inp, out))[0] == 0
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 2 and "never overwritten" in stderr and "--resume" in stderr
    before = {p: (out / p).stat().st_mtime_ns for p in _files(out)}
    _png(inp / "d.png", 3)  # added since
    (out / "b.safetensors").unlink()  # lost since
    with open(out / "c.safetensors", "r+b") as fh:  # cut short since
        fh.truncate(100)
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume"))
    assert rc == 0 and "3 written" in stdout and "1 skipped" in stdout
    assert (out / "a.safetensors").stat().st_mtime_ns == before["a.safetensors"]  # untouched
    for name in "abcd":
        assert _same(out / f"{name}.safetensors", _want(model, inp / f"{name}.png"))
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume"))
    assert rc == 0 and "0 written" in stdout and "4 skipped" in stdout


def test_resume_refuses_other_settings_naming_them(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    out = tmp_path / "out"
    assert _run(capsys, *_base(sd15_folder, inp, out))[0] == 0
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, out, "--resume", "--seed", 1, "--t", "25,50"))
    assert rc == 2 and "seed: 0 there, 1 now" in stderr and "t: [50] there, [25, 50] now" in stderr
    rc, _, stderr = _run(capsys, "--model", sd15_folder, "--layers", "mid-repeat0-res-out", "--size", SIZE,
                         "--input", inp, "--output", out, "--resume")
    assert rc == 2 and "layers: " in stderr and "there" in stderr
    rc, _, stderr = _run(capsys, "--model", sd15_folder, "--layers", "mid-repeat0-res-out", "--size", SIZE,
                         "--input", inp, "--output", out, "--resume", "--seed", 2, "--dtype", "bfloat16")
    assert rc == 2 and "seed: 0 there, 2 now" in stderr and 'dtype: "float32" there, "bfloat16" now' in stderr
    assert 'layers: ["mid-repeat0-res-out", "up-level1-repeat0-res-out"] there, ["mid-repeat0-res-out"] now' in stderr
    with pytest.raises(ResumeError, match='layers: .* now; seed: 0 there, 2 now; t: .50. there, .25, 50. now'):
        extract_dataset(model, sources.collect(str(inp)), out, "mid-repeat0-res-out", [25, 50],
                        seed=2, size=HW, resume=True, progress=False, log=None)  # the library names them all too
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, out, "--resume", "--prompt", "a cat"))
    assert rc == 2 and "made with prompt ''" in stderr and "'a cat'" in stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.safetensors").write_bytes(b"someone else's")
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, other, "--resume"))
    assert rc == 2 and "not made by `extract`" in stderr
    (out / "df_index" / "run.json").write_text('{"tool": "something else"}')
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, out, "--resume"))
    assert rc == 2 and "was not written by" in stderr
    fresh = tmp_path / "fresh"
    assert _run(capsys, *_base(sd15_folder, inp, fresh, "--resume"))[0] == 0  # nothing to resume: a new run


def _damage_in_place(path: Path, keep_mtime: bool) -> None:
    """Flip the last byte (tensor data) without changing the size; keep_mtime: as bit rot would, unseen by stat."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resume_checks_content_hashes_and_verify_rereads_all(tmp_path, capsys, sd15_folder):
    inp = tmp_path / "in"
    _pngs(inp, "abc")
    reference = tmp_path / "reference"
    assert _run(capsys, *_base(sd15_folder, inp, reference))[0] == 0
    out = tmp_path / "out"
    assert _run(capsys, *_base(sd15_folder, inp, out))[0] == 0
    _damage_in_place(out / "a.safetensors", keep_mtime=True)  # unseen by size and mtime: only --verify finds it
    _damage_in_place(out / "b.safetensors", keep_mtime=False)  # rewritten at the same size: re-hashed on resume
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume"))
    assert rc == 0 and "1 written" in stdout and "2 skipped" in stdout
    assert "1 done again" in stdout and "done again: b.png: b.safetensors does not match its recorded sha256" in stdout
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert [d["image"] for d in summary["damaged"]] == ["b.png"]
    assert _content(out)["b.safetensors"] == _content(reference)["b.safetensors"]
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume", "--verify"))
    assert rc == 0 and "1 written" in stdout and "done again: a.png: a.safetensors does not match" in stdout
    assert _content(out) == _content(reference)
    _consistent(out)
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, out, "--verify"))
    assert rc == 2 and "--verify" in stderr and "--resume" in stderr
    part = index.part_path(out, 0)  # an index of an older version: no hashes, sizes only, said once
    old = [json.loads(line) for line in part.read_text().splitlines()]
    for record in old:
        for output in record.get("outputs", []):
            del output["sha256"], output["mtime_ns"]
    part.write_text("".join(json.dumps(r) + "\n" for r in old))
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume", "--verify"))
    assert rc == 0 and "0 written" in stdout and "3 skipped" in stdout
    assert stdout.count("3 complete images checked by size only") == 1


def test_the_index_reader_ignores_a_cut_record_and_the_writer_drops_it(tmp_path):
    out = tmp_path / "out"
    writer = index.IndexWriter(out, 0)
    writer.append({"image": "a.png", "status": "failed", "error": "x"})
    writer.close()
    part = index.part_path(out, 0)
    with open(part, "ab") as fh:
        fh.write(b'{"image": "b.png", "sta')  # a kill in the middle of a record
    assert [r["image"] for r in index.read_records(out)] == ["a.png"]
    writer = index.IndexWriter(out, 0)
    writer.append({"image": "c.png", "status": "failed", "error": "y"})
    writer.close()
    assert [r["image"] for r in index.read_records(out)] == ["a.png", "c.png"]
    assert part.read_bytes().count(b"\n") == 2 and b"b.png" not in part.read_bytes()


# ---- several timesteps, latent cache -------------------------------------------------------------------------
def test_several_timesteps_in_one_pass(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    a = _png(inp / "city" / "a.png", 1)
    out = tmp_path / "out"
    rc, _, _ = _run(capsys, *_base(sd15_folder, inp, out, "--t", "100,25,50", "--seed", 4))
    assert rc == 0
    assert sorted(_files(out)) == ["city/a_t025.safetensors", "city/a_t050.safetensors", "city/a_t100.safetensors"]
    for t in (25, 50, 100):
        path = out / f"city/a_t{t:03d}.safetensors"
        assert _same(path, _want(model, a, t=t, seed=4)) and load_features(path).meta["t"] == t
    assert _done(out)["city/a.png"]["t"] == [100, 25, 50]
    for bad, message in [("50,50", "appears twice"), ("1000", "outside 0..999"), ("5,x", "not an integer")]:
        rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o2", "--t", bad))
        assert rc == 2 and message in stderr and "Traceback" not in stderr
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o3", "--t", "25,50", "--denoise-from", 40))
    assert rc == 2 and "must be above every --t" in stderr


def test_latent_cache_skips_the_vae_with_identical_features(tmp_path, capsys, sd15_folder, model):
    inp = tmp_path / "in"
    a, b = _png(inp / "a.png", 1), _png(inp / "b.png", 2)
    cache = tmp_path / "cache"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o1", "--latent-cache", cache))
    assert rc == 0 and "latent cache: 0 hits, 2 misses" in stdout
    rc, stdout, _ = _run(capsys, "--model", sd15_folder, "--layers", "up-level2-repeat1-res-out", "--size", SIZE,
                         "--input", inp, "--output", tmp_path / "o2", "--latent-cache", cache, "--t", 200, "--seed", 9)
    assert rc == 0 and "latent cache: 2 hits, 0 misses" in stdout
    for path in (a, b):
        want = extract(model, [path], "", "up-level2-repeat1-res-out", t=200, seed=9, size=HW)
        assert _same(tmp_path / "o2" / path.with_suffix(".safetensors").name, want)


# ---- ControlNet hints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory, model):
    from conftest import tiny_controlnet

    folder = tmp_path_factory.mktemp("cn")
    tiny_controlnet(model.denoiser, seed=3).save_pretrained(folder)
    return folder


def test_controlnet_with_canny_hints_and_denoise_from(tmp_path, capsys, sd15_folder, model, controlnet_folder):
    from diffusion_feature.engine.controlnet import load_controlnet
    from diffusion_feature.engine.hints import attach_hints, canny_hint
    from diffusion_feature.engine.images import prepare
    from diffusion_feature.engine.prompts import encode_prompt

    inp = tmp_path / "in"
    a = _png(inp / "a.png", 1, size=(120, 80))  # resized to 96x64 before canny: hint and image align
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--controlnet", f"{controlnet_folder}:0.7", "--hint",
                                        "canny", "--canny-low", 50, "--canny-high", 150, "--denoise-from", 70,
                                        "--prompt", "a house"))
    assert rc == 0, stdout
    cn = load_controlnet(controlnet_folder)
    image = open_image(a)
    hint = canny_hint(prepare(image, 512, "keep-aspect", (96, 64)), 50, 150)
    cond = attach_hints(encode_prompt(model, "a house"), [(cn, 0.7)], [hint], HW)
    want = extract(model, [image], cond, LAYERS, t=50, seed=0, size=HW, denoise_from=70)
    assert _same(out / "a.safetensors", want)
    plain = _want(model, a, denoise_from=70)
    assert not torch.equal(load_features(out / "a.safetensors").tensors["mid-repeat0-res-out"],
                           plain.tensors["mid-repeat0-res-out"])  # the ControlNet acted
    assert load_features(out / "a.safetensors").meta["controlnets"][0]["strength"] == 0.7


def test_controlnet_with_a_hint_folder(tmp_path, capsys, sd15_folder, model, controlnet_folder):
    from diffusion_feature.engine.controlnet import load_controlnet
    from diffusion_feature.engine.hints import attach_hints
    from diffusion_feature.engine.prompts import encode_prompt

    inp, hints = tmp_path / "in", tmp_path / "hints"
    a = _png(inp / "city" / "a.png", 1)
    _png(inp / "city" / "b.png", 2)
    hint_a = _png(hints / "city" / "a.jpg", 10)  # the same relative name, any image extension
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--controlnet", controlnet_folder, "--hint", hints))
    assert rc == 1  # b has no hint
    failed = {r["image"]: r["error"] for r in _records(out) if r["status"] == "failed"}
    assert list(failed) == ["city/b.png"] and "no hint for image 'city/b.png'" in failed["city/b.png"]
    cn = load_controlnet(controlnet_folder)
    cond = attach_hints(encode_prompt(model, ""), [(cn, 1.0)], [open_image(hint_a)], HW)
    assert _same(out / "city/a.safetensors", extract(model, [a], cond, LAYERS, t=50, seed=0, size=HW))


def test_controlnet_refusals(tmp_path, capsys, sd15_folder, controlnet_folder):
    from conftest import tiny_controlnet, tiny_sdxl_unet

    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o1", "--controlnet", controlnet_folder))
    assert rc == 2 and "--controlnet needs --hint" in stderr
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o2", "--hint", "canny"))
    assert rc == 2 and "no --controlnet" in stderr
    xl = tmp_path / "xl-cn"
    tiny_controlnet(tiny_sdxl_unet()).save_pretrained(xl)
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o3", "--controlnet", xl, "--hint", "canny"))
    assert rc == 2 and "ControlNet" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o3").exists()  # refused before anything was written
    rc, _, stderr = _run(capsys, *_base(sd15_folder, inp, tmp_path / "o4", "--controlnet", controlnet_folder,
                                        "--hint", tmp_path / "no-such-folder"))
    assert rc == 2 and "hint folder" in stderr


# ---- a full disk, Ctrl-C, SIGKILL ----------------------------------------------------------------------------
def _fail_writes_from(monkeypatch, n: int, exc) -> None:
    """The n-th feature file write and every later one raise `exc` from inside the write (after some bytes)."""
    real = features_io.write_atomic
    count = [0]

    def write_atomic(final, write):
        count[0] += 1
        if count[0] < n:
            return real(final, write)

        def failing(tmp):
            Path(tmp).write_bytes(b"partial")
            raise exc

        return real(final, failing)

    monkeypatch.setattr(features_io, "write_atomic", write_atomic)


def _consistent(out: Path) -> None:
    """Every done record's files exist with their sizes; no file exists that no done record names."""
    done = _done(out)
    named = {o["path"] for r in done.values() for o in r["outputs"]}
    assert set(_files(out)) == named
    if done:
        assert index.completion(out, next(iter(done.values()))["settings"]).done == done
    assert _no_temporaries(out)


def test_a_full_disk_stops_the_run_cleanly_and_resume_completes_it(tmp_path, capsys, sd15_folder, monkeypatch):
    inp = tmp_path / "in"
    _pngs(inp, "abcd")
    reference = tmp_path / "reference"
    assert _run(capsys, *_base(sd15_folder, inp, reference, "--t", "25,50"))[0] == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_writes_from(m, 4, OSError(errno.ENOSPC, "No space left on device"))  # b's second file
        rc, stdout, stderr = _run(capsys, *_base(sd15_folder, inp, out, "--t", "25,50"))
    assert rc == 3 and "No space left on device" in stdout and "Traceback" not in stderr
    assert sorted(_done(out)) == ["a.png"]
    _consistent(out)
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--t", "25,50", "--resume"))
    assert rc == 0 and "3 written" in stdout and "1 skipped" in stdout
    assert _content(out) == _content(reference)
    _consistent(out)


def _serialize_with(monkeypatch, fault) -> list:
    """safetensors' writer (what save_file calls) wrapped: fault(n, filename) runs before the n-th real write."""
    import safetensors.torch

    real, calls = safetensors.torch.serialize_file, []

    def serialize_file(tensors, filename, metadata=None):
        calls.append(filename)
        fault(len(calls), Path(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
    return calls


def test_a_full_disk_in_safetensors_stops_with_3_and_a_summary(tmp_path, capsys, sd15_folder, monkeypatch):
    from safetensors import SafetensorError

    inp = tmp_path / "in"
    _pngs(inp, "abc")
    reference = tmp_path / "reference"
    assert _run(capsys, *_base(sd15_folder, inp, reference))[0] == 0

    def full(n, filename):  # the error safetensors raises on a full disk
        if n >= 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at "
                                  f'path "{filename.parent}/.tmpQ1w2E3"')

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _serialize_with(m, full)
        rc, stdout, stderr = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 3 and "Traceback" not in stderr
    assert f"an output could not be written (OSError: [Errno 28] No space left on device: '{out / 'b.safetensors'}')" \
        in stdout
    summary = json.loads((out / "df_index" / "summary.json").read_text())
    assert summary["status"] == 3 and "No space left on device" in summary["stopped"] and summary["written"] == 1
    _consistent(out)
    assert _run(capsys, *_base(sd15_folder, inp, out, "--resume"))[0] == 0
    assert _content(out) == _content(reference)


def test_temporaries_of_any_writer_stay_in_ours_and_resume_removes_every_kind(tmp_path, capsys, sd15_folder,
                                                                              monkeypatch):
    inp = tmp_path / "in"
    _pngs(inp / "city", "ab")
    out = tmp_path / "out"

    def killed_writer_leaves_its_temporary(n, filename):  # what safetensors leaves beside its target when killed
        (filename.parent / f".tmpKi11e{n}").write_bytes(b"\0" * 64)

    with monkeypatch.context() as m:
        calls = _serialize_with(m, killed_writer_leaves_its_temporary)
        assert _run(capsys, *_base(sd15_folder, inp, out))[0] == 0
    assert len(calls) == 2 and all(Path(c).parent.name.startswith(".df-") for c in calls)  # writes go through ours
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp", ".df-"))]
    before = _content(out)
    # what killed runs of this and of older versions leave: our folder (with a whole file), our older temporary
    # files, and safetensors' own temporaries, empty or whole
    whole = (out / "city" / "a.safetensors").read_bytes()
    (out / "city" / ".df-k1ll3d.tmp").mkdir()
    (out / "city" / ".df-k1ll3d.tmp" / "file").write_bytes(whole)
    (out / "city" / ".df-0ld3r.tmp").write_bytes(whole)
    (out / "city" / ".tmpAb12Cd").write_bytes(b"")
    (out / ".tmpZz98Yx").write_bytes(whole)
    (out / "city" / ".tmp-notes.txt").write_text("a user's file, not a writer's temporary")
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--resume"))
    assert rc == 0 and "2 skipped" in stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if naming.INDEX_DIR not in p.parts) == \
        ["city", "city/.tmp-notes.txt", "city/a.safetensors", "city/b.safetensors"]
    (out / "city" / ".tmp-notes.txt").unlink()
    assert _content(out) == before


def test_outputs_reach_the_disk_before_their_record(tmp_path, capsys, sd15_folder, monkeypatch):
    """Each output file is fsync'd, then its folder (the link), and only then is its record appended."""
    inp = tmp_path / "in"
    _pngs(inp / "sub", "ab")
    events = []
    real_fsync, real_append = os.fsync, index.IndexWriter.append

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def append(self, record):
        events.append(("record", record["image"]))
        return real_append(self, record)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        m.setattr(index.IndexWriter, "append", append)
        assert _run(capsys, *_base(sd15_folder, inp, out, "--t", "25,50", "--format", "npy"))[0] == 0
    for image, record in _done(out).items():
        at = events.index(("record", image))
        synced = [ino for kind, ino in events[:at] if kind == "fsync"]
        for output in record["outputs"]:
            path = out / output["path"]
            assert path.stat().st_ino in synced, output["path"]
            after_file = synced[synced.index(path.stat().st_ino) + 1:]
            assert path.parent.stat().st_ino in after_file, output["path"]  # its folder, after the link


def test_files_honour_the_umask(tmp_path, capsys, sd15_folder):
    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    previous = os.umask(0o002)
    try:
        for fmt in ("safetensors", "npy"):
            out = tmp_path / fmt
            assert _run(capsys, *_base(sd15_folder, inp, out, "--format", fmt))[0] == 0
            modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
            assert set(modes.values()) == {0o664}, modes  # as ComfyUI's own saves: 0666 & ~umask
            assert {"df_index/run.json", "df_index/part-00000.jsonl", "df_index/summary.json"} <= set(modes)
    finally:
        os.umask(previous)


def test_ctrl_c_stops_cleanly_with_130_and_resume_completes(tmp_path, capsys, sd15_folder, monkeypatch):
    from diffusion_feature.engine import extraction

    inp = tmp_path / "in"
    _pngs(inp, "abc")
    reference = tmp_path / "reference"
    assert _run(capsys, *_base(sd15_folder, inp, reference))[0] == 0
    real = extraction.extract_timesteps
    calls = [0]

    def interrupted_on_the_second_image(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(extraction, "extract_timesteps", interrupted_on_the_second_image)
        rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 130 and "interrupted" in stdout
    assert sorted(_done(out)) == ["a.png"]
    _consistent(out)
    assert _run(capsys, *_base(sd15_folder, inp, out, "--resume"))[0] == 0
    assert _content(out) == _content(reference)


def _cli_process(*args, fault: str | None = None, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if fault:
        env.update(DF_TEST_FAULT=fault, PYTHONPATH=os.pathsep.join([str(SHIM), env.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "diffusion_feature", "extract", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("fault, code", [("kill:5", -9), ("sigint:5", 130)])
def test_killed_or_interrupted_in_the_middle_of_a_write_then_resumed(tmp_path, capsys, sd15_folder, fault, code):
    """SIGKILL inside the fifth feature write (b's second file: its temporary file written, not yet linked), or
    Ctrl-C there:
    --resume afterwards loses nothing, duplicates nothing and leaves no partial or temporary file."""
    inp = tmp_path / "in"
    _pngs(inp, "abcd")
    reference = tmp_path / "reference"
    assert _run(capsys, *_base(sd15_folder, inp, reference, "--format", "npy"))[0] == 0
    out = tmp_path / "out"
    run = _cli_process(*_base(sd15_folder, inp, out, "--format", "npy"), fault=fault)
    assert run.returncode == code, run.stderr
    if code == -9:  # a's entry (three npy files) is recorded, b is half written, its write interrupted
        assert list(out.rglob(".df-*.tmp")) and (out / "b").is_dir()
        assert sorted(_done(out)) == ["a.png"]
    else:  # Ctrl-C: the write in progress and its record finish, nothing after it starts
        assert "interrupted" in run.stdout and _no_temporaries(out)
        _consistent(out)
    before = len(_done(out))
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out, "--format", "npy", "--resume"))
    assert rc == 0 and f"{4 - before} written" in stdout and f"{before} skipped" in stdout
    assert _content(out) == _content(reference)
    assert _no_temporaries(out)
    done_records = [r for r in _records(out) if r["status"] == "done"]
    assert sorted(r["image"] for r in done_records) == ["a.png", "b.png", "c.png", "d.png"]  # once each


# ---- batches ---------------------------------------------------------------------------------------------------
def test_batches_group_by_size_and_rows_keep_their_image(tmp_path, capsys, sd15_folder, model):
    from diffusion_feature.engine.dataset import runner

    inp = tmp_path / "in"
    wide = [_png(inp / "a.png", 1, size=(192, 64)), _png(inp / "c.png", 3, size=(192, 64))]
    square = _png(inp / "b.png", 2, size=(64, 64))
    (inp / "d.png").write_bytes(b"")
    job = runner._Job(out=tmp_path, layer_ids=[], timesteps=[50], seed=0, fmt="safetensors", layout="per-sample",
                      resize="keep-aspect", size=None, target_side=None, native=128, batch_size=2, extract_kw={},
                      controlnets=[], hint=None, latent_cache=None, stop_on_error=False, digest="", rank=0)
    items = [(s, "") for s in sources.from_pattern(str(inp))]
    failed = []
    batches = runner._plan_batches(items, job, lambda item, reason: failed.append((item[0].relative, reason)))
    assert [[s.relative for s, _ in b] for b in batches] == [["a.png", "c.png"], ["b.png"]]
    assert [f[0] for f in failed] == ["d.png"] and "empty" in failed[0][1]
    out = tmp_path / "out"  # with --size every image has one size: batches in run order, a+b then c+d
    rc, _, _ = _run(capsys, "--model", sd15_folder, "--layers", LAYERS, "--size", SIZE, "--input", inp,
                    "--output", out, "--batch-size", 2, "--prompt", "x")
    assert rc == 1
    pair = extract(model, [wide[0], square], "x", LAYERS, t=50, seed=0, size=HW)  # the run's first batch: a, b
    for row, path in enumerate([wide[0], square]):
        saved = load_features(out / path.with_suffix(".safetensors").name)
        assert all(torch.equal(saved.tensors[k], pair.tensors[k][row:row + 1]) for k in pair.tensors)
        assert (saved.meta["input_width"], saved.meta["input_height"]) == Image.open(path).size
    assert sorted(_done(out)) == ["a.png", "b.png", "c.png"]


def test_an_image_too_big_for_memory_fails_alone(tmp_path, capsys, sd15_folder, monkeypatch):
    from diffusion_feature.engine import extraction

    inp = tmp_path / "in"
    _png(inp / "a.png", 1)
    _png(inp / "b.png", 2)
    monkeypatch.setattr(extraction, "_free_bytes", lambda device: 1024)  # as if the device were full
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_base(sd15_folder, inp, out))
    assert rc == 1 and "2 failed" in stdout
    errors = [r["error"] for r in _records(out) if r["status"] == "failed"]
    assert len(errors) == 2 and all("memory" in e or "MiB" in e or "GiB" in e for e in errors), errors
    assert _files(out) == {}


def test_output_names_are_safe_and_fit_the_filesystem():
    assert naming.entry_stem("city/a b.png") == "city/a_b"
    assert naming.entry_stem(".../x/..png") == "_/x/_"  # never a '..' or an empty part
    assert naming.entry_names("city/a.png", [5, 50]) == ["city/a_t005", "city/a_t050"]
    long = "x" * 245 + ".png"  # fits alone, not with _t025.safetensors
    planned, problems = naming.plan(["a.png", long], [25, 50], ["mid-repeat0-res-out"], "safetensors",
                                    "per-sample")
    assert list(planned) == ["a.png"] and "longer than the 255 bytes" in problems[long]

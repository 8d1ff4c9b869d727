"""ControlNet hints: canny edges from kornia on OpenCV's threshold scale, hint folders mirroring the input's names,
one hint per image of a batch for every ControlNet."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_controlnet, tiny_feature_model
from diffusion_feature.engine.control import ControlError, attach_control, control_residuals
from diffusion_feature.engine.controlnet import ControlNet, ControlNetError
from diffusion_feature.engine.extraction import extract
from diffusion_feature.engine.hints import HintFolder, attach_hints, canny_hint
from diffusion_feature.engine.images import ImageInputError
from diffusion_feature.engine.prompts import encode_prompt
from diffusion_feature.engine.safe_paths import UnsafePathError

SAMPLES = Path(__file__).resolve().parents[1] / "engine" / "data" / "samples"


@pytest.fixture(scope="module")
def photo():
    with Image.open(SAMPLES / "house.jpg") as im:
        return im.convert("RGB").resize((128, 96), Image.Resampling.BICUBIC)


# ---- canny -------------------------------------------------------------------------------------------------------
def test_canny_hint_is_kornias_canny_at_thresholds_over_255(photo):
    from kornia.filters import canny

    hint = canny_hint(photo, 100, 200)
    assert hint.mode == "RGB" and hint.size == photo.size
    got = np.asarray(hint)
    assert set(np.unique(got)) <= {0, 255} and (got == got[..., :1]).all()  # white on black, grey
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    _, edges = canny(x, 100 / 255, 200 / 255)  # kornia called directly on the same pixels
    want = edges[0, 0].numpy() > 0.5
    assert np.array_equal(got[..., 0] == 255, want)
    assert 0.005 < want.mean() < 0.5  # a photo has edges, but not everywhere
    fewer = np.asarray(canny_hint(photo, 150, 250))[..., 0] == 255
    assert fewer.sum() < want.sum() and not (fewer & ~want).any()  # higher thresholds keep a subset
    # any mode is made RGB first
    assert np.array_equal(np.asarray(canny_hint(photo.convert("RGBA"), 100, 200)), got)


def _step_peak(step: float) -> float:
    """The gradient magnitude at a vertical step of `step` grey levels (0..255 scale), computed by hand: kornia's
    5-tap Gaussian (sigma 1) across the step, then the unnormalised Sobel ([-1, 0, 1] across, [1, 2, 1] along)."""
    taps = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    taps /= taps.sum()
    row = np.r_[np.zeros(16), np.full(16, step)]
    blurred = np.convolve(np.pad(row, 2, mode="reflect"), taps, mode="valid")
    return float(np.max(4 * (blurred[2:] - blurred[:-2])))


def test_thresholds_are_on_opencvs_0_to_255_gradient_scale():
    step = 50
    peak = _step_peak(step)  # about 2.59 x the step: 129 on the 0..255 scale
    assert math.isclose(peak, 4 * step * (1 + math.exp(-0.5)) / (1 + 2 * math.exp(-0.5) + 2 * math.exp(-2)))
    pixels = np.full((24, 32, 3), 80, np.uint8)
    pixels[:, 16:] += step
    image = Image.fromarray(pixels)
    below = np.asarray(canny_hint(image, 20, peak - 3))[..., 0] == 255
    assert below[:, 15].all() and below.sum() == 24  # one edge column, every row, one pixel wide
    assert not np.asarray(canny_hint(image, 20, peak + 3)).any()  # the peak is under the high threshold: none
    assert not np.asarray(canny_hint(Image.new("RGB", (32, 24), (90, 90, 90)))).any()  # flat: no edges


def test_hysteresis_keeps_weak_edges_linked_to_strong_ones():
    """A step that is strong in its top half and weak below is kept whole; a weak step alone is dropped."""
    from kornia.filters import canny

    pixels = np.full((24, 48, 3), 60, np.uint8)
    pixels[:12, 16:] += 50
    pixels[12:, 16:] += 30
    pixels[:, 36:] += 30  # a second, weak step on its own
    image = Image.fromarray(pixels)
    weak, strong = _step_peak(30), _step_peak(50)
    got = np.asarray(canny_hint(image, weak - 3, strong - 3))[..., 0] == 255
    assert got[:, 14:18].any(axis=1).all()  # every row of the first step
    assert not got[:, 30:].any()  # the weak step is linked to nothing strong
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    _, edges = canny(x, (weak - 3) / 255, (strong - 3) / 255)  # kornia's own hysteresis loop
    assert np.array_equal(got, edges[0, 0].numpy() > 0.5)
    only_strong = np.asarray(canny_hint(image, strong - 3, strong - 3))[..., 0] == 255
    assert only_strong[:12].any() and not only_strong[14:].any()  # without linking, the weak half is gone


def test_bad_canny_thresholds(photo):
    for low, high, message in ((0, 200, "0 < low <= high"), (200, 100, "0 < low <= high"),
                               (float("nan"), 200, "low threshold must be a number"),
                               (100, "200", "high threshold must be a number")):
        with pytest.raises(ValueError, match=message):
            canny_hint(photo, low, high)


# ---- hint folders ------------------------------------------------------------------------------------------------
def _png(path: Path, value: int, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def test_hint_folder_mirrors_relative_names(tmp_path):
    root = tmp_path / "hints"
    _png(root / "city" / "a.png", 10)
    _png(root / "other" / "a.png", 20)  # same file name in another folder: never confused
    _png(root / "b.jpg", 30)  # another extension than the image's
    _png(root / "d.PNG", 40)  # any case
    Image.new("L", (8, 8), 50).save(root / "grey.png")
    folder = HintFolder(root)
    assert np.asarray(folder.hint_for("city/a.png"))[0, 0, 0] == 10
    assert np.asarray(folder.hint_for(Path("other") / "a.png"))[0, 0, 0] == 20
    assert np.asarray(folder.hint_for("b.png"))[0, 0, 0] != 0 and folder.path_for("b.png").name == "b.jpg"
    assert folder.path_for("d.png").name == "d.PNG"
    grey = folder.hint_for("grey.png")
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [50, 50, 50]
    _png(root / "late.png", 60)  # written after the folder was listed: still found
    assert folder.path_for("late.webp").name == "late.png"


def test_hint_folder_errors(tmp_path):
    root = tmp_path / "hints"
    _png(root / "city" / "a.png", 10)
    _png(root / "two.png", 1)
    _png(root / "two.jpg", 2)
    (root / "notes.txt").write_text("not an image")
    folder = HintFolder(root)
    with pytest.raises(ImageInputError, match=r"no hint for image 'city/missing.png' in hint folder '.*hints': "
                                              r"expected city/missing\.<png\|jpg"):
        folder.hint_for("city/missing.png")
    with pytest.raises(ImageInputError, match="no hint for image 'notes.png'"):
        folder.hint_for("notes.png")  # a non-image file of that stem is no hint
    with pytest.raises(ImageInputError, match=r"several hints for image 'two.webp' .*\(two.jpg, two.png\)"):
        folder.hint_for("two.webp")
    for outside in ("../escape.png", "city/../../escape.png", str(tmp_path / "abs.png")):
        _png(tmp_path / "escape.png", 3)
        with pytest.raises(UnsafePathError):
            folder.hint_for(outside)
    os.symlink(tmp_path / "escape.png", root / "link.png")  # a link out of the folder
    with pytest.raises(UnsafePathError, match="outside"):
        folder.hint_for("link.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageInputError, match="broken.png' is not a readable image"):
        folder.hint_for("broken.png")
    with pytest.raises(ImageInputError, match="hint folder '.*nowhere' does not exist or is not a folder"):
        HintFolder(tmp_path / "nowhere")


# ---- attaching hints ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15():
    return tiny_feature_model("sd15")


@pytest.fixture(scope="module")
def nets(sd15):
    return [ControlNet(tiny_controlnet(sd15.denoiser, seed=s), None, "test", f"net{s}") for s in (1, 2)]


def _residuals(cond, sample):
    kwargs = cond.for_batch(sample.shape[0], sample.device, sample.dtype)
    return control_residuals(cond.controls, sample, torch.tensor([50, 50]), kwargs)


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["mid_block_additional_residual"], b["mid_block_additional_residual"])
            and all(torch.equal(x, y) for x, y in zip(a["down_block_additional_residuals"],
                                                       b["down_block_additional_residuals"])))


def test_attach_hints_equals_attach_control_with_the_stacked_hints(sd15, nets):
    rng = np.random.default_rng(3)
    hints = [Image.fromarray((rng.random((48, 80, 3)) > 0.7).astype(np.uint8) * 255) for _ in range(2)]
    size = (64, 96)  # (height, width): the hints are resized to the batch's pixel size
    cond = encode_prompt(sd15, "a house")
    ours = attach_hints(cond, [(nets[0], 0.7), (nets[1], 1.3)], hints, size)
    # by hand: each hint resized by PIL, stacked in batch order, each ControlNet attached with its strength
    stacked = torch.from_numpy(np.stack([np.asarray(h.resize((96, 64), Image.Resampling.BICUBIC), np.float32)
                                         for h in hints]) / 255.0)
    theirs = attach_control(attach_control(cond, nets[0], stacked, 0.7), nets[1], stacked, 1.3)
    assert [(h.controlnet.name, h.strength) for h in ours.controls] == [("net1", 0.7), ("net2", 1.3)]
    assert cond.controls == ()  # the input conditioning is unchanged
    sample = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    assert _same(_residuals(ours, sample), _residuals(theirs, sample))
    # one hint per image: the order matters, and a single ControlNet is not the pair
    assert not _same(_residuals(attach_hints(cond, [(nets[0], 0.7), (nets[1], 1.3)], hints[::-1], size), sample),
                     _residuals(ours, sample))
    assert not _same(_residuals(attach_hints(cond, [(nets[0], 0.7)], hints, size), sample),
                     _residuals(ours, sample))
    images = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(4))
    layers = ["up-level2-repeat0-res-out"]
    a = extract(sd15, images, ours, layers, t=50, seed=1, size="64x96")
    b = extract(sd15, images, theirs, layers, t=50, seed=1, size="64x96")
    assert torch.equal(a.tensors[layers[0]], b.tensors[layers[0]])
    assert a.meta["controlnets"] == [{"name": "net1", "strength": 0.7}, {"name": "net2", "strength": 1.3}]


def test_center_crop_hints_are_cropped_like_the_images(sd15, nets):
    wide = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    cond = encode_prompt(sd15, "a house")
    cropped = attach_hints(cond, [(nets[0], 1.0)], [wide], (64, 64), resize="center-crop")
    by_hand = attach_control(cond, nets[0], wide.crop((32, 0, 96, 64)))
    assert torch.equal(cropped.controls[0].image, by_hand.controls[0].image)


def test_attach_hints_errors(sd15, nets):
    cond = encode_prompt(sd15, "a house")
    hint = Image.new("RGB", (64, 64))
    with pytest.raises(ControlError, match="no hint images given"):
        attach_hints(cond, [(nets[0], 1.0)], [], (64, 64))
    with pytest.raises(ControlError, match="no ControlNets given"):
        attach_hints(cond, [], [hint], (64, 64))
    with pytest.raises(ControlError, match="strength must be a finite number >= 0, got -1"):
        attach_hints(cond, [(nets[0], -1)], [hint], (64, 64))
    with pytest.raises(ControlError, match="2 control images for a batch of 3"):
        extract(sd15, torch.rand(3, 64, 64, 3), attach_hints(cond, [(nets[0], 1.0)], [hint, hint], (64, 64)),
                ["mid-repeat1-res-out"], size="64x64")
    # a ControlNet of another family: refused by extract before the VAE runs
    sdxl = tiny_feature_model("sdxl")
    wrong = attach_hints(encode_prompt(sdxl, "a cat"), [(nets[0], 1.0)], [hint], (64, 64))
    calls = []
    handle = sdxl.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ControlNetError):
            extract(sdxl, torch.rand(1, 64, 64, 3), wrong, ["mid-repeat1-res-out"], size="64x64")
    finally:
        handle.remove()
    assert calls == []

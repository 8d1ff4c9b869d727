"""`diffusion-feature correspondence` on tiny dataset folders built here: SPair-71k's layout scored end to end (PCK
equals a hand computation), PF-PASCAL's and PF-WILLOW's pair lists read, resume and the one-line refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from diffusion_feature.engine.commands import SAMPLES
from diffusion_feature.engine.pair_datasets import PairDatasetError, detect_layout, read_pairs

LAYERS = "up-level3-repeat0-res-out,up-level2-repeat0-res-out"  # 8x12 and 4x6 cells at 96x64 pixels
W, H = 96, 64
# Every pair matches an image with an identical copy of itself and its source keypoints are cell centres, so each
# keypoint's match is itself; the target keypoints are annotated off by these known offsets (pixels).
SOURCE = [[3.5, 3.5], [19.5, 11.5], [43.5, 27.5], [67.5, 51.5]]
OFFSETS = {"cat": [[0, 0], [3, 0], [0, -5], [12, 0]], "house": [[0, 0], [0, 0], [-8, 6], [4, 3]]}
BOX = [10, 5, 50, 45]  # 40 x 40: PCK@0.1 per box is 4 px; per image 0.1 x max(96, 64) = 9.6 px


def _expected(alpha=0.1) -> dict:
    """PCK by hand from the offsets: {category: (per image, per box)} in percent."""
    out = {}
    for category, offsets in OFFSETS.items():
        d = [float(np.hypot(*o)) for o in offsets]
        out[category] = (100 * sum(x <= alpha * max(W, H) for x in d) / 4, 100 * sum(x <= alpha * 40 for x in d) / 4)
    return out


@pytest.fixture()
def spair(tmp_path):
    root = tmp_path / "SPair-71k"
    for category, sample in (("cat", "cat.jpg"), ("house", "house.jpg")):
        folder = root / "JPEGImages" / category
        folder.mkdir(parents=True)
        Image.open(SAMPLES / sample).convert("RGB").resize((W, H)).save(folder / "a.png")
        shutil.copy(folder / "a.png", folder / "b.png")
        target = [[x + dx, y + dy] for (x, y), (dx, dy) in zip(SOURCE, OFFSETS[category])]
        annotation = {"category": category, "src_imname": "a.png", "trg_imname": "b.png", "src_kps": SOURCE,
                      "trg_kps": target, "trg_bndbox": BOX, "src_imsize": [W, H, 3], "trg_imsize": [W, H, 3]}
        pairs = root / "PairAnnotation" / "test"
        pairs.mkdir(parents=True, exist_ok=True)
        (pairs / f"0-a-b:{category}.json").write_text(json.dumps(annotation))
    (root / "PairAnnotation" / "trn").mkdir()
    return root


def _run(tiny_random_weights, root, out, *extra):
    return run_cli("correspondence", "--model", "random:sd15", "--dataset", root, "--output", out, "--layers", LAYERS,
                   "--t", 50, "--size", f"{W}x{H}", "--alpha", "0.1,0.05", *extra)


def test_spair_pck_equals_a_hand_computation_and_resumes(tmp_path, spair, tiny_random_weights):
    out = tmp_path / "bench"
    run = _run(tiny_random_weights, spair, out)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    expected = _expected()
    for category, (per_image, per_box) in expected.items():
        row = results["categories"][category]
        assert (row["pairs"], row["points"]) == (1, 4)
        assert row["pck@0.1_image"] == pytest.approx(per_image) and row["pck@0.1_box"] == pytest.approx(per_box)
    assert results["mean"]["pck@0.1_image"] == pytest.approx(np.mean([v[0] for v in expected.values()]))
    assert results["mean"]["pck@0.1_box"] == pytest.approx(np.mean([v[1] for v in expected.values()]))
    assert results["all"]["pck@0.05_box"] == pytest.approx(100 * 3 / 8)  # offsets <= 2 px: the three zeros
    assert (results["layers"], results["t"], results["ensemble"], results["family"], results["layout"],
            results["split"]) == (LAYERS.split(","), 50, 1, "sd15", "spair", "test")
    assert results["size"] == [H, W]
    assert "mean (categories)" in run.stdout and "pck@0.1_image" in run.stdout
    lines = (out / "df_index" / "part-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["predicted"] for line in lines] == [SOURCE, SOURCE]  # each match is its own cell
    # resumable: a second attempt scores nothing again and reports the same table; other settings are refused
    records = (out / "df_index" / "part-00000.jsonl").read_text()
    again = _run(tiny_random_weights, spair, out, "--resume")
    assert again.returncode == 0, again.stderr
    assert (out / "df_index" / "part-00000.jsonl").read_text() == records
    assert json.loads((out / "results.json").read_text())["categories"] == results["categories"]
    first = _run(tiny_random_weights, spair, out, "--resume", "--limit", "1")  # a limit only chooses pairs
    assert first.returncode == 0 and list(json.loads((out / "results.json").read_text())["categories"]) == ["cat"]
    other = _run(tiny_random_weights, spair, out, "--resume", "--window", "1")
    assert other.returncode == 2 and "window: 0 there, 1 now" in other.stderr
    fresh = _run(tiny_random_weights, spair, out)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr


def test_pf_pascal_and_pf_willow_pair_lists(tmp_path):
    pascal = tmp_path / "PF-PASCAL"
    (pascal / "PF-dataset-PASCAL" / "JPEGImages").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg"):
        Image.new("RGB", (30, 20)).save(pascal / "PF-dataset-PASCAL" / "JPEGImages" / name)
    (pascal / "test_pairs_pf_pascal.csv").write_text(
        "source_image,target_image,class,XA,YA,XB,YB\n"
        "PF-dataset-PASCAL/JPEGImages/x.jpg,PF-dataset-PASCAL/JPEGImages/y.jpg,8,1;2;3,4;5;6,7;8;9,10;11;15\n")
    [pair] = read_pairs(pascal)
    assert detect_layout(pascal) == "pf-pascal" and pair.category == "cat"
    assert pair.source_points == ((1, 4), (2, 5), (3, 6)) and pair.target_points == ((7, 10), (8, 11), (9, 15))
    assert pair.target_box == (7, 10, 9, 15)  # no annotated box: the target keypoints' extent

    willow = tmp_path / "PF-WILLOW"
    (willow / "car(G)").mkdir(parents=True)
    for name in ("p.png", "q.png"):
        Image.new("RGB", (30, 20)).save(willow / "car(G)" / name)
    header = ",".join(["imageA", "imageB"] + [f"{c}{i}" for c in ("XA", "YA", "XB", "YB") for i in (1, 2)])
    (willow / "test_pairs.csv").write_text(header + "\nPF-dataset/car(G)/p.png,PF-dataset/car(G)/q.png,"
                                                    "1,2,3,4,5,6,7,8\n")
    [pair] = read_pairs(willow)
    assert detect_layout(willow) == "pf-willow" and pair.category == "car(G)"
    assert pair.source_points == ((1, 3), (2, 4)) and pair.target_points == ((5, 7), (6, 8))
    assert pair.source == willow / "car(G)" / "p.png"


def test_refusals_are_one_line(tmp_path, spair, tiny_random_weights):
    (tmp_path / "other").mkdir()
    with pytest.raises(PairDatasetError, match="not a dataset folder of a known layout: expected SPair-71k"):
        detect_layout(tmp_path / "other")
    (spair / "JPEGImages" / "cat" / "b.png").unlink()
    with pytest.raises(PairDatasetError, match=r"the pair list names 1 missing image\(s\), e\.g\. .*b\.png"):
        read_pairs(spair)
    run = _run(tiny_random_weights, tmp_path / "other", tmp_path / "out")
    assert run.returncode == 2 and run.stderr.count("error:") == 1 and "known layout" in run.stderr
    run = _run(tiny_random_weights, spair, tmp_path / "out", "--alpha", "2")
    assert run.returncode == 2 and "--alpha '2'" in run.stderr

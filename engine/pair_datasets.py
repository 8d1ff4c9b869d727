"""Keypoint pair datasets of the semantic-correspondence benchmarks, read from the folder the user points at
(nothing is downloaded): SPair-71k, PF-PASCAL and PF-WILLOW in the layouts they are distributed in.

- spair: `PairAnnotation/{trn,val,test}/*.json` (one JSON per pair: src_imname, trg_imname, category, src_kps,
  trg_kps, trg_bndbox [x1, y1, x2, y2]) and images in `JPEGImages/<category>/<imname>`.
- pf-pascal: `<split>_pairs_pf_pascal.csv` (columns source_image, target_image, class, XA, YA, XB, YB; coordinates
  ';'-separated), image paths relative to the dataset folder. The class is VOC's index 1..20.
- pf-willow: `test_pairs.csv` or `test_pairs_pf.csv` (columns imageA, imageB, then XA1.., YA1.., XB1.., YB1..; the
  first 20 numbers are A's x then y, the last 20 B's); image paths relative to the dataset folder or to its parent
  (`PF-dataset/car(G)/x.png` in a folder holding `car(G)/`). The category is the image's folder.

A pair's PCK thresholds: per image, alpha x max(width, height) of the target image; per box, alpha x the larger
side of the target's bounding box (SPair's annotated box; the PF datasets have none, so the box around the target's
keypoints, as their usual evaluation code does).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..layer_catalog.errors import DiffusionFeatureError, echo

LAYOUTS = ("spair", "pf-pascal", "pf-willow")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
_SPLITS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}


class PairDatasetError(DiffusionFeatureError, ValueError):
    """A dataset folder or pair list that cannot be read; the message names it and what was expected."""


@dataclass(frozen=True)
class KeypointPair:
    """One annotated pair: keypoints (x, y) in pixels of each image, in corresponding order."""

    name: str
    category: str
    source: Path
    target: Path
    source_points: tuple[tuple[float, float], ...]
    target_points: tuple[tuple[float, float], ...]
    target_box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the target (PCK per box)


def detect_layout(root) -> str:
    """Which benchmark layout a folder holds; PairDatasetError naming the three expected layouts otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise PairDatasetError(f"dataset folder {echo(str(root))} does not exist or is not a folder")
    if (root / "PairAnnotation").is_dir() and (root / "JPEGImages").is_dir():
        return "spair"
    if list(root.glob("*_pairs_pf_pascal.csv")):
        return "pf-pascal"
    if (root / "test_pairs.csv").is_file() or (root / "test_pairs_pf.csv").is_file():
        return "pf-willow"
    raise PairDatasetError(f"{echo(str(root))} is not a dataset folder of a known layout: expected SPair-71k "
                           "(PairAnnotation/ and JPEGImages/), PF-PASCAL (test_pairs_pf_pascal.csv) or PF-WILLOW "
                           "(test_pairs.csv)")


def read_pairs(root, layout: str | None = None, split: str = "test") -> list[KeypointPair]:
    """Every pair of a split, in a stable order; each image checked to exist (PairDatasetError naming the
    missing ones)."""
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise PairDatasetError(f"unknown dataset layout {echo(layout)}: use one of {', '.join(LAYOUTS)}")
    if split not in _SPLITS:
        raise PairDatasetError(f"unknown split {echo(split)}: use test, val or train")
    pairs = {"spair": _spair, "pf-pascal": _pf_pascal, "pf-willow": _pf_willow}[layout](root, split)
    if not pairs:
        raise PairDatasetError(f"{echo(str(root))} holds no {split} pairs in the {layout} layout")
    missing = sorted({str(p) for pair in pairs for p in (pair.source, pair.target) if not p.is_file()})
    if missing:
        raise PairDatasetError(f"the pair list names {len(missing)} missing image(s), e.g. {echo(missing[0])}: is "
                               f"{echo(str(root))} the complete dataset folder?")
    return pairs


def _points(xs, ys, where: str) -> tuple[tuple[float, float], ...]:
    try:
        points = tuple((float(x), float(y)) for x, y in zip(xs, ys, strict=True))
    except (TypeError, ValueError):
        raise PairDatasetError(f"{where}: keypoints must be numbers, as many x as y") from None
    if not points:
        raise PairDatasetError(f"{where}: a pair without keypoints")
    return points


def _box_of(points) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _spair(root: Path, split: str) -> list[KeypointPair]:
    folder = root / "PairAnnotation" / _SPLITS[split]
    if not folder.is_dir():
        raise PairDatasetError(f"{echo(str(folder))} is missing: an SPair-71k folder holds PairAnnotation/{{trn,val,"
                               "test}/")
    pairs = []
    for path in sorted(folder.glob("*.json")):
        try:
            a = json.loads(path.read_text(encoding="utf-8"))
            category = str(a["category"])
            src = [tuple(p) for p in a["src_kps"]]
            trg = [tuple(p) for p in a["trg_kps"]]
            box = tuple(float(v) for v in a["trg_bndbox"])
            source = root / "JPEGImages" / category / str(a["src_imname"])
            target = root / "JPEGImages" / category / str(a["trg_imname"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PairDatasetError(f"{path.name}: not an SPair-71k pair annotation ({type(e).__name__}: {e})"
                                   ) from None
        if len(box) != 4 or len(src) != len(trg):
            raise PairDatasetError(f"{path.name}: trg_bndbox must be [x1, y1, x2, y2] and src_kps as long as trg_kps")
        pairs.append(KeypointPair(path.stem, category, source, target,
                                  _points([p[0] for p in src], [p[1] for p in src], path.name),
                                  _points([p[0] for p in trg], [p[1] for p in trg], path.name), box))
    return pairs


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pf_pascal(root: Path, split: str) -> list[KeypointPair]:
    path = root / f"{split if split != 'train' else 'trn'}_pairs_pf_pascal.csv"
    if not path.is_file():
        raise PairDatasetError(f"{echo(str(path))} is missing: a PF-PASCAL folder holds <split>_pairs_pf_pascal.csv")
    pairs = []
    for i, row in enumerate(_rows(path)):
        where = f"{path.name} row {i + 2}"
        try:
            cls = int(float(row["class"]))
            category = VOC_CLASSES[cls - 1] if 1 <= cls <= len(VOC_CLASSES) else str(cls)
            src = _points(row["XA"].split(";"), row["YA"].split(";"), where)
            trg = _points(row["XB"].split(";"), row["YB"].split(";"), where)
            source, target = root / row["source_image"], root / row["target_image"]
        except (KeyError, ValueError, AttributeError) as e:
            raise PairDatasetError(f"{where}: expected columns source_image, target_image, class, XA, YA, XB, YB "
                                   f"({type(e).__name__}: {e})") from None
        pairs.append(KeypointPair(f"{i:05d}-{Path(source).stem}-{Path(target).stem}", category, source, target, src,
                                  trg, _box_of(trg)))
    return pairs


def _pf_willow(root: Path, split: str) -> list[KeypointPair]:
    if split != "test":
        raise PairDatasetError("PF-WILLOW has only a test split")
    path = root / "test_pairs.csv" if (root / "test_pairs.csv").is_file() else root / "test_pairs_pf.csv"
    pairs = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader, None)  # the header: columns are read by position (names differ between the lists)
        for i, row in enumerate(reader):
            where = f"{path.name} row {i + 2}"
            if len(row) < 6 or (len(row) - 2) % 4:
                raise PairDatasetError(f"{where}: expected imageA, imageB, then the x and y of A's keypoints and of "
                                       "B's (4 x N numbers)")
            n = (len(row) - 2) // 4
            values = row[2:]
            src = _points(values[:n], values[n:2 * n], where)
            trg = _points(values[2 * n:3 * n], values[3 * n:], where)
            source, target = _willow_image(root, row[0]), _willow_image(root, row[1])
            pairs.append(KeypointPair(f"{i:05d}-{source.stem}-{target.stem}", source.parent.name, source, target,
                                      src, trg, _box_of(trg)))
    return pairs


def _willow_image(root: Path, name: str) -> Path:
    """An image path of the pair list: below the dataset folder, or below it minus the list's first folder
    (the lists name `PF-dataset/car(G)/x.png`)."""
    direct = root / name
    if direct.is_file():
        return direct
    parts = Path(name).parts
    return root.joinpath(*parts[1:]) if len(parts) > 1 else direct

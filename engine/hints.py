"""ControlNet hints for dataset runs: canny edges computed per image, or hint images from a folder that mirrors the
input's relative names, attached one per image of a batch.

Canny comes from kornia (kornia.filters.canny, what ComfyUI's Canny node calls): the image is made grey, blurred
(Gaussian, 5x5, sigma 1), its unnormalised Sobel gradient taken (L2 magnitude), thinned and thresholded; the
hysteresis that links weak edges to strong ones is the same rule done by scipy's connected-component labelling
(kornia's own loop takes seconds per image on a CPU).
Our thresholds are on OpenCV's scale, the gradient of 0..255 pixel values (the content-shift recipe's cv2.Canny
100/200); kornia reads images in 0..1, so its thresholds are ours / 255 (100/200 -> 0.39/0.78, about ComfyUI's
Canny defaults 0.4/0.8). cv2.Canny itself does not blur and uses the L1 magnitude, so its edges differ in detail.
Canny runs on the image as the model sees it (after the resize policy), so hint and image align.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..layer_catalog.errors import echo
from .control import ControlError, attach_control
from .images import IMAGE_SUFFIXES, ImageInputError, open_image, prepare
from .safe_paths import check_inside, inside

CANNY_SCALE = 255.0  # our thresholds (OpenCV's, on 0..255 pixels) / kornia's (on 0..1 pixels)


def canny_thresholds(low, high) -> tuple[float, float]:
    """Thresholds on OpenCV's 0..255 scale checked, as kornia's (divided by 255)."""
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"canny {name} threshold must be a number on OpenCV's 0..255 gradient scale, "
                             f"got {echo(value)}")
    if not 0 < low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 < low <= high (OpenCV's 0..255 gradient scale; the "
                         f"content-shift recipe uses 100/200), got low={low}, high={high}")
    return low / CANNY_SCALE, high / CANNY_SCALE


def canny_hint(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Edges of an image (made RGB), white on black, the same size; thresholds on OpenCV's 0..255 scale."""
    from kornia.filters import canny

    lo, hi = canny_thresholds(low, high)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
    _, edges = canny(x, lo, hi, hysteresis=False)  # after non-maximum suppression: 0, 0.5 (weak) or 1 (strong)
    mask = keep_linked(edges[0, 0].numpy()).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(mask[..., None], 3, axis=-1), "RGB")


def keep_linked(edges: np.ndarray) -> np.ndarray:
    """Hysteresis: the edge pixels (> 0) 8-connected to a strong one (== 1), as kornia's hysteresis keeps them.

    kornia links by growing the strong pixels one neighbour per pass until nothing changes: a 512-pixel image with a
    long edge takes hundreds of passes (15 s on a CPU core). Labelling the connected regions once (scipy.ndimage)
    gives the same pixels in milliseconds."""
    from scipy import ndimage

    labels, count = ndimage.label(edges > 0, structure=np.ones((3, 3), dtype=bool))
    linked = np.zeros(count + 1, dtype=bool)
    linked[np.unique(labels[edges == 1])] = True
    linked[0] = False  # the background
    return linked[labels]


class HintFolder:
    """Hint images mirroring the input's relative names: the hint of `city/a.png` is `<root>/city/a.<any image
    extension>` (the same file name first; another extension when it is the only image of that stem)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ImageInputError(f"hint folder {echo(str(self.root))} does not exist or is not a folder: give the "
                                  "folder of hint images named like the input images")
        self._listings: dict[Path, dict[str, list[Path]]] = {}

    def __repr__(self) -> str:
        return f"HintFolder({str(self.root)!r})"

    def path_for(self, relative: str | os.PathLike) -> Path:
        """The hint file of an input image's relative path; ImageInputError when there is none (or several)."""
        name = Path(relative).as_posix() if isinstance(relative, os.PathLike) else str(relative)
        where = f"hint folder {echo(str(self.root))}"
        target = inside(self.root, name, f"the hint name {echo(name)}", where)
        candidates = [target] if target.is_file() else self._same_stem(target, refresh=False)
        if not candidates:  # listed before this hint was written: look again once
            candidates = self._same_stem(target, refresh=True)
        if not candidates:
            stem = Path(name).with_suffix("").as_posix()
            raise ImageInputError(f"no hint for image {echo(name)} in {where}: expected {stem}.<"
                                  f"{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}> there")
        if len(candidates) > 1:
            found = ", ".join(p.name for p in candidates)
            raise ImageInputError(f"several hints for image {echo(name)} in {where} ({found}): keep one")
        return check_inside(self.root, candidates[0], f"the hint of {echo(name)}")

    def _same_stem(self, target: Path, refresh: bool) -> list[Path]:
        """Image files of target's folder with target's stem (any image extension, any case). Each folder is
        listed once, not once per image: a flat folder of 20,000 hints would otherwise be read 20,000 times."""
        folder = target.parent
        if refresh or folder not in self._listings:
            by_stem: dict[str, list[Path]] = {}
            if folder.is_dir():
                for entry in os.scandir(folder):
                    path = Path(entry.path)
                    if path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                        by_stem.setdefault(path.stem, []).append(path)
            self._listings[folder] = by_stem
        return sorted(self._listings[folder].get(target.stem, []))

    def hint_for(self, relative: str | os.PathLike) -> Image.Image:
        """The hint image of an input image's relative path, opened as RGB."""
        return open_image(self.path_for(relative))


def attach_hints(cond, controlnets: Sequence[tuple[object, float]], hints: Sequence[Image.Image],
                 size: tuple[int, int], *, resize: str = "stretch"):
    """`cond` with every ControlNet attached, each with its strength, guided by one hint per image of the batch.

    hints are resized to size=(height, width), the batch's pixel size, when they differ: stretched, or for
    resize="center-crop" cropped to their centred square first (as the images were). ControlNets of another family
    are refused by extract's check before anything runs.
    """
    if not hints:
        raise ControlError("no hint images given: give one hint per image of the batch")
    if not controlnets:
        raise ControlError("no ControlNets given for the hints")
    if resize not in ("stretch", "center-crop"):
        raise ValueError(f"unknown hint resize {echo(resize)}; valid: stretch, center-crop")
    height, width = size
    pixels = []
    for hint in hints:  # cropped and sized as the images were (images.prepare; native unused with a size)
        hint = prepare(hint.convert("RGB"), 0, resize, (width, height))
        pixels.append(np.asarray(hint, dtype=np.float32) / 255.0)
    stacked = torch.from_numpy(np.stack(pixels))  # ComfyUI's IMAGE layout [B, H, W, 3]: no shape ambiguity
    for entry in controlnets:
        controlnet, strength = entry
        cond = attach_control(cond, controlnet, stacked, strength)
    return cond

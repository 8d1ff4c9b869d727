"""Images in: reading files, validating them, and the resize policy.

The default keeps the aspect ratio: the image is resized so its area is the model's native area, each side rounded
to a multiple of 64 (so every UNet level has a whole grid). `stretch` forces the native square; `center-crop`
crops the largest centred square first. Tensors go out as (B, 3, H, W) floats in [-1, 1], what the VAE expects.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..layer_catalog.errors import DiffusionFeatureError, echo

RESIZE_MODES = ("keep-aspect", "stretch", "center-crop")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_SIDE = 16384  # a 16k side already needs tens of GiB of attention maps; anything larger is a mistake
MULTIPLE = 64


class ImageInputError(DiffusionFeatureError, ValueError):
    """An input that is not a usable image; the message names it."""


def open_image(path) -> Image.Image:
    """Read one image file as 8-bit RGB, with errors that name the file and say what is wrong with it.

    The size is checked from the header before the pixels are decoded, so a huge image is refused without
    allocating it. Grayscale, 16-bit, CMYK, RGBA and palette images are converted (see to_rgb), never refused."""
    p = Path(path)
    name = repr(str(p))
    if p.is_dir():
        raise ImageInputError(f"{name} is a folder, not an image file")
    if not p.exists():
        raise ImageInputError(f"image {name} does not exist")
    if not p.is_file():
        raise ImageInputError(f"{name} is not a regular file (a device, socket or pipe cannot be an image)")
    try:
        if p.stat().st_size == 0:
            raise ImageInputError(f"{name} is empty (0 bytes): not an image")
        with Image.open(p) as im:
            check_size(im.width, im.height, name)
            im.load()
            image = to_rgb(im)
    except FileNotFoundError:  # deleted between the checks above and the read
        raise ImageInputError(f"image {name} does not exist (it was removed while being read)") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name} is not a readable image (not a format Pillow can decode; valid: "
                              f"{', '.join(IMAGE_SUFFIXES)})") from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{name} is too large to decode safely ({e})") from None
    except OSError as e:
        what = "is truncated or corrupt" if "truncated" in str(e) or "broken" in str(e) else "is not a readable image"
        raise ImageInputError(f"{name} {what} ({e.__class__.__name__}: {e})") from None
    return image


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Pillow's own convert('RGB') clips 16-bit grayscale (I;16 / I) at 255, which turns a 16-bit scan white; those are
    scaled by 255/65535 instead. Float images (F) are read as 0..1 when they fit it, else as 0..255. Palette images
    with transparency go through RGBA (Pillow warns otherwise). Alpha is dropped, as ComfyUI's LoadImage and
    diffusers' load_image do: the model sees the stored colours."""
    if im.mode in _SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.float64).clip(0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        grey = np.nan_to_num(values * scale).clip(0, 255)
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if im.mode in ("P", "PA") and (im.mode == "PA" or "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def check_size(width: int, height: int, name: str = "image") -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} is {width}x{height} pixels: an image needs at least 1 pixel a side")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ImageInputError(f"{name} is {width}x{height} pixels: sides above {MAX_SIDE} are not supported; "
                              "downscale it first")


def target_size(width: int, height: int, native: int, mode: str = "keep-aspect") -> tuple[int, int]:
    """(width, height) the model sees for an image of width x height, under `mode`, for a native side `native`."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {echo(mode)}; valid modes: {', '.join(RESIZE_MODES)}")
    check_size(width, height)
    if mode != "keep-aspect":
        return native, native
    scale = math.sqrt(native * native / (width * height))
    round_to = lambda v: max(MULTIPLE, int(round(v * scale / MULTIPLE)) * MULTIPLE)  # noqa: E731
    return round_to(width), round_to(height)


def prepare(image: Image.Image, native: int, mode: str = "keep-aspect", size: tuple[int, int] | None = None
            ) -> Image.Image:
    """Resize (and crop, for center-crop) one image; `size` (width, height) overrides the policy."""
    if mode == "center-crop":
        side = min(image.width, image.height)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    w, h = size if size is not None else target_size(image.width, image.height, native, mode)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), Image.Resampling.BICUBIC)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ImageInputError(f"images of one batch must share a size after resizing, got {sorted(sizes)}")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def prepare_comfy(images: torch.Tensor, native: int, mode: str = "keep-aspect",
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] (floats in 0..1) -> (B, 3, H', W') float32 in [-1, 1], cropped and sized as
    `prepare` does. An IMAGE of 8-bit values (LoadImage's value / 255) is the file it came from: prepared exactly
    as that file, so both give the same features and LatentCache entries. Any other IMAGE stays in floating point,
    never rounded to 8 bits (a resize is bicubic with antialiasing, like Pillow's)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"expected an IMAGE tensor [B, H, W, C], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ImageInputError("no images given")
    x = images[..., :3].float().clamp(0, 1).expand(-1, -1, -1, 3)
    eight = x * 255.0
    if torch.equal(eight, eight.round()):
        return to_tensor([prepare(Image.fromarray(a), native, mode, size) for a in eight.to(torch.uint8).cpu().numpy()])
    x = x.permute(0, 3, 1, 2)
    height, width = x.shape[-2:]
    if mode == "center-crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[..., top:top + side, left:left + side]
        height = width = side
    w, h = size if size is not None else target_size(width, height, native, mode)
    if (w, h) != (width, height):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
    return (x * 2.0 - 1.0).contiguous()  # exact: (pixels + 1) / 2 gives the IMAGE back bit for bit

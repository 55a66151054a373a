"""One image file to the model's pixels: RGB uint8 [3, size, size], in bounded time and memory.

What PIL's ``Image.convert("RGB")`` alone gets wrong, done here as image libraries (torchvision's
``decode_image``, scikit-image) do:

- 16-bit and 32-bit greyscale (``I;16``, ``I``) and float (``F``) are scaled to 8 bits by their range
  (``convert`` clips them: a 16-bit PNG came out pure white);
- transparency (RGBA, LA, PA, a palette with a transparent index) is composited over white (``convert``
  drops alpha, showing whatever colour the transparent pixels hold, often black);
- the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways is
  seen upright;
- the centre square is resized straight to ``size`` (``Image.resize``'s ``box``): the cost is bounded by
  the source pixels and the output, whatever the aspect ratio (a 1 x 20000 JPEG resized by its shorter
  side used to become 224 x 4,480,000 pixels, 110 s and 4.4 GB);
- an aspect ratio over :data:`MAX_ASPECT_RATIO` (a strip, not a picture: its centre square is a sliver)
  raises :class:`UnusableImage`, more source pixels than PIL's decompression-bomb limit (after JPEG
  draft) ``DecompressionBombError``: the caller makes either a missing image with one warning naming
  the file.

Hand-written because no dependency of ours has it: torchvision is not a dependency, and PIL leaves these
conversions to the caller.
"""

from __future__ import annotations

import warnings
from logging import getLogger

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

# How pixels are made from a file (part of every image cache key: change it when load_image changes).
IMAGE_DECODING = "rgb16-alpha-white-exif-draft2x-centre-box-bicubic-aspect20"
# A JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) that still leaves at least this many times the
# target size (as PIL's Image.thumbnail), then resized: huge files decode cheaply, pixels barely change.
DRAFT_GAP = 2
# Longer side over shorter side beyond which a file is not used (a banner or a strip, not an item picture).
MAX_ASPECT_RATIO = 20
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class UnusableImage(ValueError):
    """An image file that decodes but is too large or too oddly shaped to use (the item has no image)."""


def load_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 [3, size, size]: the centre square of the (upright) image, resized (bicubic).

    A JPEG is decoded at a reduced scale first (PIL's ``draft``: 1/2 to 1/8, never below
    ``DRAFT_GAP * size``), so a huge photo costs little. Raises ``Image.DecompressionBombError`` when
    the image is over PIL's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS``) at the scale it
    would be decoded at, :class:`UnusableImage` when its aspect ratio is over :data:`MAX_ASPECT_RATIO`;
    both before any pixel is decoded."""
    with _open_image(path) as img:
        img.draft("RGB", (DRAFT_GAP * size, DRAFT_GAP * size))
        _check_pixel_count(img, path)
        _check_aspect_ratio(img)
        return resize_and_crop(ImageOps.exif_transpose(img), size)


def resize_and_crop(img: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 [3, size, size]: the centre square of ``img`` resized to ``size`` (bicubic)."""
    img = to_rgb(img)
    w, h = img.size
    # The geometry of "shorter side to size, then crop the centre" (the pixels of earlier versions),
    # computed without making the resized image: only the box that the crop keeps is resized.
    scale = size / min(w, h)
    full_w, full_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (full_w - size) // 2, (full_h - size) // 2
    sx, sy = full_w / w, full_h / h
    box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: deep greyscale scaled by its range, transparency over white."""
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_8bit(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of a deep mode to uint8. ``I;16*``: by its 16-bit range. ``I`` (32-bit) and ``F`` (float),
    whose range the file does not say: by the smallest of [0, 1] (``F`` only), [0, 255], [0, 65535] that
    holds every value, else [0, max]. Negatives and NaN are black."""
    if mode.startswith("I;16"):
        scale = 65535.0
    else:
        limits = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0)
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max(initial=0.0))
        scale = next((limit for limit in limits if top <= limit), top)
    return np.clip(np.rint(values.astype(np.float64) / scale * 255.0), 0, 255).astype(np.uint8)


def _open_image(path: str) -> Image.Image:
    """``Image.open``, but the decompression-bomb check is left to :func:`_check_pixel_count`, which sees
    the size after ``draft``: a JPEG too large for PIL at full size may be fine at 1/8 scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked after draft, with the path
        try:
            return Image.open(path)
        except Image.DecompressionBombError as err:
            try:
                return JpegImagePlugin.JpegImageFile(path)  # no size check on open; not a JPEG: SyntaxError
            except (SyntaxError, OSError):
                raise err from None


def _check_pixel_count(img: Image.Image, path: str) -> None:
    """PIL's decompression-bomb rule on the size that will be decoded: over twice
    ``Image.MAX_IMAGE_PIXELS`` raises, over it decodes with a warning naming the file."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return
    w, h = img.size
    if w * h > 2 * limit:
        raise Image.DecompressionBombError(
            f"{w}x{h} pixels to decode, over PIL's limit of {2 * limit} (2 x PIL.Image.MAX_IMAGE_PIXELS)"
        )
    if w * h > limit:
        getLogger().warning(
            f"Large image {path}: decoding {w}x{h} pixels (over PIL.Image.MAX_IMAGE_PIXELS = {limit}), "
            "slowly; a smaller file would do (the model sees it at a few hundred pixels)."
        )


def _check_aspect_ratio(img: Image.Image) -> None:
    w, h = img.size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise UnusableImage(
            f"{w}x{h} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1 (its centre square would be a sliver); "
            "crop it to the picture"
        )

"""Perceptual hashes (64-bit pHash) of image files, decoded as cheaply as the hash allows.

Each image gets two: of the whole picture and of its center (the middle 90% of width
and height). pHash tolerates re-encoding, resizing and brightness, but not a crop: a
copy with 5% cut from each side is beyond 10 bits of its original more often than not
(bench/dedupe.py: 0.56 found). That copy is the original's center, so it hashes like the
original's center hash; two images are compared by the nearest of their hashes.

Used by the crawl (to count only new images towards a class's target) and by the dedupe
stage, which reuses the crawl's hashes and hashes only what has none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from imgpipe.core.files import error_text
from imgpipe.data.images import flatten_transparency

log = logging.getLogger(__name__)

HASH_BITS = 64
_PROGRESS_EVERY = 1000
_HASH_SIZE = 32  # pHash works on a 32x32 grayscale thumbnail ...
_LOW_FREQ = 8  # ... and keeps its 8x8 lowest DCT frequencies: 64 bits.
# The center hash covers what is left when this share of the width (and height) is cut
# from each side. Symmetric crops up to ~8% per side come within reach (bench/dedupe.py).
CENTER_MARGIN = 0.05


def _dct_rows(size: int, rows: int) -> np.ndarray:
    """The first `rows` basis vectors of the (unnormalised) DCT-II of length `size`."""
    k = np.arange(rows)[:, None]
    n = np.arange(size)[None, :]
    return np.cos(np.pi * k * (2 * n + 1) / (2 * size))


_DCT = _dct_rows(_HASH_SIZE, _LOW_FREQ)


class ImageHashes(NamedTuple):
    """The perceptual hashes of one image."""

    whole: int  # pHash of the whole picture
    center: int  # pHash of its center: CENTER_MARGIN cut from each side


def _phash(gray: Image.Image, box: tuple[float, float, float, float] | None = None) -> int:
    small = gray.resize((_HASH_SIZE, _HASH_SIZE), Image.Resampling.LANCZOS, box=box)
    pixels = np.asarray(small, dtype=np.float64)
    # Rounding turns float noise (~1e-10) into exact zeros, so flat images hash the
    # same on every machine instead of by the sign of rounding errors.
    coeffs = np.round(_DCT @ pixels @ _DCT.T, 6).ravel()
    bits = coeffs > np.median(coeffs)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def decode_image(path: str | os.PathLike, color: bool = False) -> Image.Image:
    """The image at `path`, upright, decoded no larger than the hash needs: grayscale ('L'),
    or 'RGB' when `color`; 16-bit and float images as 'F' (their range kept).

    EXIF orientation is applied first: a photo and its rotated copy look the same to a
    person (and to the model, once preprocessing has applied it), so they must hash the
    same. Transparency is flattened onto white as preprocessing does
    (imgpipe.data.images.flatten_transparency): a black icon on a transparent background
    is a black icon, not a black square. JPEGs are decoded at reduced scale
    (``Image.draft``, straight to grayscale unless `color`), which is where most of the
    time goes; the hash only needs 32x32 pixels (and the near-duplicate pixel check 64x64,
    see imgpipe.data.nearmatch: draft keeps at least that).
    """
    with Image.open(path) as img:
        img.draft("RGB" if color else "L", (2 * _HASH_SIZE, 2 * _HASH_SIZE))
        upright = ImageOps.exif_transpose(img)
    if upright.mode[0] in "IF":  # 16-bit and float images keep their range: convert("L") would clip them.
        return upright.convert("F")
    return flatten_transparency(upright).convert("RGB" if color else "L")


def center_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The center region of a picture of `size` (width, height): CENTER_MARGIN cut from each side."""
    width, height = size
    return (width * CENTER_MARGIN, height * CENTER_MARGIN, width * (1 - CENTER_MARGIN),
            height * (1 - CENTER_MARGIN))


def perceptual_hashes(path: str | os.PathLike) -> ImageHashes:
    """64-bit perceptual hashes (pHash) of the image file at `path`, whole and center.

    The standard variant, the one the `imagehash` package's ``phash`` computes:
    grayscale, resized to 32x32 (Lanczos), 2-D DCT-II, the top-left 8x8 coefficients (DC
    included), bit set where the coefficient is above the median of those 64 (so half
    the bits are set and distances are even). Bit 63 is coefficient (0, 0), then row by
    row, the order of imagehash's hex string. The center hash is the same of the middle
    region (a box resample of the one decoded picture, no second decode). The picture is
    decoded by `decode_image`.
    """
    gray = decode_image(path)
    return ImageHashes(_phash(gray), _phash(gray, center_box(gray.size)))


def hash_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Hamming distance between two images: the nearest of any hash of one to any of the other."""
    return min((x ^ y).bit_count() for x in a for y in b)


def format_hash(value: int) -> str:
    """A 64-bit hash as 16 lowercase hex digits."""
    return f"{value:016x}"


def _hash_or_none(path: str) -> ImageHashes | None:
    try:
        return perceptual_hashes(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed EXIF raises struct.error, TypeError, ...
        # The crawl verified every file; one that still fails to decode is corrupt.
        log.warning("cannot decode %s (%s): marked corrupt", path, error_text(exc))
        return None


def hash_images(files: Sequence[str], threads: int = 1) -> list[ImageHashes | None]:
    """Perceptual hashes of each file, in order; None where the file cannot be decoded.

    A missing file raises FileNotFoundError: the manifest and the disk disagree, which
    is a pipeline error, not a property of the image. Pillow releases the GIL while it
    decodes and resizes, so `threads` > 1 uses several cores without processes.
    """
    files = [str(f) for f in files]
    hashes: list[ImageHashes | None] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, value in enumerate(pool.map(_hash_or_none, files), start=1):
            hashes.append(value)
            if done % _PROGRESS_EVERY == 0 or done == len(files):
                log.info("hashed %d/%d images", done, len(files))
    return hashes


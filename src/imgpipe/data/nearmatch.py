"""Near duplicates: a perceptual-hash match is a candidate, confirmed on the decoded pixels.

pHash keeps the sign of 64 low DCT frequencies against their median. On a low-texture
picture (a shape on a flat background, stripes, a scan) most of those coefficients are
near zero and their signs are noise, so distinct pictures land within a few bits of each
other, often through a whole-vs-center comparison (pictures 34-44 bits apart as wholes
matched that way; bench/dedupe.py: at distance 8 the hashes alone drop 651 of 1,140
distinct generated low-texture images). So a pair of images whose hashes are within
``dedupe.near_distance`` is only a candidate. It is a near duplicate when the pixels agree
too, for one of the hash comparisons that matched (a hypothesis):

- whole vs whole: the two pictures;
- whole vs center: the first picture against the middle of the second (CENTER_MARGIN cut
  from each side): "the first is a crop of the second", and center vs whole the reverse;
- center vs center: the two middles (e.g. two different frames around one picture).

The pixel test: both regions as 64x64 grayscale thumbnails (area averages of the picture
decoded as for hashing, see imgpipe.data.hashing.decode_image). The second's gray levels are
mapped onto the first's as a brightness and contrast edit would: its mean scaled, its
deviations from the mean scaled, each factor within 1/MAX_GAIN..MAX_GAIN (a free offset
would make any two-tone pictures of one layout equal). A pixel of either then costs how
far it lies outside the range of the other's 3x3 neighbourhood (a shift of one thumbnail
pixel, ~1.6% of the side, is free: resampling, a crop a little off CENTER_MARGIN), except
towards white where the other is white (a brightened copy clipped there) and likewise for
black. The pixel difference is the largest cost averaged over 3x3 pixels (a stray pixel at
a JPEG edge is not a difference, a shape is), leaving out the outermost ring of thumbnail
pixels (a resize or crop rounds the picture's edge differently). An edited copy stays
within a few levels almost everywhere; a distinct picture differs by far more somewhere:
a shape that moved, grew, changed or turned from dark to light. The pair is a near
duplicate when the difference is at most ``dedupe.near_pixel_difference``.
Colour is compared too, coarsely, where the gray levels agree: two pictures that differ
only in hue at equal brightness (a red and a green circle) agree in gray and would
otherwise be copies. Each region as 16x16 cells of two colour opponents (R-G and
(R+G)/2-B, from the same decode); the colour difference (`chroma_difference`) must be at
most MAX_CHROMA_DIFFERENCE. A picture without colour is not compared: a grayscale copy of
a colour picture is still a copy.

Used by the dedupe stage (all pairs) and by the crawl's target counter (one new image
against those counted), so both call the same thing a near duplicate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from imgpipe.data.hamming import group_pairs
from imgpipe.data.hashing import center_box, decode_image

log = logging.getLogger(__name__)

THUMB_SIDE = 64
MAX_GAIN = 1.25  # brightness or contrast changed by up to 25% (either way) is still the same picture
# The default of dedupe.near_pixel_difference (the schema has the same). bench/dedupe.py:
# edited copies of photos are confirmed with recall 0.998 (brightness +-20% reaches 28),
# candidate pairs of distinct low-texture images differ by 34 or more.
DEFAULT_PIXEL_DIFFERENCE = 30
CHROMA_SIDE = 16
# The colour test's threshold (levels of a colour-opponent channel, see chroma_difference).
# Measured (the two scikit-learn photos: re-encodes, resizes, brightness, contrast and saturation
# +-20%, 2% and 5% crops): copies differ by 25.5 at most (brightness +20%, saturated areas
# clipping); a circle recoloured at equal brightness (a channel changed by 80+ levels, 300
# random colour pairs) by 69 or more.
MAX_CHROMA_DIFFERENCE = 40
GRAY_CHROMA = 6  # an opponent value within this of 0 everywhere: a picture without colour
REGIONS = ("whole", "center")
# (region of the first image, region of the second): the hash comparisons, in the order a
# tie between confirmed ones is broken (the plainest explanation first).
HYPOTHESES = ((0, 0), (0, 1), (1, 0), (1, 1))
CLIPPED = (4, 251)  # gray levels at which an edit may have clipped the picture
_BATCH = 512  # pairs compared at once (~20 MB of float32 work arrays)


def hypothesis_name(index: int) -> str:
    first, second = HYPOTHESES[index]
    return f"{REGIONS[first]} vs {REGIONS[second]}"


class Thumbnails(NamedTuple):
    """What the pixel test keeps of one image (both regions: whole and center)."""

    gray: np.ndarray  # uint8 (2, THUMB_SIDE, THUMB_SIDE): gray levels
    chroma: np.ndarray  # float32 (2, 2, CHROMA_SIDE, CHROMA_SIDE): red-green and yellow-blue per region


def thumbnails(path: str | os.PathLike) -> Thumbnails:
    """The whole picture and its center as 64x64 gray levels (uint8: 8 KB an image in the
    cache; half a level of rounding is nothing beside the threshold) and as 16x16 colour
    opponents (see `chroma_difference`), from one decode."""
    decoded = decode_image(path, color=True)
    boxes = (None, center_box(decoded.size))
    gray = decoded if decoded.mode == "F" else decoded.convert("L")
    size = (THUMB_SIDE, THUMB_SIDE)
    pixels = np.stack([np.asarray(gray.resize(size, Image.Resampling.BOX, box=box), dtype=np.float32)
                       for box in boxes])
    if gray.mode == "F" and pixels.max() > 255:  # a 16-bit image: gray levels on the 8-bit scale
        pixels *= 255 / 65535
    chroma = np.zeros((2, 2, CHROMA_SIDE, CHROMA_SIDE), dtype=np.float32)
    if decoded.mode == "RGB":
        for k, box in enumerate(boxes):
            rgb = np.asarray(decoded.resize((CHROMA_SIDE, CHROMA_SIDE), Image.Resampling.BOX, box=box), np.float32)
            chroma[k, 0] = rgb[..., 0] - rgb[..., 1]
            chroma[k, 1] = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    return Thumbnails(np.clip(np.round(pixels), 0, 255).astype(np.uint8), chroma)


def chroma_difference(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """For stacks of colour-opponent thumbnails (k, 2, h, w): per pair, how far their colours
    disagree somewhere, in levels of an opponent channel (R-G or (R+G)/2-B).

    A cell of one costs how far its opponent value lies outside the other's 3x3 neighbourhood
    range, widened by MAX_GAIN either way (a brightness or contrast edit scales colour
    differences too); the costs are averaged over 3x3 cells and the largest average, leaving
    out the outer ring, is the result. A picture without colour (every cell within
    GRAY_CHROMA of gray) has nothing to compare: a grayscale copy of a colour picture is a copy.
    """
    first, second = np.asarray(first, np.float32), np.asarray(second, np.float32)
    k, channels, h, w = first.shape
    flat_first, flat_second = first.reshape(k * channels, h, w), second.reshape(k * channels, h, w)

    def outside(values, other):
        low, high = _neighbourhood(other, np.minimum), _neighbourhood(other, np.maximum)
        low = np.minimum(low * MAX_GAIN, low / MAX_GAIN)
        high = np.maximum(high * MAX_GAIN, high / MAX_GAIN)
        return np.maximum.reduce([values - high, low - values, np.zeros_like(values)])

    cost = np.maximum(outside(flat_first, flat_second), outside(flat_second, flat_first)).reshape(k, channels, h, w)
    cost = _box_mean(cost.max(axis=1))[:, 1:-1, 1:-1].reshape(k, -1).max(axis=1)
    colourless = ((np.abs(first).reshape(k, -1).max(axis=1) <= GRAY_CHROMA)
                  | (np.abs(second).reshape(k, -1).max(axis=1) <= GRAY_CHROMA))
    return np.where(colourless, 0.0, cost).astype(np.float32)


def _neighbourhood(pixels: np.ndarray, reduce) -> np.ndarray:
    """The min or max (`reduce`) of each pixel's 3x3 neighbourhood, for a stack (k, h, w)."""
    padded = np.pad(pixels, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = pixels.shape[1:]
    out = padded[:, 1:h + 1, 1:w + 1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            reduce(out, padded[:, dy:dy + h, dx:dx + w], out=out)
    return out


def pixel_difference(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """For stacks of thumbnails (k, h, w): per pair, the pixel difference (module docstring).

    The second's levels are mapped onto the first's as a brightness and contrast edit would
    (its mean scaled, its deviations from the mean scaled, each factor within
    1/MAX_GAIN..MAX_GAIN, least squares); a pixel of one costs how far it lies outside the
    min..max of the other's 3x3 neighbourhood; the costs are averaged over 3x3 pixels (one
    stray pixel at a border or a JPEG edge is not a difference, a shape is) and the result
    is the largest such average, in gray levels.
    """
    first, second = np.asarray(first, np.float32), np.asarray(second, np.float32)
    mean_first = first.mean(axis=(1, 2), keepdims=True)
    mean_second = second.mean(axis=(1, 2), keepdims=True)
    centred = second - mean_second
    variance = (centred * centred).mean(axis=(1, 2), keepdims=True)
    covariance = ((first - mean_first) * centred).mean(axis=(1, 2), keepdims=True)
    # A flat second image has no contrast to fit: its level is matched by the brightness alone.
    contrast = np.where(variance > 1e-6, covariance / np.maximum(variance, 1e-6), 1.0)
    brightness = np.where(mean_second > 1e-3, mean_first / np.maximum(mean_second, 1e-3), 1.0)
    fitted = (np.clip(contrast, 1 / MAX_GAIN, MAX_GAIN) * centred
              + np.clip(brightness, 1 / MAX_GAIN, MAX_GAIN) * mean_second)
    low_first, high_first = _neighbourhood(first, np.minimum), _neighbourhood(first, np.maximum)
    low_fitted, high_fitted = _neighbourhood(fitted, np.minimum), _neighbourhood(fitted, np.maximum)
    # An edit that brightens clips at white (darkens: at black): where one image is at the
    # end of the range it may hide how much further the other goes, so that side is free.
    first_white, first_black = high_first >= CLIPPED[1], low_first <= CLIPPED[0]
    second_white = _neighbourhood(second, np.maximum) >= CLIPPED[1]
    second_black = _neighbourhood(second, np.minimum) <= CLIPPED[0]
    cost = np.maximum.reduce([
        np.where(second_white, 0.0, first - high_fitted),  # the first brighter than the second allows
        np.where(first_white, 0.0, fitted - high_first),  # the second brighter than the first allows
        np.where(second_black, 0.0, low_fitted - first),  # the first darker
        np.where(first_black, 0.0, low_first - fitted),  # the second darker
    ])
    # The outermost ring of thumbnail pixels is left out: it holds partial pixels of the
    # picture's edge, which a resize or a crop rounds differently.
    return _box_mean(np.maximum(cost, 0.0))[:, 1:-1, 1:-1].reshape(len(first), -1).max(axis=1)


def _box_mean(pixels: np.ndarray) -> np.ndarray:
    """The mean of each pixel's 3x3 neighbourhood (edges repeated), for a stack (k, h, w)."""
    padded = np.pad(pixels, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = pixels.shape[1:]
    return sum(padded[:, dy:dy + h, dx:dx + w] for dy in (0, 1, 2) for dx in (0, 1, 2)) / 9


class PixelCheck:
    """The pixel test of candidate pairs, with each file's thumbnails decoded once (thread-safe)."""

    def __init__(self, max_difference: float = DEFAULT_PIXEL_DIFFERENCE, threads: int = 1):
        if not 0 <= max_difference <= 255:
            raise ValueError(f"dedupe.near_pixel_difference must be within 0..255, got {max_difference}")
        self.max_difference = max_difference
        self.threads = max(1, threads)
        self._thumbnails: dict[str, Thumbnails] = {}
        self._lock = threading.Lock()

    def _load(self, files: Sequence[str]) -> None:
        with self._lock:
            missing = sorted({f for f in files if f not in self._thumbnails})
        if not missing:
            return
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            loaded = dict(zip(missing, pool.map(thumbnails, missing)))
        with self._lock:
            self._thumbnails.update(loaded)
        log.debug("decoded %d images for the pixel test", len(missing))

    def differences(self, first_files: Sequence[str], first_regions: Sequence[int],
                    second_files: Sequence[str], second_regions: Sequence[int]) -> np.ndarray:
        """Pixel difference (gray levels) of each pair (region 0: whole picture, 1: center), float32."""
        return self._per_pair(pixel_difference, "gray", first_files, first_regions, second_files, second_regions)

    def chroma_differences(self, first_files: Sequence[str], first_regions: Sequence[int],
                           second_files: Sequence[str], second_regions: Sequence[int]) -> np.ndarray:
        """Colour difference (see chroma_difference) of each pair, float32."""
        return self._per_pair(chroma_difference, "chroma", first_files, first_regions, second_files, second_regions)

    def _per_pair(self, measure, part: str, first_files, first_regions, second_files, second_regions) -> np.ndarray:
        """`measure` of each pair's thumbnails (`part` of them), in batches of _BATCH pairs run on
        `threads` threads (numpy releases the GIL in the array work); the result is in pair order
        and the same for any number of threads."""
        self._load(list(first_files) + list(second_files))

        def batch(start: int) -> np.ndarray:
            stop = min(start + _BATCH, len(first_files))
            first = np.stack([getattr(self._thumbnails[f], part)[r] for f, r in
                              zip(first_files[start:stop], first_regions[start:stop])])
            second = np.stack([getattr(self._thumbnails[f], part)[r] for f, r in
                               zip(second_files[start:stop], second_regions[start:stop])])
            return measure(first, second)

        starts = range(0, len(first_files), _BATCH)
        if len(starts) <= 1 or self.threads == 1:
            parts = [batch(start) for start in starts]
        else:
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                parts = list(pool.map(batch, starts))
        return np.concatenate(parts).astype(np.float32) if parts else np.empty(0, np.float32)


def confirm(first: np.ndarray, second: np.ndarray, first_files: Sequence[str], second_files: Sequence[str],
            near_distance: int, check: PixelCheck) -> pd.DataFrame:
    """Which candidate pairs are near duplicates, and by which hypothesis.

    `first` and `second` hold each pair's hashes, shape (k, 2): whole and center. Every
    hypothesis whose hashes are within `near_distance` is tested on the pixels. Returns
    one row per pair, in order: confirmed (bool), distance (bits of the confirming
    hypothesis; of the nearest one when none confirms), hypothesis (index into
    HYPOTHESES), difference (its pixel difference) and chroma (its colour difference; nan
    where the gray levels already disagree).
    """
    first = np.asarray(first, dtype=np.uint64).reshape(-1, 2)
    second = np.asarray(second, dtype=np.uint64).reshape(-1, 2)
    bits = np.stack([np.bitwise_count(first[:, a] ^ second[:, b]) for a, b in HYPOTHESES], axis=1).astype(np.int64)
    pair, hypothesis = np.nonzero(bits <= near_distance)
    regions = np.array(HYPOTHESES)[hypothesis]
    first_files, second_files = np.asarray(first_files, dtype=object), np.asarray(second_files, dtype=object)
    files_and_regions = (first_files[pair], regions[:, 0], second_files[pair], regions[:, 1])
    difference = check.differences(*files_and_regions)
    tested = pd.DataFrame({"pair": pair, "hypothesis": hypothesis, "distance": bits[pair, hypothesis],
                           "difference": difference, "chroma": np.nan})
    # Colour is compared only where the gray levels agree (the rest are rejected already), and
    # not at all when the gray test is off (255 trusts the hashes alone).
    gray_agrees = np.flatnonzero(difference <= check.max_difference)
    if len(gray_agrees) and check.max_difference < 255:
        tested.loc[gray_agrees, "chroma"] = check.chroma_differences(*(part[gray_agrees] for part in files_and_regions))
        tested["confirmed"] = tested["chroma"] <= MAX_CHROMA_DIFFERENCE
    else:
        tested["confirmed"] = tested["difference"] <= check.max_difference
    # Per pair: a confirmed hypothesis before any other, then the fewest bits, then the plainest.
    best = tested.sort_values(["pair", "confirmed", "distance", "hypothesis"],
                              ascending=[True, False, True, True]).drop_duplicates("pair")
    out = pd.DataFrame({"confirmed": False, "distance": bits.min(axis=1), "hypothesis": bits.argmin(axis=1),
                        "difference": np.nan, "chroma": np.nan})
    columns = ["confirmed", "distance", "hypothesis", "difference", "chroma"]
    out.loc[best["pair"].to_numpy(), columns] = best[columns].to_numpy(object)
    return out.astype({"confirmed": bool, "distance": np.int64, "hypothesis": np.int64, "difference": np.float64,
                       "chroma": np.float64})


def near_pairs(hashes: Sequence[Sequence[int]], files: Sequence[str], near_distance: int,
               check: PixelCheck) -> pd.DataFrame:
    """Near-duplicate pairs among images: hash candidates confirmed on the pixels.

    `hashes[k]` are image k's (whole, center) hashes, `files[k]` its file. Returns the
    confirmed pairs (a, b, dist, hypothesis, difference), a < b, sorted by (a, b); dist is
    the Hamming distance of the confirming hypothesis. Candidates the pixels reject are
    logged (how many), not returned.
    """
    candidates = group_pairs(hashes, near_distance)
    if not len(candidates):
        return pd.DataFrame({"a": [], "b": [], "dist": [], "hypothesis": [], "difference": []}, dtype=np.int64)
    table = np.asarray([tuple(h) for h in hashes], dtype=np.uint64)
    files = np.asarray(files, dtype=object)
    a, b = candidates[:, 0], candidates[:, 1]
    verdict = confirm(table[a], table[b], files[a], files[b], near_distance, check)
    rejected = int((~verdict["confirmed"]).sum())
    log.info("%d candidate pairs within %d bits: %d confirmed by the pixels, %d rejected (pixel difference "
             "above dedupe.near_pixel_difference %g)", len(candidates), near_distance, len(candidates) - rejected,
             rejected, check.max_difference)
    keep = verdict["confirmed"].to_numpy()
    return pd.DataFrame({"a": a[keep], "b": b[keep], "dist": verdict["distance"].to_numpy()[keep],
                         "hypothesis": verdict["hypothesis"].to_numpy()[keep],
                         "difference": verdict["difference"].to_numpy()[keep]})

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
decoded as for hashing, see imgpipe.hashing.decode_gray). The second's gray levels are
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
Colour is not compared: a grayscale copy is still a copy, and two pictures that differ
only in hue at equal brightness are not told apart (neither does the hash).

Used by the dedupe stage (all pairs) and by the crawl's target counter (one new image
against those counted), so both call the same thing a near duplicate.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from imgpipe.hamming import group_pairs
from imgpipe.hashing import center_box, decode_gray

log = logging.getLogger(__name__)

THUMB_SIDE = 64
MAX_GAIN = 1.25  # brightness or contrast changed by up to 25% (either way) is still the same picture
# The default of dedupe.near_pixel_difference (the schema has the same). bench/dedupe.py:
# edited copies of photos are confirmed with recall 0.998 (brightness +-20% reaches 28),
# candidate pairs of distinct low-texture images differ by 34 or more.
DEFAULT_PIXEL_DIFFERENCE = 26
REGIONS = ("whole", "center")
# (region of the first image, region of the second): the hash comparisons, in the order a
# tie between confirmed ones is broken (the plainest explanation first).
HYPOTHESES = ((0, 0), (0, 1), (1, 0), (1, 1))
CLIPPED = (4, 251)  # gray levels at which an edit may have clipped the picture
_BATCH = 512  # pairs compared at once (~20 MB of float32 work arrays)


def hypothesis_name(index: int) -> str:
    first, second = HYPOTHESES[index]
    return f"{REGIONS[first]} vs {REGIONS[second]}"


def thumbnails(path: str | os.PathLike) -> np.ndarray:
    """The whole picture and its center as 64x64 gray levels: uint8 (8 KB an image in the
    cache; half a level of rounding is nothing beside the threshold), shape (2, 64, 64)."""
    gray = decode_gray(path)
    size = (THUMB_SIDE, THUMB_SIDE)
    regions = [gray.resize(size, Image.Resampling.BOX, box=box) for box in (None, center_box(gray.size))]
    pixels = np.stack([np.asarray(region, dtype=np.float32) for region in regions])
    if gray.mode == "F" and pixels.max() > 255:  # a 16-bit image: gray levels on the 8-bit scale
        pixels *= 255 / 65535
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


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
        self._thumbnails: dict[str, np.ndarray] = {}
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
        """Pixel difference of each pair (region 0: whole picture, 1: center), float32."""
        self._load(list(first_files) + list(second_files))
        out = np.empty(len(first_files), dtype=np.float32)
        for start in range(0, len(out), _BATCH):
            stop = min(start + _BATCH, len(out))
            first = np.stack([self._thumbnails[f][r] for f, r in
                              zip(first_files[start:stop], first_regions[start:stop])])
            second = np.stack([self._thumbnails[f][r] for f, r in
                               zip(second_files[start:stop], second_regions[start:stop])])
            out[start:stop] = pixel_difference(first, second)
        return out


def confirm(first: np.ndarray, second: np.ndarray, first_files: Sequence[str], second_files: Sequence[str],
            near_distance: int, check: PixelCheck) -> pd.DataFrame:
    """Which candidate pairs are near duplicates, and by which hypothesis.

    `first` and `second` hold each pair's hashes, shape (k, 2): whole and center. Every
    hypothesis whose hashes are within `near_distance` is tested on the pixels. Returns
    one row per pair, in order: confirmed (bool), distance (bits of the confirming
    hypothesis; of the nearest one when none confirms), hypothesis (index into
    HYPOTHESES) and difference (its pixel difference).
    """
    first = np.asarray(first, dtype=np.uint64).reshape(-1, 2)
    second = np.asarray(second, dtype=np.uint64).reshape(-1, 2)
    bits = np.stack([np.bitwise_count(first[:, a] ^ second[:, b]) for a, b in HYPOTHESES], axis=1).astype(np.int64)
    pair, hypothesis = np.nonzero(bits <= near_distance)
    regions = np.array(HYPOTHESES)[hypothesis]
    first_files, second_files = np.asarray(first_files, dtype=object), np.asarray(second_files, dtype=object)
    difference = check.differences(first_files[pair], regions[:, 0], second_files[pair], regions[:, 1])
    tested = pd.DataFrame({"pair": pair, "hypothesis": hypothesis, "distance": bits[pair, hypothesis],
                           "difference": difference})
    tested["confirmed"] = tested["difference"] <= check.max_difference
    # Per pair: a confirmed hypothesis before any other, then the fewest bits, then the plainest.
    best = tested.sort_values(["pair", "confirmed", "distance", "hypothesis"],
                              ascending=[True, False, True, True]).drop_duplicates("pair")
    out = pd.DataFrame({"confirmed": False, "distance": bits.min(axis=1), "hypothesis": bits.argmin(axis=1),
                        "difference": np.nan})
    out.loc[best["pair"].to_numpy(), ["confirmed", "distance", "hypothesis", "difference"]] = (
        best[["confirmed", "distance", "hypothesis", "difference"]].to_numpy(object))
    return out.astype({"confirmed": bool, "distance": np.int64, "hypothesis": np.int64, "difference": np.float64})


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

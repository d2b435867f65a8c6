"""Which pHash distance separates duplicates from distinct images? Prints JSON.

Offline: the "photos" are crops of the photos that ship inside installed packages
(scikit-learn's two sample images, matplotlib's grace_hopper.jpg), each resized to a
320 px photo and saved as a JPEG, as a crawl would have it.

- duplicate pairs: a photo against an edited copy that a person calls the same picture
  (re-encoded, resized, slightly cropped, brightened, blurred, noisy, grayscale, ...);
- distinct pairs: two photos from different source images, or from regions of one
  image that do not overlap (overlapping crops are reported apart: they are neither);
- scikit-learn's 8x8 digits, to see what a threshold does to a data set of tiny images.

Distances are imgpipe's: the nearest of two images' hashes (whole and center, see
imgpipe.data.hashing); the false positives of the whole-picture hash alone are printed beside.

pHash bits are half ones (threshold = median), so distances are even and an odd
threshold behaves like the even one below it. Recommended default: the largest even
threshold with no false positive among distinct photos even one step (2 bits) further
out. Zero false positives in ~1e5 pairs only bounds the rate near 1e-5, while a crawl of
10k images has 5e7 pairs; the step of margin, and the tail extrapolation printed beside
it, are about that.

    PYTHONPATH=src .venv/bin/python bench/dedupe_threshold.py
"""

import itertools
import json
import tempfile
import time
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter
from sklearn.datasets import load_digits, load_sample_images

from imgpipe.data.dedupe import decide_fates, summarize_fates
from imgpipe.data.hamming import group_pairs
from imgpipe.data.hashing import hash_distance, hash_images

CROPS_PER_SOURCE = 200
EDITED_PHOTOS = 120
PHOTO_SIDE = 320
THRESHOLDS = range(0, 21)
DIGITS_THRESHOLDS = [0, 2, 4, 6, 8, 10, 12]
MIN_TEXTURE = 12.0  # gray-level std below which a crop is flat sky/wall, not a photo
rng = np.random.default_rng(0)


def source_images():
    grace = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return [Image.fromarray(a) for a in load_sample_images().images] + [Image.open(grace).convert("RGB")]


def random_box(width, height):
    side = rng.uniform(0.2, 0.6) * min(width, height)
    aspect = rng.uniform(0.75, 1.33)
    w, h = int(side * aspect), int(side / aspect)
    x, y = rng.integers(0, width - w), rng.integers(0, height - h)
    return (int(x), int(y), int(x + w), int(y + h))


def overlap(a, b):
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def as_photo(crop):
    scale = PHOTO_SIDE / max(crop.size)
    return crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC)


def crop_fraction(image, fraction):
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def resized_back(image, factor):
    small = image.resize(
        (round(image.width * factor), round(image.height * factor)), Image.Resampling.BILINEAR
    )
    return small.resize(image.size, Image.Resampling.BICUBIC)


def noisy(image, sigma):
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# name -> (edit, save options); each edited copy is what a second website might serve.
EDITS = {
    "jpeg_q30": (lambda im: im, {"quality": 30}),
    "jpeg_q50": (lambda im: im, {"quality": 50}),
    "jpeg_q75": (lambda im: im, {"quality": 75}),
    "jpeg_q95": (lambda im: im, {"quality": 95}),
    "png": (lambda im: im, {"format": "PNG"}),
    "resize_50_back": (lambda im: resized_back(im, 0.5), {"quality": 85}),
    "resize_25_back": (lambda im: resized_back(im, 0.25), {"quality": 85}),
    "thumbnail_25": (
        lambda im: im.resize((im.width // 4, im.height // 4), Image.Resampling.LANCZOS),
        {"quality": 85},
    ),
    "crop_2pct": (lambda im: crop_fraction(im, 0.02), {"quality": 85}),
    "crop_5pct": (lambda im: crop_fraction(im, 0.05), {"quality": 85}),
    "brighter_10pct": (lambda im: ImageEnhance.Brightness(im).enhance(1.1), {"quality": 85}),
    "darker_10pct": (lambda im: ImageEnhance.Brightness(im).enhance(0.9), {"quality": 85}),
    "contrast_up_15pct": (lambda im: ImageEnhance.Contrast(im).enhance(1.15), {"quality": 85}),
    "contrast_down_15pct": (lambda im: ImageEnhance.Contrast(im).enhance(0.85), {"quality": 85}),
    "blur_r1": (lambda im: im.filter(ImageFilter.GaussianBlur(1)), {"quality": 85}),
    "noise_sigma8": (lambda im: noisy(im, 8), {"quality": 85}),
    "grayscale": (lambda im: im.convert("L"), {"quality": 85}),
}
# Edits a person may still call "the same picture" but pHash is not meant to catch:
# reported for information, not counted in the true-positive rate.
BEYOND = {
    "crop_10pct": (lambda im: crop_fraction(im, 0.10), {"quality": 85}),
    "mirror": (lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {"quality": 85}),
}


def percentiles(values):
    values = np.asarray(values)
    qs = [0, 0.1, 1, 5, 25, 50, 75, 95, 99, 100]
    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs} | {"n": int(len(values))}


def pair_distances(hashes, whole_only=False):
    """Distance matrix of a few hundred images' hashes (the nearest of their hashes)."""
    h = np.asarray(hashes, dtype=np.uint64)[:, :1] if whole_only else np.asarray(hashes, dtype=np.uint64)
    return np.bitwise_count(h[:, None, :, None] ^ h[None, :, None, :]).min(axis=(2, 3)).astype(int)


def tail_extrapolation(by_threshold, zero_fp):
    """False-positive rate below the measured range, from a log-linear fit of the tail."""
    measured = [r for r in by_threshold if r["threshold"] % 2 == 0 and r["false_positive_pairs"] >= 5]
    slope, intercept = np.polyfit(
        [r["threshold"] for r in measured], np.log([r["false_positive_rate"] for r in measured]), 1
    )
    pairs_10k = 10_000 * 9_999 / 2
    rows = []
    for t in range(6, zero_fp + 1, 2):
        rate = float(np.exp(intercept + slope * t))
        rows.append(
            {
                "threshold": t,
                "false_positive_rate": rate,
                "false_pairs_among_10k_images": round(rate * pairs_10k),
            }
        )
    return {"fitted_on_thresholds": [r["threshold"] for r in measured], "estimates": rows}


def build_photos(folder):
    photos = []  # (source index, box, path, texture)
    for s, source in enumerate(source_images()):
        for k in range(CROPS_PER_SOURCE):
            box = random_box(*source.size)
            crop = source.crop(box)
            path = folder / f"photo_{s}_{k}.jpg"
            as_photo(crop).save(path, quality=92)
            texture = float(np.asarray(crop.convert("L"), dtype=float).std())
            photos.append((s, box, path, texture))
    return photos


def build_edits(folder, photos):
    edits = []  # (photo index, edit name, path)
    chosen = rng.choice(len(photos), EDITED_PHOTOS, replace=False)
    for p in sorted(chosen):
        original = Image.open(photos[p][2]).convert("RGB")
        for name, (edit, options) in (EDITS | BEYOND).items():
            path = folder / f"edit_{p}_{name}.{'png' if options.get('format') == 'PNG' else 'jpg'}"
            edit(original).save(path, **options)
            edits.append((int(p), name, path))
    return edits


def digits_report(folder, recommended):
    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    report = {"n_images": int(len(pixels)), "classes": 10}
    for form, upscale in [("8x8_png", 1), ("32x32_nearest_png", 4)]:
        files = []
        for i, image in enumerate(pixels):
            path = folder / f"digit_{form}_{i}.png"
            Image.fromarray(np.kron(image, np.ones((upscale, upscale), dtype=np.uint8))).save(path)
            files.append(str(path))
        hashes = hash_images(files)
        labels = digits.target
        raw = pd.DataFrame(
            {
                "file": files,
                "class": labels.astype(str),
                "sha256": [f"{i:064x}" for i in range(len(files))],
                "status": "ok",
                "origin": files,
            }
        )
        phashes = dict(zip(raw["sha256"], hashes))
        rows = []
        for t in sorted(set(DIGITS_THRESHOLDS) | {recommended}):
            pairs = group_pairs(hashes, t)
            same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
            drop = summarize_fates(decide_fates(raw, phashes, t, "drop"))
            group_fates = decide_fates(raw, phashes, t, "group")
            rows.append(
                {
                    "threshold": t,
                    "within_class_pairs": int(same.sum()),
                    "cross_class_pairs": int((~same).sum()),
                    "drop_mode_kept": drop["n_kept"],
                    "drop_mode_cross_class_near": drop["dropped_cross_class_near"],
                    "drop_mode_near_duplicate": drop["dropped_near_duplicate"],
                    "group_mode_kept": int((group_fates["status"] == "kept").sum()),
                    "group_mode_groups": summarize_fates(group_fates)["n_groups"],
                    "group_mode_largest_group": int(
                        group_fates.loc[group_fates["status"] == "kept", "group"].value_counts().max()
                    ),
                }
            )
        dist = pair_distances(hashes)[np.triu_indices(len(hashes), 1)]
        same = (labels[:, None] == labels[None, :])[np.triu_indices(len(hashes), 1)]
        report[form] = {
            "within_class_distance": percentiles(dist[same]),
            "cross_class_distance": percentiles(dist[~same]),
            "by_threshold": rows,
        }
    return report


def main():
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = build_photos(folder)
        edits = build_edits(folder, photos)
        photo_hash = hash_images([str(p[2]) for p in photos])
        edit_hash = hash_images([str(e[2]) for e in edits])

        duplicates: dict[str, list[int]] = {}
        for (p, name, _), h in zip(edits, edit_hash):
            duplicates.setdefault(name, []).append(hash_distance(photo_hash[p], h))
        counted = np.concatenate([duplicates[name] for name in EDITS])

        dist = pair_distances(photo_hash)
        dist_whole = pair_distances(photo_hash, whole_only=True)
        distinct_whole = []
        distinct, same_source, overlapping, flat = [], [], [], []
        for i, j in itertools.combinations(range(len(photos)), 2):
            (si, bi, _, ti), (sj, bj, _, tj) = photos[i], photos[j]
            if si == sj and overlap(bi, bj) > 0:
                overlapping.append(dist[i, j])
            elif min(ti, tj) < MIN_TEXTURE:
                flat.append(dist[i, j])
            else:
                distinct.append(dist[i, j])
                distinct_whole.append(dist_whole[i, j])
                same_source.append(si == sj)
        distinct, same_source, distinct_whole = np.array(distinct), np.array(same_source), np.array(distinct_whole)

        by_threshold = []
        for t in THRESHOLDS:
            by_threshold.append(
                {
                    "threshold": t,
                    "true_positive_rate": round(float((counted <= t).mean()), 4),
                    "false_positive_pairs": int((distinct <= t).sum()),
                    "false_positive_rate": float((distinct <= t).mean()),
                    "false_positive_pairs_other_source": int((distinct[~same_source] <= t).sum()),
                    "false_positive_pairs_whole_hash_only": int((distinct_whole <= t).sum()),
                    "flat_crop_pairs_flagged": int((np.array(flat) <= t).sum()),
                }
            )
        zero_fp = max(row["threshold"] for row in by_threshold if row["false_positive_pairs"] == 0)
        zero_fp -= zero_fp % 2  # distances are even
        recommended = zero_fp - 2
        result = {
            "setup": {
                "photos": len(photos),
                "flat_photos_below_texture": int(sum(p[3] < MIN_TEXTURE for p in photos)),
                "edited_photos": EDITED_PHOTOS,
                "duplicate_pairs_counted": int(len(counted)),
                "distinct_pairs": int(len(distinct)),
                "overlapping_crop_pairs": len(overlapping),
                "flat_crop_pairs": len(flat),
            },
            "duplicate_distance": {"all_counted": percentiles(counted)}
            | {name: percentiles(values) for name, values in duplicates.items()},
            "distinct_distance": percentiles(distinct),
            "distinct_distance_same_source_no_overlap": percentiles(distinct[same_source]),
            "distinct_distance_other_source": percentiles(distinct[~same_source]),
            "overlapping_crops_distance": percentiles(overlapping),
            "flat_crop_pairs_distance": percentiles(flat) if flat else None,
            "by_threshold": by_threshold,
            "max_threshold_without_false_positive": zero_fp,
            "tail_extrapolation": tail_extrapolation(by_threshold, zero_fp),
            "recommended_near_distance": recommended,
            "caught_by_edit": {
                f"threshold_{t}": {
                    name: round(float((np.array(v) <= t).mean()), 3) for name, v in duplicates.items()
                }
                for t in sorted({6, 8, 10, 12, recommended})
            },
            "digits": digits_report(folder, recommended),
        }
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

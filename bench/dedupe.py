"""De-duplication at scale (issue 7): imgpipe against imagededup and imagehash. Prints JSON.

a) A generated corpus of JPEG photos (default 3,000) in groups: a distinct base photo
   and some of its copies, each made one way: an exact copy, a re-encode at another
   JPEG quality, a resize to about half, a brightness change, a 5% crop (5% off each
   side, as in bench/dedupe_threshold.py), a corner watermark (white text), a 3-5% crop of
   one side only and an EXIF rotation (pixels turned 90 degrees,
   orientation tag set so that viewers show it upright). Every pair within a group is a
   true duplicate pair; pairs across groups are not. For each tool, at distance 10:
   images/s hashed on 1 and 2 workers, search seconds, precision and recall of the found
   pairs, and recall by kind of copy (base against copy).
   - imgpipe: hashing.hash_images (threads; two hashes per image, whole and center) +
     nearmatch.near_pairs (hash candidates by multi-index search, each confirmed on the
     pixels of the matched regions at the default dedupe.near_pixel_difference);
   - imagededup: PHash with its defaults (encode_images with num_enc_workers processes,
     find_duplicates with max_distance_threshold=10);
   - imagehash: a plain loop of imagehash.phash(Image.open(path)) (a process pool for 2
     workers) and an all-pairs comparison in numpy.
b) Hamming search alone: 100,000 and 1,000,000 uniformly random 64-bit hashes with 1,000
   planted pairs at distances 0..10: seconds, peak memory (a fresh process per size),
   recall of the planted pairs, and that every pair found is within the distance; at
   100,000 also that the result equals brute force.
d) Distinct low-texture images (imgpipe.data.lowtexture: three shape classes, 300 each, and
   stripes, gradient shapes, icons, scans): images dropped by dedupe_images at the schema's
   defaults (the goal: none), and by the hashes alone (near_pixel_difference 255: the rule
   before the pixel test); candidate pairs, and the margins of the pixel threshold: the
   smallest pixel difference among these candidates against the largest among the corpus's
   base-vs-copy pairs (a).
c) The search dedupe runs for 1,000,000 images: two random hashes each (whole and center),
   image pairs by the nearest of their hashes, at distance 10 and at imgpipe's default:
   seconds and peak memory.
e) (--pixel-pairs N) The pixel test's throughput: N candidate pairs of the low-texture set
   through nearmatch.confirm on 1 and 2 threads (--workers), thumbnails already decoded.

Base photos are made offline: a crop of one of the photos that ship with scikit-learn and
matplotlib, recoloured, blended with a random low-frequency pattern (colour field,
shapes, a grating) and grain, so that bases are distinct from each other.

    PYTHONPATH=src .venv/bin/python bench/dedupe.py [--images 3000] [--hashes 100000 1000000]

imagededup and imagehash are optional (left out of the JSON when missing). imagededup
requires torch and torchvision; to keep pip from replacing the installed ones:
    pip install --no-deps imagededup imagehash PyWavelets tqdm
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from sklearn.datasets import load_sample_images

from imgpipe.config.schema import load_schema
from imgpipe.data.dedupe import dedupe_images, summarize_fates
from imgpipe.data.hamming import (
    choose_hamming_method,
    group_pairs,
    hamming_pairs,
    hamming_pairs_brute_force,
    owner_pairs,
)
from imgpipe.data.hashing import hash_distance, hash_images
from imgpipe.data.lowtexture import write_low_texture_set
from imgpipe.data.nearmatch import HYPOTHESES, PixelCheck, confirm, near_pairs

DISTANCE = 10
COPY_KINDS = ["exact", "reencode", "resize", "brightness", "crop_5pct", "exif_rotation", "watermark", "crop_one_side"]
COPIES_PER_GROUP = ([0, 1, 2, 3], [0.4, 0.25, 0.2, 0.15])
LONG_SIDES = (400, 1600)
ASPECTS = [4 / 3, 3 / 2, 16 / 9, 1, 3 / 4, 2 / 3]
BASE_QUALITY = 90
N_PLANTED = 1000


# ------------------------------------------------------------------------- the corpus


def source_photos() -> list[np.ndarray]:
    grace = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return list(load_sample_images().images) + [np.asarray(Image.open(grace).convert("RGB"))]


def low_frequency_field(rng, height, width, channels=3):
    """A smooth random colour field: a few-by-few random grid upsampled."""
    grid = rng.uniform(0, 255, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), channels)).astype(np.uint8)
    field = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def photo_crop(rng, sources, width, height) -> np.ndarray:
    """A random crop of a random source photo, turned and mirrored at random, at width x height."""
    src = np.rot90(sources[int(rng.integers(len(sources)))], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        src = src[:, ::-1]
    sh, sw = src.shape[:2]
    ch = max(8, round(min(sh, sw * height / width) * rng.uniform(0.15, 0.9)))
    cw = min(sw, max(8, round(ch * width / height)))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(src[y : y + ch, x : x + cw]))
    return np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def photo_collage(rng, sources, width, height, depth=2) -> np.ndarray:
    """One photo crop, or (at random) the frame split in two, each part a collage itself."""
    if depth == 0 or min(width, height) < 64 or rng.random() < 0.35:
        return photo_crop(rng, sources, width, height)
    if rng.random() < 0.5:
        cut = round(width * rng.uniform(0.3, 0.7))
        parts = [photo_collage(rng, sources, w, height, depth - 1) for w in (cut, width - cut)]
        return np.concatenate(parts, axis=1)
    cut = round(height * rng.uniform(0.3, 0.7))
    parts = [photo_collage(rng, sources, width, h, depth - 1) for h in (cut, height - cut)]
    return np.concatenate(parts, axis=0)


def base_photo(rng, sources) -> Image.Image:
    long_side = int(rng.integers(*LONG_SIDES))
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    if aspect >= 1:
        width, height = long_side, round(long_side / aspect)
    else:
        width, height = round(long_side * aspect), long_side
    # Crops of real photos, recoloured ...
    pixels = photo_collage(rng, sources, width, height) * rng.uniform(0.6, 1.3, 3) + rng.uniform(-30, 30, 3)
    # ... blended with a random low-frequency pattern: colour field, shapes, a grating.
    pattern = low_frequency_field(rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.08, 0.4) * height, rng.uniform(0.08, 0.4) * width
        inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)[..., None]
        pattern = np.where(inside, rng.uniform(0, 255, 3).astype(np.float32), pattern)
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(1, 6)
    grating = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) / max(width, height))
    pattern += (40 * grating)[..., None]
    alpha = rng.uniform(0.4, 0.65)
    pixels = (1 - alpha) * pixels + alpha * pattern + rng.normal(0, rng.uniform(2, 6), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_copy(kind, base, base_path, path, rng):
    if kind == "exact":
        shutil.copyfile(base_path, path)
    elif kind == "reencode":
        with Image.open(base_path) as decoded:
            decoded.save(path, quality=int(rng.choice([50, 60, 70, 75])))
    elif kind == "resize":
        factor = rng.uniform(0.4, 0.7)
        base.resize((round(base.width * factor), round(base.height * factor)), Image.Resampling.BICUBIC).save(
            path, quality=85
        )
    elif kind == "brightness":
        factor = float(rng.choice([0.8, 0.85, 1.15, 1.2]))
        ImageEnhance.Brightness(base).enhance(factor).save(path, quality=85)
    elif kind == "crop_5pct":
        dx, dy = round(base.width * 0.05), round(base.height * 0.05)
        base.crop((dx, dy, base.width - dx, base.height - dy)).save(path, quality=85)
    elif kind == "watermark":  # white text in the bottom-right corner, as a stock photo site stamps it
        marked = base.copy()
        ImageDraw.Draw(marked).text((base.width * 0.55, base.height * 0.88), "(c) stockphoto.com", fill=(255, 255, 255),
                                    font=ImageFont.load_default(size=max(10, base.height // 20)))
        marked.save(path, quality=85)
    elif kind == "crop_one_side":  # 3-5% cut off one side only
        cut = float(rng.uniform(0.03, 0.05))
        side = int(rng.integers(4))
        box = [0, 0, base.width, base.height]
        box[side] = round(box[side] + (1 if side < 2 else -1) * cut * (base.width if side % 2 == 0 else base.height))
        base.crop(tuple(box)).save(path, quality=85)
    elif kind == "exif_rotation":
        # Stored turned; the tag tells viewers (and imgpipe) to turn it back upright.
        exif = Image.Exif()
        clockwise = rng.random() < 0.5
        exif[0x0112] = 6 if clockwise else 8
        turned = base.transpose(Image.Transpose.ROTATE_90 if clockwise else Image.Transpose.ROTATE_270)
        turned.save(path, quality=BASE_QUALITY, exif=exif)
    else:
        raise ValueError(kind)


def write_group(task):
    """Writes one group (a base photo and its copies); returns [(file name, group, kind)]."""
    folder, group, n_copies, seed = task
    rng = np.random.default_rng(seed)
    sources = _SOURCES
    base = base_photo(rng, sources)
    base_path = Path(folder) / f"g{group:05d}_base.jpg"
    base.save(base_path, quality=BASE_QUALITY)
    rows = [(base_path.name, group, "base")]
    for kind in rng.choice(COPY_KINDS, size=n_copies, replace=False):
        path = Path(folder) / f"g{group:05d}_{kind}.jpg"
        save_copy(str(kind), base, base_path, path, rng)
        rows.append((path.name, group, str(kind)))
    return rows


_SOURCES: list[np.ndarray] = []


def _init_sources():
    _SOURCES[:] = source_photos()


def write_corpus(folder: Path, n_images: int, seed: int, workers: int):
    rng = np.random.default_rng(seed)
    tasks, total = [], 0
    while total < n_images:
        n_copies = min(int(rng.choice(COPIES_PER_GROUP[0], p=COPIES_PER_GROUP[1])), n_images - total - 1)
        tasks.append((str(folder), len(tasks), n_copies, int(rng.integers(2**63))))
        total += 1 + n_copies
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_sources) as pool:
        groups = pool.map(write_group, tasks, chunksize=8)
    return [row for rows in groups for row in rows]


# -------------------------------------------------------------------------- the tools


def pairs_of_sets(pairs):
    return {(min(i, j), max(i, j)) for i, j in pairs}


def all_pairs_numpy(hashes: np.ndarray, max_distance: int):
    """Every pair within max_distance by comparing all pairs, a block of rows at a time."""
    out = []
    for start in range(0, len(hashes), 512):
        dist = np.bitwise_count(hashes[start : start + 512, None] ^ hashes[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii + start
        out += zip((ii[keep] + start).tolist(), jj[keep].tolist())
    return out


def run_imgpipe(files, workers, distance=DISTANCE):
    """imgpipe's hashing, then candidates confirmed on pixels (search_s includes the pixel test)."""
    started = time.perf_counter()
    hashes = hash_images(files, workers)
    hash_s = time.perf_counter() - started
    started = time.perf_counter()
    pairs = near_pairs(hashes, files, distance, PixelCheck(default_near_pixel_difference(), workers))
    search_s = time.perf_counter() - started
    whole = np.array([pair.whole for pair in hashes], dtype=np.uint64)
    return hash_s, search_s, pairs_of_sets(pairs[["a", "b"]].to_numpy().tolist()), whole


def _imagehash_int(path):
    import imagehash

    with Image.open(path) as image:
        return int(str(imagehash.phash(image)), 16)


def run_imagehash(files, workers):
    started = time.perf_counter()
    if workers == 1:
        hashes = [_imagehash_int(path) for path in files]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            hashes = list(pool.map(_imagehash_int, files, chunksize=64))
    hash_s = time.perf_counter() - started
    started = time.perf_counter()
    array = np.array(hashes, dtype=np.uint64)
    pairs = all_pairs_numpy(array, DISTANCE)
    search_s = time.perf_counter() - started
    return hash_s, search_s, pairs_of_sets(pairs), array


def run_imagededup(folder, names, workers):
    from imagededup.methods import PHash

    phash = PHash(verbose=False)
    started = time.perf_counter()
    encodings = phash.encode_images(image_dir=folder, num_enc_workers=workers)
    hash_s = time.perf_counter() - started
    started = time.perf_counter()
    found = phash.find_duplicates(encoding_map=encodings, max_distance_threshold=DISTANCE)
    search_s = time.perf_counter() - started
    index = {name: i for i, name in enumerate(names)}
    pairs = [(index[a], index[b]) for a, duplicates in found.items() for b in duplicates]
    return hash_s, search_s, pairs_of_sets(pairs), None


def quality(found, truth, rows):
    hits = found & truth
    by_kind = {}
    base_of = {group: i for i, (_, group, kind) in enumerate(rows) if kind == "base"}
    for kind in COPY_KINDS:
        wanted = {
            (min(base_of[g], i), max(base_of[g], i)) for i, (_, g, k) in enumerate(rows) if k == kind
        }
        by_kind[kind] = round(len(wanted & found) / len(wanted), 4) if wanted else None
    return {
        "pairs_found": len(found),
        "true_pairs_found": len(hits),
        "precision": round(len(hits) / len(found), 4) if found else None,
        "recall": round(len(hits) / len(truth), 4) if truth else None,
        "recall_base_vs_copy_by_kind": by_kind,
    }


CROP_SWEEP = {  # name -> (left, top, right, bottom) share of the width/height cut away
    **{f"{f:g}_each_side": (f, f, f, f) for f in (0.01, 0.025, 0.05, 0.075, 0.1)},
    "0.05_left_and_top": (0.05, 0.05, 0, 0),
    "0.1_left": (0.1, 0, 0, 0),
}


def crop_sweep(folder, rows, n_bases=300):
    """How imgpipe's hashes tolerate crops: share of bases within DISTANCE of a crop of
    themselves, by the whole-picture hash alone and by imgpipe's (nearest of whole and
    center). Symmetric crops and, beyond what the center hash is for, one-sided ones."""
    bases = [folder / name for name, _, kind in rows if kind == "base"][:n_bases]
    paths = []
    for k, base in enumerate(bases):
        with Image.open(base) as image:
            for name, (left, top, right, bottom) in CROP_SWEEP.items():
                box = (round(image.width * left), round(image.height * top),
                       image.width - round(image.width * right), image.height - round(image.height * bottom))
                paths.append(folder / f"sweep_{k}_{name}.jpg")
                image.crop(box).save(paths[-1], quality=85)
    base_hashes = hash_images(bases, 2)
    crop_hashes = hash_images(paths, 2)
    whole, nearest = {}, {}
    for c, name in enumerate(CROP_SWEEP):
        pairs = [(base_hashes[b], crop_hashes[b * len(CROP_SWEEP) + c]) for b in range(len(bases))]
        whole[name] = round(float(np.mean([(a.whole ^ b.whole).bit_count() <= DISTANCE for a, b in pairs])), 3)
        nearest[name] = round(float(np.mean([hash_distance(a, b) <= DISTANCE for a, b in pairs])), 3)
    return {"whole_hash_only": whole, "imgpipe": nearest}


def _dedupe_default(key):
    schema = load_schema(Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    return schema["properties"]["dedupe"]["properties"][key]["default"]


def imgpipe_default_near_distance() -> int:
    return _dedupe_default("near_distance")


def default_near_pixel_difference() -> float:
    return _dedupe_default("near_pixel_difference")


def candidate_differences(files, hashes, pairs, distance):
    """Each pair's smallest pixel difference over the hypotheses (nearmatch.HYPOTHESES) whose
    hashes are within `distance` (nan where none is): how near the pair comes to confirmation."""
    table = np.array(hashes, dtype=np.uint64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    check = PixelCheck(255, 2)
    best = np.full(len(pairs), np.nan)
    for first, second in HYPOTHESES:
        within = np.flatnonzero(np.bitwise_count(table[pairs[:, 0], first] ^ table[pairs[:, 1], second]) <= distance)
        if len(within):
            found = check.differences([files[i] for i in pairs[within, 0]], [first] * len(within),
                                      [files[i] for i in pairs[within, 1]], [second] * len(within))
            best[within] = np.fmin(best[within], found)
    return best


def low_texture_figures(seed, base_vs_copy_max):
    """Part d: the generated distinct low-texture set through the real dedupe_images path."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-lowtexture-bench-") as tmp:
        started = time.perf_counter()
        written = write_low_texture_set(tmp, seed=seed)
        raw = pd.DataFrame({"file": [path for path, _ in written], "class": [label for _, label in written],
                            "sha256": [f"{k:064x}" for k in range(len(written))], "status": "ok",
                            "origin": [path for path, _ in written]})
        figures = {"images": len(raw), "images_by_class": raw["class"].value_counts().sort_index().to_dict(),
                   "seconds_to_write": round(time.perf_counter() - started, 1)}
        default_distance, default_pixels = imgpipe_default_near_distance(), default_near_pixel_difference()
        for name, distance, pixels in [("defaults", default_distance, default_pixels),
                                       ("near_distance_10", 10, default_pixels),
                                       ("hashes_only_at_default_distance", default_distance, 255)]:
            started = time.perf_counter()
            summary = summarize_fates(dedupe_images(raw, distance, near_pixel_difference=pixels, threads=2))
            figures[name] = {"near_distance": distance, "near_pixel_difference": pixels,
                             "dropped": summary["n_dropped"],
                             "cross_class_near": summary["dropped_cross_class_near"],
                             "near_duplicate": summary["dropped_near_duplicate"],
                             "seconds": round(time.perf_counter() - started, 2)}
        files = raw["file"].tolist()
        hashes = hash_images(files, 2)
        for distance in sorted({default_distance, 10}):
            pairs = group_pairs(hashes, distance)
            differences = candidate_differences(files, hashes, pairs[:, :2], distance)
            figures[f"candidates_within_{distance}"] = {
                "pairs": len(pairs),
                "min_pixel_difference": round(float(np.nanmin(differences)), 1) if len(pairs) else None,
                "pixel_difference_p1": round(float(np.nanpercentile(differences, 1)), 1) if len(pairs) else None,
            }
        figures["corpus_base_vs_copy_max_pixel_difference"] = base_vs_copy_max
        print(f"low texture: {figures}", file=sys.stderr, flush=True)
    return figures


def available(module):
    try:
        __import__(module)
        return True
    except Exception as exc:  # noqa: BLE001 - a broken optional install is reported, not fatal
        print(f"{module} unavailable: {exc}", file=sys.stderr)
        return False


def corpus_figures(n_images, seed, workers_list):
    figures = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-dedupe-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        rows = write_corpus(folder, n_images, seed, max(workers_list))
        names = [name for name, _, _ in rows]
        files = [str(folder / name) for name in names]
        groups = np.array([group for _, group, _ in rows])
        members = [np.flatnonzero(groups == g).tolist() for g in np.unique(groups)]
        truth = {(i, j) for group in members for i in group for j in group if i < j}
        pixels = [Image.open(f).size for f in files]
        figures["corpus"] = {
            "images": len(files),
            "groups": int(len(np.unique(groups))),
            "copies_by_kind": {k: sum(1 for r in rows if r[2] == k) for k in COPY_KINDS},
            "true_pairs": len(truth),
            "megapixels_mean": round(float(np.mean([w * h for w, h in pixels])) / 1e6, 2),
            "megabytes": round(sum(os.path.getsize(f) for f in files) / 2**20, 1),
            "seconds_to_write": round(time.perf_counter() - started, 1),
        }
        tools = {"imgpipe": lambda w: run_imgpipe(files, w)}
        if available("imagededup"):
            tools["imagededup_phash"] = lambda w: run_imagededup(folder, names, w)
        if available("imagehash"):
            tools["imagehash_phash_loop"] = lambda w: run_imagehash(files, w)
        hash_images(files[:20])  # warm imports and the page cache
        hashes = {}
        for tool, run in tools.items():
            row = {}
            for workers in workers_list:
                hash_s, search_s, found, hashes[tool] = run(workers)
                row[f"images_per_s_{workers}_workers"] = round(len(files) / hash_s, 1)
                row[f"search_s_{workers}_workers"] = round(search_s, 3)
            row |= quality(found, truth, rows)
            figures[tool] = row
            print(f"{tool}: {row}", file=sys.stderr, flush=True)
        # imgpipe again at its default dedupe.near_distance (the others' default is 10)
        default = imgpipe_default_near_distance()
        found = run_imgpipe(files, max(workers_list), default)[2]
        figures["imgpipe"]["at_default_near_distance"] = {"near_distance": default, **quality(found, truth, rows)}
        # Distinct bases that still hash close (by imgpipe's hashes): false pairs no tool can avoid.
        base_idx = [i for i, r in enumerate(rows) if r[2] == "base"]
        base_hashes = hash_images([files[i] for i in base_idx], 2)
        figures["corpus"]["distinct_base_pairs_within_10"] = len(group_pairs(base_hashes, DISTANCE))
        figures["corpus"]["min_distance_between_bases"] = int(group_pairs(base_hashes, 64)[:, 2].min())
        figures["recall_base_vs_crop"] = crop_sweep(folder, rows)
        # The pixel test's side of the margin: base against each copy (at its best hypothesis).
        all_hashes = hash_images(files, 2)
        base_of = {group: i for i, (_, group, kind) in enumerate(rows) if kind == "base"}
        copy_pairs = [(base_of[group], i) for i, (_, group, kind) in enumerate(rows) if kind != "base"]
        kinds = np.array([kind for _, _, kind in rows if kind != "base"])
        differences = candidate_differences(files, all_hashes, copy_pairs, DISTANCE)
        figures["imgpipe"]["base_vs_copy_pixel_difference_max_by_kind"] = {
            kind: round(float(np.nanmax(differences[kinds == kind])), 1) for kind in COPY_KINDS if (kinds == kind).any()
        }
        figures["imgpipe"]["base_vs_copy_pixel_difference_p99"] = round(float(np.nanpercentile(differences, 99)), 1)
        if "imagehash_phash_loop" in hashes:
            # Same pHash definition; imgpipe decodes JPEGs at reduced scale (and turns by EXIF).
            upright = [i for i, r in enumerate(rows) if r[2] != "exif_rotation"]
            moved = np.bitwise_count(hashes["imgpipe"][upright] ^ hashes["imagehash_phash_loop"][upright])
            figures["imgpipe_vs_imagehash_bits_differing"] = {
                "mean": round(float(moved.mean()), 2),
                "p95": int(np.percentile(moved, 95)),
                "max": int(moved.max()),
                "identical_share": round(float((moved == 0).mean()), 3),
            }
    if "imagededup_phash" in figures:
        speedup = {}
        for workers in workers_list:
            key = f"images_per_s_{workers}_workers"
            ratio = figures["imgpipe"][key] / figures["imagededup_phash"][key]
            speedup[f"{workers}_workers"] = round(ratio, 2)
        figures["imgpipe_hashing_speedup_over_imagededup"] = speedup
    return figures


# ---------------------------------------------------------------------- Hamming search


def planted_hashes(n, seed):
    """n uniformly random hashes; N_PLANTED of them replaced by copies of others at 0..10 bits."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    ends = rng.choice(n, 2 * N_PLANTED, replace=False)
    sources, targets = ends[:N_PLANTED], ends[N_PLANTED:]
    distances = np.arange(N_PLANTED) % (DISTANCE + 1)
    for source, target, d in zip(sources, targets, distances):
        mask = sum(1 << int(b) for b in rng.choice(64, size=int(d), replace=False))
        hashes[target] = hashes[source] ^ np.uint64(mask)
    planted = np.stack([np.minimum(sources, targets), np.maximum(sources, targets)], axis=1)
    return hashes, planted


def memory_mb(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def search_once(n, seed, brute_force, queue):
    hashes, planted = planted_hashes(n, seed)
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from here
    before = memory_mb("VmRSS")
    started = time.perf_counter()
    pairs = hamming_pairs(hashes, DISTANCE)
    seconds = time.perf_counter() - started
    peak = memory_mb("VmHWM")
    found = set(map(tuple, pairs[:, :2].tolist()))
    recomputed = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]])
    row = {
        "hashes": n,
        "chunks": choose_hamming_method(n, DISTANCE),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_above_inputs_mb": round(peak - before, 1),
        "pairs": len(pairs),
        "planted_pairs": len(planted),
        "planted_recall": sum(tuple(p) in found for p in planted.tolist()) / len(planted),
        "all_pairs_within_distance_and_distances_right": bool(
            (recomputed == pairs[:, 2]).all()
            and (pairs[:, 2] <= DISTANCE).all()
            and (pairs[:, 0] < pairs[:, 1]).all()
        ),
    }
    if brute_force:
        started = time.perf_counter()
        row["same_as_brute_force"] = bool(np.array_equal(hamming_pairs_brute_force(hashes, DISTANCE), pairs))
        row["brute_force_s"] = round(time.perf_counter() - started, 1)
    queue.put(row)


def image_search_once(n_images, seed, distance, queue):
    """What dedupe searches for n_images: two hashes each (whole, center), paired by owner."""
    hashes, _ = planted_hashes(2 * n_images, seed)
    owners = np.arange(2 * n_images) // 2
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    pairs = owner_pairs(hashes, owners, distance)
    queue.put({"images": n_images, "hashes": 2 * n_images, "max_distance": distance,
               "seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(memory_mb("VmHWM"), 1),
               "image_pairs": len(pairs)})


def image_search_figures(sizes, seed):
    rows = []
    context = multiprocessing.get_context("spawn")
    for n in sizes:
        for distance in sorted({DISTANCE, imgpipe_default_near_distance()}):
            queue = context.Queue()
            process = context.Process(target=image_search_once, args=(n, seed, distance, queue))
            process.start()
            rows.append(queue.get())
            process.join()
            print(f"image search: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def search_figures(sizes, seed, brute_force_up_to):
    rows = []
    context = multiprocessing.get_context("spawn")  # a fresh process: peak memory of this size alone
    for n in sizes:
        queue = context.Queue()
        process = context.Process(target=search_once, args=(n, seed, n <= brute_force_up_to, queue))
        process.start()
        rows.append(queue.get())
        process.join()
        print(f"search: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def pixel_test_figures(n_pairs, seed, threads_list):
    """Part e: pixel-test throughput. Candidate pairs of the low-texture set (hash distance 8,
    every hypothesis within it tested, as dedupe does), repeated to `n_pairs`; thumbnails
    decoded first, so this is the comparison alone: pairs/s per thread count."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-pixel-bench-") as tmp:
        files = [path for path, _ in write_low_texture_set(tmp, seed=seed)]
        hashes = np.array(hash_images(files, 2), dtype=np.uint64)
        pairs = group_pairs(hashes, 8)[:, :2]
        pairs = pairs[np.arange(n_pairs) % len(pairs)]
        first, second = [files[a] for a in pairs[:, 0]], [files[b] for b in pairs[:, 1]]
        out = {"pairs": int(n_pairs), "distinct_candidate_pairs": int(len(set(map(tuple, pairs.tolist()))))}
        for threads in threads_list:
            check = PixelCheck(threads=threads)
            confirm(hashes[pairs[:1, 0]], hashes[pairs[:1, 1]], first[:1], second[:1], 8, check)
            check.differences(first, [0] * len(first), second, [0] * len(second))  # decode all first
            started = time.perf_counter()
            confirm(hashes[pairs[:, 0]], hashes[pairs[:, 1]], first, second, 8, check)
            out[f"pairs_per_s_{threads}_threads"] = round(n_pairs / (time.perf_counter() - started), 1)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000, help="corpus size (0: skip part a)")
    parser.add_argument(
        "--hashes", type=int, nargs="*", default=[100_000, 1_000_000], help="search sizes (b; none: skip)"
    )
    parser.add_argument(
        "--image-search", type=int, nargs="*", default=[1_000_000],
        help="images whose two hashes each are searched as dedupe does (c; none: skip)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-low-texture", action="store_true", help="skip part d")
    parser.add_argument(
        "--brute-force-up-to", type=int, default=100_000, help="brute-force check up to this size"
    )
    parser.add_argument("--pixel-pairs", type=int, default=0, help="pairs pixel-tested for part e (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    figures = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "max_distance": DISTANCE}
    if args.images:
        figures |= corpus_figures(args.images, args.seed, args.workers)
    if not args.no_low_texture:
        by_kind = figures.get("imgpipe", {}).get("base_vs_copy_pixel_difference_max_by_kind", {})
        figures["low_texture"] = low_texture_figures(args.seed, max(by_kind.values(), default=None))
    if args.hashes:
        figures["hamming_search"] = search_figures(args.hashes, args.seed, args.brute_force_up_to)
    if args.image_search:
        figures["image_search"] = image_search_figures(args.image_search, args.seed)
    if args.pixel_pairs:
        figures["pixel_test"] = pixel_test_figures(args.pixel_pairs, args.seed, args.workers)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

"""How fast is dedupe on a large crawl? Prints JSON.

- hashing: images/s for JPEG photos of crawl-like sizes, with and without decoding at
  reduced scale (Image.draft), on 1 and 2 threads, and how far draft moves the hashes;
- Hamming search: all pairs within d among 100k random hashes with planted near pairs,
  by `hamming_pairs` (method chosen by its cost model), by multi-index hashing with d + 1
  chunks (exact agreement on a chunk), and by brute force in vectorised blocks.

    PYTHONPATH=src .venv/bin/python bench/dedupe_speed.py
"""

import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from sklearn.datasets import load_sample_images

from imgpipe.hamming import choose_hamming_method, hamming_pairs, hamming_pairs_brute_force, hamming_pairs_multi_index
from imgpipe.hashing import hash_images

N_JPEGS = 120
JPEG_SIZES = [(640, 480), (1024, 768), (1600, 1200)]
N_HASHES = 100_000
N_PLANTED = 2_000
DISTANCES = [6, 8, 10, 12]
rng = np.random.default_rng(0)


def write_jpegs(folder):
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    paths = []
    for i in range(N_JPEGS):
        size = JPEG_SIZES[i % len(JPEG_SIZES)]
        image = photos[i % 2].resize(size, Image.Resampling.BILINEAR)
        noise = rng.normal(0, 6, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        paths.append(str(folder / f"photo_{i}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def hashing_figures():
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp))
        hash_images(paths[:5])  # warm caches and imports
        figures = {
            "jpegs": N_JPEGS,
            "sizes": [f"{w}x{h}" for w, h in JPEG_SIZES],
            "cpu_count": os.cpu_count(),
        }
        with mock.patch.object(JpegImageFile, "draft", lambda self, mode, size: None):
            full, seconds = timed(hash_images, paths, 1)
        figures["images_per_s_without_draft_1_thread"] = round(N_JPEGS / seconds, 1)
        for threads in (1, 2):
            drafted, seconds = timed(hash_images, paths, threads)
            figures[f"images_per_s_with_draft_{threads}_threads"] = round(N_JPEGS / seconds, 1)
        moved = [(a ^ b).bit_count() for a, b in zip(full, drafted)]
        figures["draft_vs_full_decode_distance"] = {
            "mean": round(float(np.mean(moved)), 2),
            "max": int(np.max(moved)),
        }
    return figures


def planted_hashes():
    hashes = rng.integers(0, 2**64, size=N_HASHES, dtype=np.uint64)
    sources = rng.choice(N_HASHES, N_PLANTED, replace=False)
    targets = rng.choice(np.setdiff1d(np.arange(N_HASHES), sources), N_PLANTED, replace=False)
    for source, target in zip(sources, targets):
        value = int(hashes[source])
        for bit in rng.choice(64, size=rng.integers(0, 13), replace=False):
            value ^= 1 << int(bit)
        hashes[target] = value
    return hashes


def hamming_figures():
    hashes = planted_hashes()
    figures = {"hashes": N_HASHES, "planted_near_pairs": N_PLANTED, "by_distance": []}
    auto_pairs = {}
    for d in DISTANCES:
        auto_pairs[d], auto_s = timed(hamming_pairs, hashes, d)
        row = {
            "max_distance": d,
            "pairs": len(auto_pairs[d]),
            "auto_chunks": choose_hamming_method(N_HASHES, d),
            "auto_s": round(auto_s, 2),
        }
        if d <= 10:
            exact_chunk, exact_chunk_s = timed(hamming_pairs_multi_index, hashes, d, d + 1)
            row["chunks_d_plus_1_s"] = round(exact_chunk_s, 2)
            row["chunks_d_plus_1_same_pairs"] = bool(np.array_equal(exact_chunk, auto_pairs[d]))
        figures["by_distance"].append(row)
    d = 10
    brute, brute_s = timed(hamming_pairs_brute_force, hashes, d)
    figures["brute_force"] = {
        "max_distance": d,
        "seconds": round(brute_s, 2),
        "same_pairs_as_auto": bool(np.array_equal(brute, auto_pairs[d])),
    }
    return figures


def main():
    print(json.dumps({"hashing": hashing_figures(), "hamming_pairs": hamming_figures()}, indent=1))


if __name__ == "__main__":
    main()

"""What each dedupe speed-up buys, one at a time. Prints JSON.

bench/dedupe.py has the headline figures (images/s on 1 and 2 workers against imagededup
and imagehash, precision and recall, 1M-hash search time and memory, equality with brute
force); this adds the ablations behind them, on the same generated photos and planted
hashes:

- hashing: images/s on 1 thread with and without decoding JPEGs at reduced scale
  (Image.draft), and how far draft moves the hashes;
- Hamming search: all pairs within d among 100k random hashes with planted near pairs,
  for several d, by `hamming_pairs` (chunks chosen by its cost model, and the model's
  estimate) and by multi-index hashing with d + 1 chunks (exact agreement on a chunk).

    PYTHONPATH=src .venv/bin/python bench/dedupe_speed.py
"""

import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from dedupe import planted_hashes, write_corpus
from PIL.JpegImagePlugin import JpegImageFile

from imgpipe.data.hamming import _multi_index_cost, choose_hamming_method, hamming_pairs, hamming_pairs_multi_index
from imgpipe.data.hashing import hash_images

N_JPEGS = 300
N_HASHES = 100_000
DISTANCES = [4, 6, 8, 10, 12]


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def hashing_figures():
    with tempfile.TemporaryDirectory() as tmp:
        rows = write_corpus(Path(tmp), N_JPEGS, seed=1, workers=2)
        paths = [str(Path(tmp) / name) for name, _, _ in rows]
        hash_images(paths[:5])  # warm caches and imports
        figures = {"jpegs": N_JPEGS, "cpu_count": os.cpu_count()}
        with mock.patch.object(JpegImageFile, "draft", lambda self, mode, size: None):
            full, seconds = timed(hash_images, paths, 1)
        figures["images_per_s_without_draft_1_thread"] = round(N_JPEGS / seconds, 1)
        drafted, seconds = timed(hash_images, paths, 1)
        figures["images_per_s_with_draft_1_thread"] = round(N_JPEGS / seconds, 1)
        moved = [(a.whole ^ b.whole).bit_count() for a, b in zip(full, drafted)]
        figures["draft_vs_full_decode_distance"] = {
            "mean": round(float(np.mean(moved)), 2),
            "max": int(np.max(moved)),
        }
    return figures


def hamming_figures():
    hashes, _ = planted_hashes(N_HASHES, seed=0)
    figures = {"hashes": N_HASHES, "by_distance": []}
    for d in DISTANCES:
        auto, auto_s = timed(hamming_pairs, hashes, d)
        chunks = choose_hamming_method(N_HASHES, d)
        row = {
            "max_distance": d,
            "pairs": len(auto),
            "auto_chunks": chunks,
            "auto_s": round(auto_s, 2),
            "auto_model_s": round(_multi_index_cost(N_HASHES, d, chunks), 2) if chunks else None,
        }
        exact_chunk, exact_chunk_s = timed(hamming_pairs_multi_index, hashes, d, d + 1)
        row["chunks_d_plus_1_s"] = round(exact_chunk_s, 2)
        row["chunks_d_plus_1_same_pairs"] = bool(np.array_equal(exact_chunk, auto))
        figures["by_distance"].append(row)
    return figures


def main():
    print(json.dumps({"hashing": hashing_figures(), "hamming_pairs": hamming_figures()}, indent=1))


if __name__ == "__main__":
    main()

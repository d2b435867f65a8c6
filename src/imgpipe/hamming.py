"""All pairs of 64-bit hashes within a Hamming distance: brute force, or multi-index hashing.

Multi-index hashing splits the 64 bits into chunks; by the pigeonhole principle two hashes
within distance r agree within floor(r / chunks) bits on at least one chunk, so candidates
come from exact chunk lookups (with bit flips) and are then verified. It returns exactly
what a brute-force comparison would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from itertools import combinations
from math import comb

import numpy as np

from imgpipe.hashing import HASH_BITS

log = logging.getLogger(__name__)


def _as_hash_array(hashes: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.asarray(hashes, dtype=np.uint64).ravel()


def _check_distance(max_distance: int) -> None:
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")


def _empty_pairs() -> np.ndarray:
    return np.empty((0, 3), dtype=np.int64)


def _sorted_unique_pairs(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Stack (i, j, d) blocks, drop repeats, sort by (i, j)."""
    if not parts:
        return _empty_pairs()
    pairs = np.concatenate(parts)
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]


def hamming_pairs_brute_force(hashes: Sequence[int] | np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i, j, distance), i < j, with Hamming distance <= max_distance.

    Compares every pair, a block of rows at a time. Returns an int64 array of shape
    (k, 3) sorted by (i, j).
    """
    _check_distance(max_distance)
    h = _as_hash_array(hashes)
    n = len(h)
    rows = max(1, _BRUTE_FORCE_BLOCK // max(n, 1))
    parts = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        dist = np.bitwise_count(h[start:stop, None] ^ h[None, start:])
        ii, jj = np.nonzero(dist <= max_distance)
        upper = jj > ii
        ii, jj = ii[upper], jj[upper]
        parts.append(np.stack([ii + start, jj + start, dist[ii, jj]], axis=1).astype(np.int64))
    return _sorted_unique_pairs(parts, n)


def _chunk_widths(n_chunks: int) -> list[int]:
    base, extra = divmod(HASH_BITS, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


def _chunk_radius(max_distance: int, n_chunks: int) -> int:
    """Largest per-chunk distance that must be searched (pigeonhole).

    If every one of `n_chunks` chunks differed in more than r bits, the hashes would
    differ in at least n_chunks * (r + 1) bits; so with n_chunks * (r + 1) > d, any pair
    within d is within r on at least one chunk.
    """
    return -(-(max_distance + 1) // n_chunks) - 1


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every `width`-bit mask with at most `radius` bits set, 0 first."""
    return [
        sum(1 << b for b in bits)
        for r in range(min(radius, width) + 1)
        for bits in combinations(range(width), r)
    ]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of range(s, s + l) for every (s, l), vectorised."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())


def _verified_pairs(
    h: np.ndarray,
    order: np.ndarray,
    left: np.ndarray,
    partner_start: np.ndarray,
    partner_len: np.ndarray,
    max_distance: int,
) -> list[np.ndarray]:
    """Check each sorted position in `left` against its partner run of positions.

    Candidates are expanded a batch at a time so memory stays bounded however large a
    bucket is.
    """
    parts = []
    ends = np.cumsum(partner_len)
    cuts = np.searchsorted(ends, np.arange(_CANDIDATE_BATCH, ends[-1], _CANDIDATE_BATCH), "right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(left)]]))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        counts = partner_len[lo:hi]
        i = order[np.repeat(left[lo:hi], counts)]
        j = order[_ranges(partner_start[lo:hi], counts)]
        dist = np.bitwise_count(h[i] ^ h[j])
        hit = dist <= max_distance
        i, j, dist = i[hit], j[hit], dist[hit]
        parts.append(np.stack([np.minimum(i, j), np.maximum(i, j), dist], axis=1).astype(np.int64))
    return parts


def hamming_pairs_multi_index(
    hashes: Sequence[int] | np.ndarray, max_distance: int, n_chunks: int
) -> np.ndarray:
    """Same answer as `hamming_pairs_brute_force`, by multi-index hashing.

    The 64 bits are split into `n_chunks` chunks. By pigeonhole, two hashes within
    `max_distance` are within r = ceil((d + 1) / n_chunks) - 1 bits of each other on at
    least one chunk. For each chunk, hashes are bucketed by chunk value and each bucket
    is matched against the buckets whose value differs in at most r bits; the
    candidates are then verified on all 64 bits. n_chunks = d + 1 gives r = 0: pairs
    must agree exactly on a chunk.
    """
    _check_distance(max_distance)
    if not 1 <= n_chunks <= HASH_BITS:
        raise ValueError(f"n_chunks must be in 1..{HASH_BITS}, got {n_chunks}")
    h = _as_hash_array(hashes)
    n = len(h)
    radius = _chunk_radius(max_distance, n_chunks)
    parts: list[np.ndarray] = []
    shift = 0
    for width in _chunk_widths(n_chunks):
        keys = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(keys, kind="stable")
        uniq, run_start, run_len = np.unique(keys[order], return_index=True, return_counts=True)
        for flip in _flip_masks(width, radius):
            if flip == 0:
                # Within a bucket: each position against the positions after it.
                run_end = np.repeat(run_start + run_len, run_len)
                left = np.arange(n)
                partner_start, partner_len = left + 1, run_end - left - 1
            else:
                # Bucket u against bucket u ^ flip, once per unordered pair (u < v).
                target = uniq ^ np.uint64(flip)
                at = np.minimum(np.searchsorted(uniq, target), len(uniq) - 1)
                hit = (uniq[at] == target) & (uniq < target)
                u, v = np.nonzero(hit)[0], at[hit]
                left = _ranges(run_start[u], run_len[u])
                partner_start = np.repeat(run_start[v], run_len[u])
                partner_len = np.repeat(run_len[v], run_len[u])
            some = partner_len > 0
            if some.any():
                parts += _verified_pairs(
                    h, order, left[some], partner_start[some], partner_len[some], max_distance
                )
    return _sorted_unique_pairs(parts, n)


# Cost model for choosing a method, in seconds per unit of work, measured on the
# 2-core development machine (bench/dedupe_speed.py); only their ratios matter.
_COST_PER_BRUTE_FORCE_PAIR = 6e-9
_COST_PER_CANDIDATE = 2.1e-8
_COST_PER_PROBE_ELEMENT = 5.5e-8
_BRUTE_FORCE_BLOCK = 1 << 20  # hash comparisons per block of rows
_CANDIDATE_BATCH = 1 << 22  # candidate pairs verified per batch


def _multi_index_cost(n: int, max_distance: int, n_chunks: int) -> float:
    """Expected seconds for `n` uniformly random hashes."""
    radius = _chunk_radius(max_distance, n_chunks)
    cost = 0.0
    for width in _chunk_widths(n_chunks):
        probes = sum(comb(width, r) for r in range(min(radius, width) + 1))
        candidates = n * n / 2 * probes / 2**width
        cost += probes * n * _COST_PER_PROBE_ELEMENT + candidates * _COST_PER_CANDIDATE
    return cost


def choose_hamming_method(n: int, max_distance: int) -> int | None:
    """Number of chunks for multi-index hashing, or None where brute force is cheaper."""
    brute_force = n * n / 2 * _COST_PER_BRUTE_FORCE_PAIR
    costs = {m: _multi_index_cost(n, max_distance, m) for m in range(1, min(max_distance + 1, HASH_BITS) + 1)}
    best = min(costs, key=costs.get)
    return best if costs[best] < brute_force else None


def hamming_pairs(hashes: Sequence[int] | np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs of hashes within `max_distance` bits: int64 rows (i, j, distance).

    i < j index into `hashes`; rows are sorted by (i, j); max_distance 0 finds identical
    hashes. Uses multi-index hashing with the number of chunks that a cost model says is
    fastest, or brute force where that is cheaper (large distances); the answer is the
    same either way.
    """
    _check_distance(max_distance)
    h = _as_hash_array(hashes)
    n_chunks = choose_hamming_method(len(h), max_distance)
    if n_chunks is None:
        return hamming_pairs_brute_force(h, max_distance)
    return hamming_pairs_multi_index(h, max_distance, n_chunks)


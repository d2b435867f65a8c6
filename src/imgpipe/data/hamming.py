"""All pairs of 64-bit hashes within a Hamming distance: brute force, or multi-index hashing.

Multi-index hashing splits the 64 bits into chunks, each with a search radius r_c, such
that sum(r_c + 1) = max_distance + 1. By the pigeonhole principle two hashes within the
distance are within r_c bits of each other on at least one chunk c, so the candidates
are the pairs whose chunk values differ in at most r_c bits; they are then verified on
all 64 bits. It returns exactly what a brute-force comparison would.

A chunk of w <= `_DENSE_MAX_BITS` bits with r_c > 0 is searched with tables over all
2**w chunk values: an occupancy bitmap, 32 other bits of each value's first hash, and
where each value's run starts among the hashes sorted by chunk. For each flip mask f
(at most r_c bits), the values u with u and u ^ f both occupied come from AND-ing the
bitmap with itself permuted by f, 64 values per machine word, and each such pair of
values is checked in numpy without Python loops; hashes that share a chunk value with
an earlier one look up u ^ f one by one. Each pair of values is produced once per chunk
(u has the top bit of f clear), so no candidate is verified twice within a chunk. Memory
is about 14 bytes per chunk value plus 32 bytes per hash, one chunk at a time (logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import combinations
from math import comb

import numpy as np

from imgpipe.data.hashing import HASH_BITS

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


def _chunk_radii(max_distance: int, n_chunks: int) -> list[int]:
    """Search radius of each chunk: sum(r + 1) == max_distance + 1, as even as can be.

    If every chunk c differed in more than r_c bits, the hashes would differ in at least
    sum(r_c + 1) = max_distance + 1 bits; so any pair within max_distance is within r_c
    on some chunk c. A radius of -1 means the chunk need not be searched at all.
    """
    radius = -(-(max_distance + 1) // n_chunks) - 1
    spare = n_chunks * (radius + 1) - (max_distance + 1)
    return [radius] * (n_chunks - spare) + [radius - 1] * spare


def _flip_count(width: int, radius: int) -> int:
    """Values within `radius` bits of a `width`-bit value (itself included)."""
    return sum(comb(width, r) for r in range(min(radius, width) + 1)) if radius >= 0 else 0


def _chunk_cost(n: int, width: int, radius: int) -> float:
    """Expected seconds to search one chunk among `n` uniformly random hashes."""
    if radius < 0:
        return 0.0
    values = 2.0**width
    flips = _flip_count(width, radius) - 1
    # Pairs of hashes within `radius` on the chunk: the candidates.
    cost = n * _COST_PER_HASH_SORTED + n * n / 2 * (flips + 1) / values * _COST_PER_CANDIDATE
    if flips == 0:
        return cost
    if width > _DENSE_MAX_BITS:
        return cost + flips * n / 2 * _COST_PER_SORTED_PROBE
    later = n - values * -np.expm1(-n / values)  # hashes after the first of their value
    # Lookups slow down once the tables outgrow the caches (measured at 22 and 23 bits).
    slowdown = 1 + _CACHE_SLOWDOWN * max(0, width - 21) ** 2
    return cost + values * _COST_PER_TABLE_VALUE + slowdown * flips * (
        _COST_PER_FLIP + max(1.0, values / 128) * _COST_PER_BITMAP_WORD + later * _COST_PER_LATER_PROBE
    )


def _chunk_layout(n: int, max_distance: int, n_chunks: int) -> list[tuple[int, int]]:
    """(width, radius) of each chunk: widths add up to 64 and minimise the modelled cost.

    Chunks of the smaller radius may be narrower or wider than the others; the rest share
    the remaining bits evenly. Chunks that need no search get no bits.
    """
    radii = _chunk_radii(max_distance, n_chunks)
    big, small = radii[0], radii[-1]
    n_big = radii.count(big)
    n_small = n_chunks - n_big

    def widths(small_width: int) -> list[int]:
        base, extra = divmod(HASH_BITS - n_small * small_width, n_big)
        return [base + 1] * extra + [base] * (n_big - extra) + [small_width] * n_small

    if n_small == 0 or small < 0:
        options = [widths(0)]
    else:
        options = [widths(w) for w in range(1, (HASH_BITS - n_big) // n_small + 1)]
    best = min(options, key=lambda ws: sum(_chunk_cost(n, w, r) for w, r in zip(ws, radii)))
    return list(zip(best, radii))


def _flip_masks(width: int, radius: int) -> Iterator[tuple[int, int]]:
    """(top bit, mask) for every nonzero `width`-bit mask with at most `radius` bits set."""
    for top in range(width):
        for r in range(min(radius - 1, top) + 1):
            for bits in combinations(range(top), r):
                yield top, (1 << top) | sum(1 << b for b in bits)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of range(s, s + l) for every (s, l), vectorised."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())


class _SortedChunk:
    """Hashes sorted by one chunk's value, and checks of pairs of sorted positions."""

    def __init__(self, h: np.ndarray, shift: int, width: int):
        self.keys = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        if width <= 32:
            self.keys = self.keys.astype(np.uint32)
        self.order = np.argsort(self.keys, kind="stable")
        self.keys = self.keys[self.order]
        self.hashes = h[self.order]

    def verify(
        self, left: np.ndarray, partner_start: np.ndarray, partner_len: np.ndarray, max_distance: int
    ) -> list[np.ndarray]:
        """Check each sorted position in `left` against its partner run of positions.

        Candidates are expanded a batch at a time so memory stays bounded however large a
        bucket is.
        """
        some = partner_len > 0
        left, partner_start, partner_len = left[some], partner_start[some], partner_len[some]
        if not len(left):
            return []
        parts = []
        ends = np.cumsum(partner_len)
        cuts = np.searchsorted(ends, np.arange(_CANDIDATE_BATCH, ends[-1], _CANDIDATE_BATCH), "right")
        bounds = np.unique(np.concatenate([[0], cuts, [len(left)]]))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            counts = partner_len[lo:hi]
            i = np.repeat(left[lo:hi], counts)
            j = _ranges(partner_start[lo:hi], counts)
            parts += self.hits(i, j, max_distance)
        return parts

    def hits(self, i: np.ndarray, j: np.ndarray, max_distance: int) -> list[np.ndarray]:
        """(original i, original j, distance) rows of the sorted positions within distance."""
        dist = np.bitwise_count(self.hashes[i] ^ self.hashes[j])
        hit = np.flatnonzero(dist <= max_distance)
        if not len(hit):
            return []
        a, b = self.order[i[hit]], self.order[j[hit]]
        return [np.stack([np.minimum(a, b), np.maximum(a, b), dist[hit]], axis=1).astype(np.int64)]

    def pairs_within_runs(
        self, starts: np.ndarray, lengths: np.ndarray, max_distance: int
    ) -> list[np.ndarray]:
        """Pairs of positions that share a chunk value (runs given by starts, lengths)."""
        run_end = np.repeat(starts + lengths, lengths)
        left = _ranges(starts, lengths)
        return self.verify(left, left + 1, run_end - left - 1, max_distance)


# Masks of the bits of a 64-bit word whose index has bit k clear, k = 0..5.
_HALF_MASKS = [
    np.uint64(m)
    for m in (
        0x5555555555555555,
        0x3333333333333333,
        0x0F0F0F0F0F0F0F0F,
        0x00FF00FF00FF00FF,
        0x0000FFFF0000FFFF,
        0x00000000FFFFFFFF,
    )
]
_ONE = np.uint64(1)


def _permute_bits(words: np.ndarray, low_flip: int) -> np.ndarray:
    """Bit b of each result word is bit b ^ low_flip of the word (low_flip < 64)."""
    for k in range(6):
        if low_flip >> k & 1:
            shift, mask = np.uint64(1 << k), _HALF_MASKS[k]
            words = ((words & mask) << shift) | ((words >> shift) & mask)
    return words


def _set_bits(words: np.ndarray, word_index: np.ndarray) -> np.ndarray:
    """Indices (word_index * 64 + bit) of the set bits of a bitmap given as uint64 words."""
    nonzero = np.flatnonzero(words != 0)
    words, base = words[nonzero], word_index[nonzero].astype(np.int64) << 6
    out = []
    while len(words):
        lowest = words & (~words + _ONE)
        out.append(base + np.bitwise_count(lowest - _ONE))
        words = words & (words - _ONE)
        left = np.flatnonzero(words != 0)
        words, base = words[left], base[left]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _bitmap(flags: np.ndarray) -> np.ndarray:
    """Booleans packed into uint64 words: flag k is bit k % 64 of word k // 64."""
    packed = np.packbits(flags, bitorder="little")
    return np.concatenate([packed, np.zeros(-len(packed) % 8, dtype=np.uint8)]).view("<u8")


def _rest_bits(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    """32 of the bits outside the chunk [shift, shift + width), as uint32 (width <= 32)."""
    turn = (shift + width) % HASH_BITS
    rotated = (h >> np.uint64(turn)) | (h << np.uint64(HASH_BITS - turn)) if turn else h
    return (rotated & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _dense_chunk_pairs(
    chunk: _SortedChunk, shift: int, width: int, radius: int, max_distance: int
) -> list[np.ndarray]:
    """Pairs within max_distance among those within `radius` on this chunk: dense tables.

    Pairs of elements of chunk values u and v = u ^ flip come in three kinds: the first
    elements of both (found through the occupancy bitmap, once per pair of values), an
    element after the first of its value against the first of the other (each such
    element looks the other value up), and two elements after the first (looked up
    from u's side only). A first check on 32 bits outside the chunk (the chunk bits
    differ in exactly the flip's bits) leaves few candidates for the full 64-bit one.
    """
    size = 1 << width
    keys = chunk.keys
    counts = np.bincount(keys, minlength=size)
    start = np.zeros(size + 1, dtype=np.int64 if len(keys) >= 2**31 else np.int32)
    np.cumsum(counts, out=start[1:])
    multiple = counts > 1
    parts = chunk.pairs_within_runs(start[:-1][multiple], counts[multiple], max_distance)
    del multiple
    occupied = counts > 0
    count8 = np.minimum(counts, 255).astype(np.uint8)
    del counts
    rest = _rest_bits(chunk.hashes, shift, width)
    first_pos = start[:-1][occupied]
    first_rest = np.zeros(size, dtype=np.uint32)
    first_rest[keys[first_pos]] = rest[first_pos]
    is_extra = np.ones(len(keys), dtype=bool)
    is_extra[first_pos] = False
    extra = np.flatnonzero(is_extra)
    extra_keys, extra_rest = keys[extra].astype(np.intp), rest[extra]
    del is_extra, first_pos, rest
    occ = _bitmap(occupied)
    del occupied
    all_words = np.arange(len(occ))
    current_top = -1
    for top, flip in _flip_masks(width, radius):
        budget = max_distance - flip.bit_count()
        if top != current_top:
            # Values u with the top bit of the flip clear: (u, u ^ flip) once per pair.
            current_top = top
            if top < 6:
                words, low_mask = all_words, _HALF_MASKS[top]
            else:
                words, low_mask = all_words[(all_words >> (top - 6)) & 1 == 0], None
            occ_u = occ[words]
            extra_u = (extra_keys >> top) & 1 == 0
        # First elements of both values.
        high, low = flip >> 6, flip & 63
        both = occ_u & _permute_bits(occ[words ^ high] if high else occ_u, low)
        if low_mask is not None:
            both &= low_mask
        u = _set_bits(both, words)
        if len(u):
            v = u ^ flip
            close = np.bitwise_count(np.take(first_rest, u) ^ np.take(first_rest, v)) <= budget
            close = np.flatnonzero(close)
            if len(close):
                parts += chunk.hits(start[u[close]], start[v[close]], max_distance)
        if not len(extra):
            continue
        # Later elements against the first of the other value.
        target = extra_keys ^ flip
        found_count = np.take(count8, target)
        found = np.flatnonzero(found_count != 0)
        close = found[np.bitwise_count(extra_rest[found] ^ np.take(first_rest, target[found])) <= budget]
        if len(close):
            parts += chunk.hits(extra[close], start[target[close]], max_distance)
        # Later elements of both.
        later = np.flatnonzero((found_count > 1) & extra_u)
        if len(later):
            value = target[later]
            value_len = start[value + 1] - start[value]
            parts += chunk.verify(extra[later], start[value] + 1, value_len - 1, max_distance)
    return parts


def _sparse_chunk_pairs(chunk: _SortedChunk, width: int, radius: int, max_distance: int) -> list[np.ndarray]:
    """Same as `_dense_chunk_pairs` without tables (radius 0, or chunks too wide for them).

    Pairs within a run of equal chunk values, then for each flip, each run whose value
    has the flip's top bit clear against the run of its value ^ flip (binary search).
    """
    keys = chunk.keys
    run_start = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    run_len = np.diff(np.append(run_start, len(keys)))
    uniq = keys[run_start]
    parts = chunk.pairs_within_runs(run_start[run_len > 1], run_len[run_len > 1], max_distance)
    dtype = uniq.dtype.type
    current_top = -1
    for top, flip in _flip_masks(width, radius):
        if top != current_top:
            current_top = top
            clear = np.flatnonzero(uniq & dtype(1 << top) == 0)
        target = uniq[clear] ^ dtype(flip)
        at = np.minimum(np.searchsorted(uniq, target), len(uniq) - 1)
        found = uniq[at] == target
        u, v = clear[found], at[found]
        left = _ranges(run_start[u], run_len[u])
        partner_start, partner_len = np.repeat(run_start[v], run_len[u]), np.repeat(run_len[v], run_len[u])
        parts += chunk.verify(left, partner_start, partner_len, max_distance)
    return parts


def hamming_pairs_multi_index(
    hashes: Sequence[int] | np.ndarray, max_distance: int, n_chunks: int
) -> np.ndarray:
    """Same answer as `hamming_pairs_brute_force`, by multi-index hashing.

    The 64 bits are split into `n_chunks` chunks with radii r_c, sum(r_c + 1) =
    max_distance + 1 (so r_c = ceil((d + 1) / n_chunks) - 1 or one less, -1 meaning the
    chunk is not searched); two hashes within `max_distance` are within r_c bits of each
    other on at least one chunk c. For each chunk, the pairs of hashes whose chunk values
    differ in at most r_c bits are the candidates, verified on all 64 bits. Widths are
    chosen by the cost model; n_chunks = d + 1 gives r = 0: pairs must agree exactly on
    a chunk.
    """
    _check_distance(max_distance)
    if not 1 <= n_chunks <= HASH_BITS:
        raise ValueError(f"n_chunks must be in 1..{HASH_BITS}, got {n_chunks}")
    h = _as_hash_array(hashes)
    n = len(h)
    started = time.perf_counter()
    layout = _chunk_layout(n, max_distance, n_chunks)
    parts: list[np.ndarray] = []
    shift = 0
    for width, radius in layout:
        if radius >= 0 and n > 1:
            chunk = _SortedChunk(h, shift, width)
            if radius > 0 and width <= _DENSE_MAX_BITS:
                parts += _dense_chunk_pairs(chunk, shift, width, radius, max_distance)
            else:
                parts += _sparse_chunk_pairs(chunk, width, radius, max_distance)
            del chunk
        shift += width
    pairs = _sorted_unique_pairs(parts, n)
    log.log(
        logging.INFO if n >= 100_000 else logging.DEBUG,
        "%d pairs within %d bits among %d hashes in %.1f s: multi-index, chunks (bits, radius) %s, ~%.0f MB",
        len(pairs), max_distance, n, time.perf_counter() - started,
        " ".join(f"{w}/{r}" for w, r in layout), _search_bytes(n, layout) / 2**20,
    )
    return pairs


def _search_bytes(n: int, layout: list[tuple[int, int]]) -> float:
    """Rough peak memory of a multi-index search: the largest chunk's tables and arrays."""
    per_chunk = [
        n * 32 + (2**w * 14 if 0 < r and w <= _DENSE_MAX_BITS else 0) for w, r in layout if r >= 0
    ]
    return max(per_chunk, default=0)


# Cost model for choosing a method, in seconds per unit of work, fitted to timings on the
# 2-core development machine (n = 2e4..1e6, max_distance 0..16); only their ratios matter.
_COST_PER_BRUTE_FORCE_PAIR = 3.6e-9
_COST_PER_CANDIDATE = 1e-8
_COST_PER_HASH_SORTED = 1.2e-7
_COST_PER_TABLE_VALUE = 1.3e-8
_COST_PER_BITMAP_WORD = 4e-9
_COST_PER_FLIP = 2.7e-4
_COST_PER_LATER_PROBE = 2.2e-8
_COST_PER_SORTED_PROBE = 3.2e-8
_CACHE_SLOWDOWN = 0.1
_BRUTE_FORCE_BLOCK = 1 << 20  # hash comparisons per block of rows
_CANDIDATE_BATCH = 1 << 22  # candidate pairs verified per batch
_DENSE_MAX_BITS = 24  # widest chunk searched with dense tables (~6 bytes per value)


def _multi_index_cost(n: int, max_distance: int, n_chunks: int) -> float:
    """Expected seconds for `n` uniformly random hashes."""
    return sum(_chunk_cost(n, w, r) for w, r in _chunk_layout(n, max_distance, n_chunks))


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


def owner_pairs(hashes: Sequence[int] | np.ndarray, owners: Sequence[int] | np.ndarray,
                max_distance: int) -> np.ndarray:
    """All pairs of owners with any hash of one within `max_distance` bits of any of the other.

    An owner (an image) may have several hashes: ``owners[k]`` owns ``hashes[k]``. Rows
    are (a, b, distance) with a < b, the distance the smallest between their hashes,
    sorted by (a, b); an owner is never paired with itself.
    """
    owners = np.asarray(owners, dtype=np.int64).ravel()
    if len(owners) != len(_as_hash_array(hashes)):
        raise ValueError(f"{len(owners)} owners for {len(_as_hash_array(hashes))} hashes")
    pairs = hamming_pairs(hashes, max_distance)
    a, b = owners[pairs[:, 0]], owners[pairs[:, 1]]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b), pairs[:, 2]], axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 1], pairs[:, 0]))]  # by (a, b), nearest first
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = (pairs[1:, 0] != pairs[:-1, 0]) | (pairs[1:, 1] != pairs[:-1, 1])
    return pairs[first]


def group_pairs(groups: Sequence[Sequence[int]], max_distance: int) -> np.ndarray:
    """`owner_pairs` for hashes given as one group per owner (an image's whole and center
    hashes): rows (a, b, distance) index into `groups`."""
    owners = np.repeat(np.arange(len(groups)), [len(group) for group in groups])
    hashes = np.fromiter((h for group in groups for h in group), dtype=np.uint64, count=len(owners))
    return owner_pairs(hashes, owners, max_distance)


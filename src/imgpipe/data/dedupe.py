"""Decide the fate of every crawled image: kept, or dropped and why.

The dedupe stage reads the concatenated crawl manifests of all classes and writes a
"fates" table with one row per crawled row, so that no image vanishes without a reason.
Rules, applied in this order:

1. rows the crawl could not use are dropped as ``corrupt`` / ``failed``;
2. rows named by the hand-kept exclusion list are dropped as ``excluded``;
3. an image that appears in two classes (same bytes, or perceptual hashes within
   ``near_distance``) is dropped from *both* classes: ``cross_class_exact`` /
   ``cross_class_near``, since nobody can say which label is right;
4. within a class, byte-identical copies after the first are ``exact_duplicate``;
5. within a class, near duplicates (perceptual hashes within ``near_distance``) are
   either dropped greedily in manifest order (``near_duplicate``) or kept and put in
   one ``group``, so that the split stage keeps each group inside one split.

Near-duplicate search runs on 64-bit perceptual hashes (pHash) compared by Hamming
distance, two per image (whole and center, see imgpipe.data.hashing); all pairs within a
distance are found by multi-index hashing, which returns exactly what a brute-force
comparison would, much faster. A pair so found is a candidate only: it is a near duplicate
when the decoded pixels of the regions whose hashes matched agree too (within
``near_pixel_difference``, see imgpipe.data.nearmatch), so distinct low-texture pictures whose
hashes happen to be close are kept.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from imgpipe.core.files import read_list_entries
from imgpipe.core.manifests import CRAWL_STATUSES, FATE_COLUMNS
from imgpipe.data.hashing import ImageHashes, format_hash, hash_images
from imgpipe.data.nearmatch import (
    DEFAULT_PIXEL_DIFFERENCE,
    PixelCheck,
    hypothesis_name,
    near_pairs,
)

log = logging.getLogger(__name__)

NEAR_ACTIONS = ("drop", "group")
REASONS = (
    "corrupt",
    "failed",
    "rejected",
    "skipped",
    "excluded",
    "cross_class_exact",
    "cross_class_near",
    "exact_duplicate",
    "near_duplicate",
)
# the crawl manifest columns this stage needs (imgpipe.core.manifests.RAW_COLUMNS has them all)
REQUIRED_RAW_COLUMNS = ("file", "class", "sha256", "status", "origin")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")



def _check_raw(raw: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"crawl manifest lacks column(s) {missing}; it has {list(raw.columns)}")
    unknown = set(raw["status"]) - set(CRAWL_STATUSES)
    if unknown:
        raise ValueError(f"crawl manifest has unknown status value(s) {sorted(unknown)}")
    no_sha = (raw["status"] == "ok") & (raw["sha256"].fillna("").astype(str) == "")
    if no_sha.any():
        raise ValueError(
            f"crawl manifest rows with status ok but no sha256: {list(raw.loc[no_sha, 'file'][:5])}"
        )


def _normalised_sha256(raw: pd.DataFrame) -> np.ndarray:
    return raw["sha256"].fillna("").astype(str).str.lower().to_numpy(object)


def _exclusions(raw: pd.DataFrame, sha: np.ndarray, exclude: Iterable[str]) -> np.ndarray:
    """Per row, the exclusion entry (sha256, file path or origin) that drops it, "" for none.

    Excluding is about content: a person who lists one file wants that picture gone,
    so byte-identical copies elsewhere in the crawl go too (with the same entry). An entry
    that names no row at all (a typo, a stray character) is a warning naming it, and where it
    is written when ``exclude`` maps entries to that (see :func:`located_exclusions`).
    """
    entries = [e.strip() for e in exclude if e.strip()]
    lookup: dict[str, str] = {}
    for entry in entries:
        lookup.setdefault(entry.lower() if _SHA256.fullmatch(entry) else entry, entry)
        if "://" not in entry:
            lookup.setdefault(os.path.normpath(entry), entry)
    ok = (raw["status"] == "ok").to_numpy()
    by_sha: dict[str, str] = {}
    named: set[str] = set()
    for digest, file, origin, usable in zip(sha, _column(raw, "file"), _column(raw, "origin"), ok):
        hits = [lookup[key] for key in (digest, file, os.path.normpath(file) if file else "", origin)
                if key and key in lookup]
        named.update(hits)
        if usable and hits:
            by_sha.setdefault(digest, hits[0])
    where = exclude if isinstance(exclude, Mapping) else {}
    for entry in dict.fromkeys(entry for entry in entries if entry not in named):
        written = f" ({where[entry]})" if where.get(entry) else ""
        log.warning("exclusion entry %r%s names no row of the crawl manifests (neither a sha256, a file nor a URL "
                    "or path the crawl got): check it for a typo, or remove it", entry, written)
    return np.array([by_sha.get(digest, "") if usable else "" for digest, usable in zip(sha, ok)], dtype=object)


def located_exclusions(entries: Iterable[str], path: str | os.PathLike | None) -> dict[str, str]:
    """The exclusion entries, each mapped to where it is written (config key, file and line):
    what the warning about an entry that names nothing shows."""
    lines = {}
    if path and os.path.isfile(path):
        for number, entry, _ in reversed(read_list_entries(path, "dedupe.exclude")):
            lines[entry] = number  # an entry listed twice: its first line
    return {entry: f"dedupe.exclude {path} line {lines[entry]}" if entry in lines else "" for entry in entries}


def _column(raw: pd.DataFrame, name: str) -> np.ndarray:
    """A text column of the crawl manifest ("" where absent or empty)."""
    if name not in raw.columns:
        return np.full(len(raw), "", dtype=object)
    return raw[name].fillna("").astype(str).to_numpy(object)


def _cross_class_exact(units: pd.DataFrame) -> dict[int, int]:
    """For units whose bytes appear in several classes: unit -> first unit in another class."""
    several = units[units.groupby("sha")["cls"].transform("nunique") > 1]
    partner = {}
    for _, same in several.groupby("sha", sort=False):
        members = list(zip(same["pos"], same["cls"]))
        for pos, cls in members:
            partner[pos] = next(other for other, other_cls in members if other_cls != cls)
    return partner


def _unit_pairs(units: pd.DataFrame, hashes: Sequence[tuple[int, ...]], files: np.ndarray, near_distance: int,
                check: PixelCheck) -> pd.DataFrame:
    """Near-duplicate pairs of units (pos_u, pos_v, dist, same_class, hypothesis, difference),
    both directions: hashes within near_distance, confirmed on the pixels.

    Contents are compared once per distinct content (sha256), then mapped back to units
    (one content in several classes gives one unit per class).
    """
    reps = units.drop_duplicates("sha")
    rep_of = dict(zip(reps["sha"], range(len(reps))))
    forward = near_pairs([hashes[pos] for pos in reps["pos"]], files[reps["pos"].to_numpy()], near_distance, check)
    both = pd.concat([forward, forward.rename(columns={"a": "b", "b": "a"})], ignore_index=True)
    side = pd.DataFrame({"rep": units["sha"].map(rep_of), "pos": units["pos"], "cls": units["cls"]})
    both = both.merge(side.add_suffix("_u"), left_on="a", right_on="rep_u")
    both = both.merge(side.add_suffix("_v"), left_on="b", right_on="rep_v")
    both["same_class"] = both["cls_u"] == both["cls_v"]
    return both[["pos_u", "pos_v", "dist", "same_class", "hypothesis", "difference"]]


def _nearest(pairs: pd.DataFrame) -> pd.DataFrame:
    """For each pos_u, its nearest pos_v (ties: earliest in the manifest)."""
    return pairs.sort_values(["pos_u", "dist", "pos_v"]).drop_duplicates("pos_u")


def _greedy_near_drop(pairs: pd.DataFrame) -> dict[int, tuple]:
    """In manifest order, drop each unit that is a near duplicate of an already-kept one.

    Returns dropped unit -> its pair's row (pos_u, pos_v, dist, ...) with the nearest kept
    earlier unit; kept units are then pairwise no near duplicates.
    """
    earlier = pairs[pairs["pos_v"] < pairs["pos_u"]].sort_values(["pos_u", "dist", "pos_v"])
    dropped: dict[int, tuple] = {}
    # Sorted by unit, so every earlier unit's fate is final when a unit is reached;
    # its candidates come nearest first.
    for row in earlier.itertuples(index=False):
        if row.pos_u not in dropped and row.pos_v not in dropped:
            dropped[row.pos_u] = row
    return dropped


def _near_detail(pair, max_difference: float) -> str:
    """What made a pair near duplicates: which hashes matched, and how far the pixels differ."""
    return (f"pHash {hypothesis_name(pair.hypothesis)} within {pair.dist} bits; pixels differ by "
            f"{pair.difference:.0f} gray levels (dedupe.near_pixel_difference {max_difference:g})")


def _components(pairs: pd.DataFrame) -> dict[int, int]:
    """Union-find over unit pairs: unit -> smallest unit (first in manifest) of its component."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for a, b in zip(pairs["pos_u"], pairs["pos_v"]):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


def decide_fates(
    raw: pd.DataFrame,
    phashes: Mapping[str, int | Sequence[int] | None],
    near_distance: int,
    near_action: str = "drop",
    exclude: Iterable[str] = frozenset(),
    check: PixelCheck | None = None,
) -> pd.DataFrame:
    """The fates table for a crawl manifest, given the perceptual hash of each content.

    `phashes` maps sha256 to its pHashes (whole and center, as
    imgpipe.data.hashing.ImageHashes; one int stands for both; None: could not be decoded, so
    the rows are corrupt); every row with status ok needs its sha256 in it. Candidate
    pairs are confirmed by `check` on the rows' files (default: a PixelCheck at the
    default dedupe.near_pixel_difference). See `dedupe_images` for the rules and the
    columns. Rows keep the manifest's order, and the manifest order decides which copy is
    kept, so the same input always gives the same table.
    """
    _check_raw(raw)
    if near_action not in NEAR_ACTIONS:
        raise ValueError(f"dedupe.near_action must be one of {NEAR_ACTIONS}, got {near_action!r}")
    if near_distance < 0:
        raise ValueError(f"dedupe.near_distance must be >= 0, got {near_distance}")
    n = len(raw)
    files = raw["file"].astype(str).to_numpy(object)
    sha = _normalised_sha256(raw)
    ok = (raw["status"] == "ok").to_numpy()
    phashes = {key.lower(): value for key, value in phashes.items()}
    unhashed = [f for f, s, o in zip(files, sha, ok) if o and s not in phashes]
    if unhashed:
        raise ValueError(f"no perceptual hash given for {len(unhashed)} file(s), e.g. {unhashed[:3]}")
    hashes: list[tuple[int, ...]] = [()] * n
    for row in np.nonzero(ok)[0]:
        value = phashes[sha[row]]
        if value is not None:
            # (a hash read as a signed 64-bit integer is the same bits)
            values = (value, value) if isinstance(value, (int, np.integer)) else value
            hashes[row] = tuple(int(v) & (2**64 - 1) for v in values)
    has_hash = np.array([bool(h) for h in hashes], dtype=bool)

    reason = np.where(ok, "", raw["status"].to_numpy(object)).astype(object)
    detail = np.where(ok, "", _column(raw, "reason")).astype(object)
    reason[ok & ~has_hash] = "corrupt"
    detail[ok & ~has_hash] = "the crawl decoded it, dedupe could not"
    entry = _exclusions(raw, sha, exclude)
    excluded = (reason == "") & (entry != "")
    reason[excluded] = "excluded"
    detail[excluded] = "excluded by hand: " + entry[excluded]
    duplicate_of = np.full(n, -1)
    distance = np.full(n, -1)

    # Rows with the same bytes in the same class form a unit, represented by its first row.
    alive = np.nonzero(reason == "")[0]
    rows = pd.DataFrame({"pos": alive, "sha": sha[alive], "cls": raw["class"].astype(str).to_numpy()[alive]})
    unit_of = np.full(n, -1)
    unit_of[alive] = rows.groupby(["sha", "cls"], sort=False)["pos"].transform("first").to_numpy()
    units = rows[rows["pos"] == unit_of[alive]]

    unit_reason: dict[int, str] = {}
    for unit, other in _cross_class_exact(units).items():
        unit_reason[unit] = "cross_class_exact"
        duplicate_of[unit], distance[unit] = other, 0
    check = check if check is not None else PixelCheck()
    pairs = _unit_pairs(units, hashes, files, near_distance, check) if near_distance > 0 else None
    if pairs is not None:
        cross = pairs[~pairs["same_class"] & ~pairs["pos_u"].isin(list(unit_reason))]
        for pair in _nearest(cross).itertuples(index=False):
            unit_reason[pair.pos_u] = "cross_class_near"
            duplicate_of[pair.pos_u], distance[pair.pos_u] = pair.pos_v, pair.dist
            detail[pair.pos_u] = _near_detail(pair, check.max_difference)
        survivors = ~pairs["pos_u"].isin(list(unit_reason)) & ~pairs["pos_v"].isin(list(unit_reason))
        pairs = pairs[pairs["same_class"] & survivors]
        if near_action == "drop":
            for unit, pair in _greedy_near_drop(pairs).items():
                unit_reason[unit] = "near_duplicate"
                duplicate_of[unit], distance[unit] = pair.pos_v, pair.dist
                detail[unit] = _near_detail(pair, check.max_difference)

    # Every row shares its unit's fate, except that extra copies of a unit that is
    # not dropped across classes are exact duplicates of its first row.
    for row in alive:
        unit = unit_of[row]
        cross_dropped = unit_reason.get(unit, "").startswith("cross_class")
        if row == unit or cross_dropped:
            reason[row] = unit_reason.get(unit, "")
            duplicate_of[row], distance[row], detail[row] = duplicate_of[unit], distance[unit], detail[unit]
        else:
            reason[row] = "exact_duplicate"
            duplicate_of[row], distance[row] = unit, 0

    kept = reason == ""
    group = np.where(kept, np.arange(n), -1)
    if pairs is not None and near_action == "group":
        for unit, first in _components(pairs[pairs["pos_u"] < pairs["pos_v"]]).items():
            group[unit] = first

    fates = pd.DataFrame(
        {
            "file": raw["file"].astype(str).to_numpy(),
            "class": raw["class"].astype(str).to_numpy(),
            "origin": _column(raw, "origin"),
            "source": _column(raw, "source"),
            "query": _column(raw, "query"),
            "sha256": raw["sha256"].fillna("").astype(str).to_numpy(),
            "phash": [format_hash(h[0]) if h else "" for h in hashes],
            "phash_center": [format_hash(h[1]) if len(h) > 1 else "" for h in hashes],
            "status": np.where(kept, "kept", "dropped"),
            "reason": reason.astype(str),
            "detail": detail.astype(str),
            "duplicate_of": np.where(duplicate_of >= 0, files[duplicate_of], ""),
            "distance": pd.arrays.IntegerArray(np.maximum(distance, 0), distance < 0),
            "group": np.where(group >= 0, files[group], ""),
        }
    )
    fates = fates[FATE_COLUMNS]  # the order the manifest documents (a missing column raises)
    dropped = fates.loc[~kept, "reason"].value_counts()
    log.info("kept %d of %d images; dropped: %s", kept.sum(), n, dropped.to_dict() or "none")
    return fates


def dedupe_images(
    raw: pd.DataFrame,
    near_distance: int,
    near_action: str = "drop",
    exclude: Iterable[str] = frozenset(),
    threads: int = 1,
    near_pixel_difference: float = DEFAULT_PIXEL_DIFFERENCE,
) -> pd.DataFrame:
    """Fates of all crawled images of all classes: one row per manifest row.

    `raw` is the concatenated crawl manifests (needs columns file, class, sha256,
    status, origin; files are read at the paths given). Each distinct content is hashed
    once, on `threads` threads. The rules, in order:

    1. status corrupt/failed rows are dropped with that reason (so is an ok row whose
       file cannot be decoded: "corrupt");
    2. rows whose sha256, file or origin is in `exclude` are dropped, with every copy of
       their bytes: "excluded";
    3. content in two classes, by bytes or as near duplicates, is dropped from all of
       them: "cross_class_exact" / "cross_class_near", duplicate_of naming a file of the
       other class (the nearest, then the first);
    4. within a class, copies of the same bytes after the first: "exact_duplicate";
    5. within a class, near duplicates (0 `near_distance` disables this and the near part
       of 3): with near_action "drop", a near duplicate of an already kept image
       (manifest order) is dropped, "near_duplicate", duplicate_of the nearest such;
       with "group", all are kept and linked images share a group.

    Near duplicates: a pair whose pHashes (whole or center) are within `near_distance`
    bits is a candidate; it is a near duplicate when the pixels of the matched regions
    differ by at most `near_pixel_difference` gray levels (imgpipe.data.nearmatch). Only
    candidates are decoded again, once per image, on `threads` threads.

    The ``phash`` and ``phash_center`` columns (the crawl's hashes) are reused; only rows
    without both are hashed.

    Columns (one table a person can audit): file, class, origin (URL or path), source,
    query, sha256, phash and phash_center (16 hex digits each, "" if not decoded), status
    ("kept" | "dropped"),
    reason ("" when kept), detail (the crawl's reason, the exclusion entry that matched,
    or for a near duplicate which hashes matched and how far the pixels differ),
    duplicate_of ("" when none), distance
    (Hamming distance to duplicate_of, of the hashes that matched, 0 for exact copies,
    <NA> when none), group (for
    kept rows, the first file of its near-duplicate group, its own file when alone;
    "" when dropped).
    """
    _check_raw(raw)
    ok = (raw["status"] == "ok").to_numpy()
    contents = pd.DataFrame({"sha": _normalised_sha256(raw)[ok], "file": raw["file"].astype(str)[ok],
                             "whole": _column(raw, "phash")[ok], "center": _column(raw, "phash_center")[ok]})
    contents = contents.drop_duplicates("sha")
    # A store written before center hashes existed has only the whole one: hashed again.
    hashed = (contents["whole"] != "") & (contents["center"] != "")
    known = contents[hashed]
    phashes: dict[str, ImageHashes | None] = {
        s: ImageHashes(int(w, 16), int(c, 16)) for s, w, c in zip(known["sha"], known["whole"], known["center"])
    }
    unhashed = contents[~hashed]
    log.info("%d distinct images of %d ok rows: %d hashed by the crawl, %d to hash", len(contents), ok.sum(),
             len(known), len(unhashed))
    phashes |= dict(zip(unhashed["sha"], hash_images(unhashed["file"].tolist(), threads)))
    return decide_fates(raw, phashes, near_distance, near_action, exclude, PixelCheck(near_pixel_difference, threads))


# A class losing more than this share of its images as near duplicates gets a warning.
NEAR_DUPLICATE_WARN_SHARE = 0.10
# The share is of the rows that took part in the near-duplicate comparison: kept, or dropped
# by it. Not failed, skipped, rejected, corrupt or excluded rows, nor exact duplicates (of one
# in the class or another): a class of mostly failed downloads would hide its losses.
NEAR_COMPARED_REASONS = ("", "near_duplicate", "cross_class_near")


def near_duplicate_warnings(fates: pd.DataFrame) -> dict[str, str]:
    """Classes whose near-duplicate drops deserve a look: class -> one warning sentence.

    A class warns when more than NEAR_DUPLICATE_WARN_SHARE of its images that took part in
    the near-duplicate comparison (NEAR_COMPARED_REASONS) were dropped as
    ``near_duplicate``, or when any was dropped as ``cross_class_near``: then either the
    crawl really returned that many copies, or distinct pictures were taken for copies
    (low-texture images: shapes, icons, scans). The sentence names the keys to change. The
    dedupe job logs these, and the report shows them at its top.
    """
    warnings = {}
    for cls, rows in fates.groupby("class", sort=True):
        near = int((rows["reason"] == "near_duplicate").sum())
        cross = int((rows["reason"] == "cross_class_near").sum())
        compared = int(rows["reason"].isin(NEAR_COMPARED_REASONS).sum())
        parts = []
        if near > NEAR_DUPLICATE_WARN_SHARE * compared:
            parts.append(f"{near} of {compared} images ({near / compared:.0%}) dropped as near duplicates")
        if cross:
            parts.append(f"{cross} dropped as near duplicates of images in another class (cross_class_near)")
        if parts:
            warnings[cls] = (
                f"class {cls!r}: {' and '.join(parts)}. If they are distinct pictures, lower dedupe.near_distance "
                f"(0: exact copies only) or dedupe.near_pixel_difference, or set dedupe.near_action: group; "
                f"check its contact sheet (review/{cls}.html)."
            )
    return warnings


def summarize_fates(fates: pd.DataFrame) -> dict[str, int]:
    """Flat counts for MLflow metrics and summary.json.

    n_images, n_kept, n_dropped; kept_<class>; dropped_<reason> and
    dropped_<reason>_<class>; n_groups (near-duplicate groups of two or more kept
    images) and n_grouped_images. Every class and reason is present, zeros included, so
    runs compare key by key.
    """
    classes = sorted(fates["class"].unique())
    kept = fates[fates["status"] == "kept"]
    dropped = fates[fates["status"] == "dropped"]
    per_reason = dropped.groupby("reason").size()
    per_reason_class = dropped.groupby(["reason", "class"]).size()
    group_sizes = kept["group"].value_counts()
    summary = {"n_images": len(fates), "n_kept": len(kept), "n_dropped": len(dropped)}
    summary |= {f"kept_{c}": int((kept["class"] == c).sum()) for c in classes}
    summary |= {f"dropped_{r}": int(per_reason.get(r, 0)) for r in REASONS}
    summary |= {f"dropped_{r}_{c}": int(per_reason_class.get((r, c), 0)) for r in REASONS for c in classes}
    summary |= {
        "n_groups": int((group_sizes > 1).sum()),
        "n_grouped_images": int(group_sizes[group_sizes > 1].sum()),
    }
    return summary

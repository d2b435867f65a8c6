"""The pipeline's CSV tables: reading manifests, and the columns other stages rely on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_manifest(path: Path | str, required_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A manifest with every column as text: class names like '0' or 'NA' stay as written.

    pandas would otherwise read class '3' as the integer 3 and an empty reason as NaN.
    A manifest without one of `required_columns` raises ValueError naming the file.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    absent = [column for column in required_columns if column not in frame.columns]
    if absent:
        raise ValueError(f"manifest {path} lacks columns {', '.join(absent)} (has {', '.join(frame.columns)})")
    frame.attrs["source"] = str(path)
    return frame


# A class's crawl manifest, raw/<class>.csv: one row per URL or file its sources named.
RAW_COLUMNS = [
    "file",  # where the body is (rejected and corrupt ones under rejected/), "" when there is none
    "class",
    "source",  # folder | digits | urls | engine | greedy
    "source_index",  # position in the class's sources
    "engine",  # the search engine, "greedy" for a site crawl, else ""
    "query",  # the query (or site) that found the URL
    "rank",  # position in the query's results, the list, or the folder
    "origin",  # the URL, the file's path, or sklearn:digits#N
    "fetched_at",  # UTC, when it was downloaded ("" for local files: an import time would make reruns differ)
    "http_status",
    "bytes",
    "content_type",  # as the server declared it
    "sha256",
    "phash",  # 64-bit perceptual hash of the whole image, 16 hex digits ("" when not decodable)
    "phash_center",  # ... and of its center (imgpipe.data.hashing.CENTER_MARGIN cut from each side)
    "status",  # see CRAWL_STATUSES
    "reason",  # why it is not ok
    "width",
    "height",
    "format",  # as Pillow names it: JPEG, PNG, ...
]
# ok: kept; rejected: decodable but outside a crawl limit; corrupt: not decodable;
# failed: no body (HTTP or network error, limit); skipped: not tried (target reached, time spent).
CRAWL_STATUSES = ("ok", "rejected", "corrupt", "failed", "skipped")


def read_raw_manifest(path: Path | str) -> pd.DataFrame:
    """raw/<class>.csv (columns RAW_COLUMNS); an unknown status raises ValueError naming the file."""
    frame = read_manifest(path, ("file", "class", "origin", "sha256", "status", "reason"))
    unknown = set(frame["status"]) - set(CRAWL_STATUSES)
    if unknown:
        raise ValueError(f"crawl manifest {path} has unknown status value(s) {sorted(unknown)}")
    return frame


# dedupe/manifest.csv: the fate of every row of every class's crawl manifest, in their order.
FATE_COLUMNS = [
    "file", "class", "origin", "source", "query", "sha256", "phash", "phash_center",
    "status",  # kept | dropped
    "reason",  # why dropped (imgpipe.data.dedupe.REASONS), "" when kept
    "detail",  # the crawl's reason, or the exclusion entry that dropped it
    "duplicate_of",  # the file it duplicates ("" when none)
    "distance",  # Hamming distance to duplicate_of, the nearest of their hashes (0: same bytes)
    "group",  # kept rows: the first file of its near-duplicate group
]


def read_dedupe_manifest(path: Path | str) -> pd.DataFrame:
    """dedupe/manifest.csv (columns FATE_COLUMNS)."""
    return read_manifest(path, ("file", "class", "status", "reason", "duplicate_of", "group"))


# A model's history.csv, one row per epoch (written by training, read by the report).
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "backbone_frozen"]
# ... and for a localising model (task: localize), the mean IoU of its boxes in each split.
LOCALIZE_HISTORY_COLUMNS = ["train_miou", "val_miou"]

# Measurements of the machine (wall-clock times) are kept apart from results, so that the
# same config run again from scratch gives byte-identical manifests, history.csv,
# summary.json and metrics.json. Training's in-memory history also has this column ...
HISTORY_TIMING_COLUMN = "seconds"
# ... which goes to models/<model>/timing.json: {"train_seconds", "epoch_seconds": [...]};
# and eval/<model>/speed.json holds these evaluation figures and train_seconds.
SPEED_FILE = "speed.json"
SPEED_KEYS = ("latency_ms_batch1", "throughput_images_per_s", "inference_ms_per_image")


def read_split_manifest(path: Path | str) -> pd.DataFrame:
    """split/manifest.csv: path, label, split (train | val | test)."""
    return read_manifest(path, ("path", "label", "split"))

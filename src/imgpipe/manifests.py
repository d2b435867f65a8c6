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


# A model's history.csv, one row per epoch (written by training, read by the report).
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "backbone_frozen",
                   "seconds"]


def read_split_manifest(path: Path | str) -> pd.DataFrame:
    """split/manifest.csv: path, label, split (train | val | test)."""
    return read_manifest(path, ("path", "label", "split"))

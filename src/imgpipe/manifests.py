"""Reading the pipeline's CSV manifests."""

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

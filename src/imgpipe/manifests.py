"""Reading the pipeline's CSV manifests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_manifest(path: Path | str) -> pd.DataFrame:
    """A manifest with every column as text: class names like '0' or 'NA' stay as written.

    pandas would otherwise read class '3' as the integer 3 and an empty reason as NaN.
    """
    return pd.read_csv(path, dtype=str, keep_default_na=False)

"""Split: stratified train/val/test with near-duplicate groups kept inside one split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """A class cannot be split as configured."""


def target_counts(n_images: int, ratios: dict[str, float]) -> dict[str, int]:
    """Images per split for one class: val and test rounded, train gets the rest, none empty."""
    counts = {name: max(1, round(n_images * ratios[name])) for name in ("val", "test")}
    counts["train"] = n_images - counts["val"] - counts["test"]
    return counts


def stratified_group_split(
    images: pd.DataFrame, ratios: dict[str, float], seed: int
) -> pd.DataFrame:
    """Assign every image (`path,label,group`) to train/val/test.

    Per class, groups are shuffled with `seed`, placed largest first, each into the split
    furthest below its target; with singleton groups this hits the targets exactly. A
    class that cannot give every split at least one image raises SplitError naming the
    class and its counts.
    """
    rng = np.random.default_rng(seed)
    assigned = []
    for label in sorted(images["label"].unique()):
        members = images[images["label"] == label]
        groups = members.groupby("group", sort=True)["path"].apply(sorted)
        n_images = len(members)
        if n_images < len(SPLITS):
            raise SplitError(
                f"class '{label}' has {n_images} image(s) left after de-duplication; "
                f"a train/val/test split needs at least {len(SPLITS)}"
            )
        targets = target_counts(n_images, ratios)
        order = rng.permutation(len(groups))
        order = sorted(order, key=lambda position: -len(groups.iloc[position]))  # stable: ties keep shuffle order
        filled = dict.fromkeys(SPLITS, 0)
        for position in order:
            paths = groups.iloc[position]
            split = max(SPLITS, key=lambda name: (targets[name] - filled[name]) / max(targets[name], 1))
            filled[split] += len(paths)
            assigned.extend((path, label, split) for path in paths)
        if min(filled.values()) == 0:
            raise SplitError(
                f"class '{label}': {n_images} images in {len(groups)} near-duplicate group(s) cannot fill "
                f"every split (got {', '.join(f'{k} {v}' for k, v in filled.items())}; "
                f"wanted {', '.join(f'{k} {v}' for k, v in targets.items())}); add images or lower "
                f"dedupe.near_distance"
            )
        log.info("class %s: %s", label, ", ".join(f"{k} {v}" for k, v in filled.items()))
    manifest = pd.DataFrame(assigned, columns=["path", "label", "split"])
    return manifest.sort_values(["split", "label", "path"], key=_split_order).reset_index(drop=True)


def _split_order(column: pd.Series) -> pd.Series:
    return column.map(SPLITS.index) if column.name == "split" else column


def write_manifest(manifest: pd.DataFrame, path: Path | str) -> None:
    """Write `path,label,split` so the same inputs give byte-identical files."""
    manifest[["path", "label", "split"]].to_csv(path, index=False, lineterminator="\n")


def split_sizes(manifest: pd.DataFrame) -> dict[str, int]:
    """Counts per split and per split/class, flat, for MLflow (`n_train`, `n_train_cat`, ...)."""
    sizes = {f"n_{split}": int((manifest["split"] == split).sum()) for split in SPLITS}
    for (split, label), count in manifest.groupby(["split", "label"]).size().items():
        sizes[f"n_{split}_{label}"] = int(count)
    return sizes

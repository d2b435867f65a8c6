"""Split: stratified train/val/test with near-duplicate groups kept inside one split."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from imgpipe.data.boxes import BOX_COLUMNS

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
    images: pd.DataFrame,
    ratios: dict[str, float],
    seed: int,
    classes: list[str] | None = None,
    class_notes: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Assign every image (`path,label,group`) to train/val/test.

    Per class, groups are shuffled with `seed`, placed largest first, each into the split
    furthest below its target; with singleton groups this hits the targets exactly. A
    class (of `classes`, default: those present) that cannot give every split at least
    one image raises SplitError naming the class, its counts and `class_notes[class]`.
    """
    assigned = []
    class_notes = class_notes or {}
    for label in sorted(classes if classes is not None else images["label"].unique()):
        members = images[images["label"] == label]
        n_images = len(members)
        if n_images < len(SPLITS):
            note = f" ({class_notes[label]})" if label in class_notes else ""
            raise SplitError(
                f"class '{label}' has {n_images} image(s) left after de-duplication and preprocessing{note}; "
                f"a train/val/test split needs at least {len(SPLITS)}"
            )
        groups = members.groupby("group", sort=True)["path"].apply(sorted)
        targets = target_counts(n_images, ratios)
        # One stream per class: adding an image or a class leaves other classes' splits alone.
        rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
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


def describe_losses(fates: pd.DataFrame) -> dict[str, str]:
    """Per class, what de-duplication dropped: 'collected 5, dropped 3: corrupt 1, exact_duplicate 2'."""
    notes = {}
    for label, rows in fates.groupby("class"):
        reasons = rows.loc[rows["status"] == "dropped", "reason"].value_counts().sort_index()
        detail = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
        notes[label] = f"collected {len(rows)}, dropped {reasons.sum()}" + (f": {detail}" if detail else "")
    return notes


def attach_boxes(manifest: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The split manifest with each image's box (BOX_COLUMNS, 0..1 of the training image) and
    box_status, when the images have boxes (a class without any has them empty)."""
    if "box_status" not in images.columns:
        return manifest
    boxes = images.set_index("path")[BOX_COLUMNS + ["box_status"]]
    return manifest.join(boxes, on="path").fillna({column: "" for column in [*BOX_COLUMNS, "box_status"]})


def write_manifest(manifest: pd.DataFrame, path: Path | str) -> None:
    """Write `path,label,split` (and the boxes, where attached) so the same inputs give byte-identical files."""
    columns = ["path", "label", "split"] + [c for c in [*BOX_COLUMNS, "box_status"] if c in manifest.columns]
    manifest[columns].to_csv(path, index=False, lineterminator="\n")


def split_sizes(manifest: pd.DataFrame) -> dict[str, int]:
    """Counts per split and per split/class, flat, for MLflow (`n_train`, `n_train_cat`, ...)."""
    sizes = {f"n_{split}": int((manifest["split"] == split).sum()) for split in SPLITS}
    for (split, label), count in manifest.groupby(["split", "label"]).size().items():
        sizes[f"n_{split}_{label}"] = int(count)
    return sizes

"""Plots shared by the evaluate stage and the report.

Figures are built with matplotlib's object API (`Figure`, never pyplot): no global
figure registry, so nothing is left open between calls and no GUI backend is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import auc, roc_curve

DPI = 120
LABEL_CHARS = 18


def plot_confusion_matrix(matrix, class_names: Sequence[str], path: Path | str, title: str) -> None:
    """Draw a confusion matrix (rows = true class, columns = predicted) to a PNG.

    Cells show counts; colour is the row-normalised fraction, so classes with few test
    images are as readable as large ones.
    """
    counts = np.asarray(matrix)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({k}, {k}) for {k} class names")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=float), where=row_sums > 0)

    side = min(max(4.5, 0.45 * k + 2.5), 13.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")

    font_size = 10 if k <= 8 else max(5.5, 10 - 0.3 * (k - 8))
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, f"{counts[i, j]:g}", ha="center", va="center", fontsize=font_size,
                color="white" if fractions[i, j] > 0.5 else "black",
            )
    labels = [_short(name) for name in class_names]
    ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels)
    ax.tick_params(labelsize=font_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    _save(fig, path)


def plot_roc_curves(y_true, probabilities, class_names: Sequence[str], path: Path | str, title: str) -> dict:
    """Draw ROC curves to a PNG and return the AUCs that were drawn.

    Binary (two class names): one curve for the positive class, class index 1;
    `probabilities` may be shape (n, 2) or the positive-class column alone, shape (n,).
    Multiclass: one one-vs-rest curve per class plus the macro average. A class that is
    absent from `y_true` (or is all of it) has no ROC curve: it is skipped and named in the
    plot. The macro AUC is the mean of the per-class AUCs drawn, which is what
    `roc_auc_score(..., multi_class="ovr", average="macro")` reports when no class is skipped.

    Returns {"per_class": {class: auc}, "macro": float | None, "skipped": [class, ...]}.
    """
    y = np.asarray(y_true).astype(int)
    scores = np.asarray(probabilities, dtype=float)
    k = len(class_names)
    if k < 2:
        raise ValueError(f"ROC curves need at least 2 class names, got {list(class_names)}")
    if scores.ndim == 1 and k == 2:
        scores = np.column_stack([1.0 - scores, scores])
    if scores.shape != (len(y), k):
        raise ValueError(f"probabilities have shape {scores.shape}, expected ({len(y)}, {k})")

    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    skipped = []
    for index in [1] if k == 2 else range(k):
        positives = y == index
        if positives.all() or not positives.any():
            skipped.append(class_names[index])
            continue
        fpr, tpr, _ = roc_curve(positives, scores[:, index])
        curves[class_names[index]] = (fpr, tpr, float(auc(fpr, tpr)))
    macro = float(np.mean([c[2] for c in curves.values()])) if k > 2 and curves else None

    many = len(curves) > 10
    fig = Figure(figsize=(8.5 if many else 6.0, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    colours = _colours(len(curves))
    for colour, (name, (fpr, tpr, area)) in zip(colours, curves.items()):
        ax.plot(fpr, tpr, color=colour, linewidth=1.5, label=f"{_short(name)} (AUC {area:.3f})")
    if macro is not None:
        grid, mean_tpr = _mean_curve([(fpr, tpr) for fpr, tpr, _ in curves.values()])
        scope = "" if not skipped else f", {len(curves)} of {k} classes"
        ax.plot(grid, mean_tpr, color="black", linestyle="--", linewidth=2.5,
                label=f"macro average (mean AUC {macro:.3f}{scope})")
    if skipped:
        reason = "only one class in the test labels" if k == 2 else "no test images"
        ax.plot([], [], " ", label=f"no curve ({reason}): {', '.join(map(_short, skipped))}")
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="x-small")
    else:
        ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)
    return {"per_class": {name: c[2] for name, c in curves.items()}, "macro": macro, "skipped": skipped}


def plot_learning_curves(histories: Mapping[str, pd.DataFrame], path: Path | str) -> None:
    """Draw loss and accuracy per epoch for several models: train dashed, val solid.

    Each history needs columns epoch, train_loss, val_loss, train_accuracy, val_accuracy.
    With no histories the PNG still exists and says so, so a report can always embed it.
    """
    fig = Figure(figsize=(12.0, 4.5), layout="constrained")
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    colours = _colours(len(histories))
    for colour, (model, history) in zip(colours, histories.items()):
        for ax, metric in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
            ax.plot(history["epoch"], history[f"train_{metric}"], color=colour, linestyle="--", linewidth=1.2)
            ax.plot(history["epoch"], history[f"val_{metric}"], color=colour, linestyle="-", linewidth=1.8)
    for ax, metric in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    if histories:
        handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
        handles += [Line2D([], [], color="grey", linestyle="--"), Line2D([], [], color="grey", linestyle="-")]
        labels = [_short(m) for m in histories] + ["train", "val"]
        accuracy_ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    else:
        fig.suptitle("no training histories available")
    _save(fig, path)


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Average TPR of several ROC curves on the union of their FPR points."""
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    mean_tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], axis=0)
    return grid, mean_tpr


def _colours(n: int) -> list:
    """n distinguishable colours: tab10 up to 10, tab20 beyond (repeating past 20)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _short(name: str) -> str:
    """Long names lose their middle: class names often share a prefix and differ at the end."""
    name = str(name)
    if len(name) <= LABEL_CHARS:
        return name
    head = (LABEL_CHARS - 1) // 2
    return name[:head] + "…" + name[-(LABEL_CHARS - 1 - head):]


def _save(fig: Figure, path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")

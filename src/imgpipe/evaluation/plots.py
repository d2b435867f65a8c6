"""Plots shared by the evaluate stage and the report.

Figures are built with matplotlib's object API (`Figure`, never pyplot): no global
figure registry, so nothing is left open between calls and no GUI backend is touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

from imgpipe.core.files import writing

DPI = 120
LABEL_CHARS = 18
# PIL modes with one channel: drawn with a grey colour map rather than converted to RGB
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


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


def plot_roc_curves(roc: Mapping, path: Path | str, title: str) -> None:
    """Draw the ROC curves of `imgpipe.evaluation.stats.roc_curves` (which computes them and the AUC) to a PNG.

    Binary: one curve for the positive class. Multiclass: one one-vs-rest curve per class
    plus the macro average. Classes without a curve (absent from the test labels, or all
    of them) are named in the plot.
    """
    curves, skipped, k = roc["per_class"], roc["skipped"], roc["n_classes"]
    many = len(curves) > 10
    fig = Figure(figsize=(8.5 if many else 6.0, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    for colour, (name, curve) in zip(_colours(len(curves)), curves.items()):
        ax.plot(curve["fpr"], curve["tpr"], color=colour, linewidth=1.5, label=f"{_short(name)} (AUC {curve['auc']:.3f})")
    if k > 2 and curves:
        grid, mean_tpr = _mean_curve([(c["fpr"], c["tpr"]) for c in curves.values()])
        scope = "" if not skipped else f", {len(curves)} of {k} classes"
        ax.plot(grid, mean_tpr, color="black", linestyle="--", linewidth=2.5,
                label=f"macro average (mean AUC {roc['auc']:.3f}{scope})")
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


def plot_reliability_diagram(bins: Sequence[Mapping], ece: float, path: Path | str, title: str) -> None:
    """Draw accuracy per confidence bin against the diagonal of perfect calibration to a PNG.

    `bins` are equal-width confidence bins, each {"lower", "upper", "count", "confidence",
    "accuracy"}, with confidence and accuracy None where count is 0. The hatched red bar
    between a bin's accuracy and its mean confidence is the calibration gap; the lower panel
    shows how many test images each bin holds, because a large gap in a bin of three images
    means little next to a small one in the bin that holds most of the test set.
    """
    filled = [b for b in bins if b["count"] and b["accuracy"] is not None and b["confidence"] is not None]
    fig = Figure(figsize=(6.0, 6.5), layout="constrained")
    ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.2, label="perfect calibration")
    if filled:
        lefts = [b["lower"] for b in filled]
        widths = [b["upper"] - b["lower"] for b in filled]
        accuracies = np.array([b["accuracy"] for b in filled], dtype=float)
        confidences = np.array([b["confidence"] for b in filled], dtype=float)
        ax.bar(lefts, accuracies, width=widths, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.6, label="accuracy")
        ax.bar(lefts, np.abs(confidences - accuracies), bottom=np.minimum(confidences, accuracies), width=widths,
               align="edge", facecolor=(0.84, 0.15, 0.16, 0.25), edgecolor="tab:red", hatch="//", linewidth=0.6,
               label="gap to mean confidence")
    else:
        ax.text(0.5, 0.55, "no test images in any bin", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nexpected calibration error {ece:.3f}")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)

    counts = [int(b["count"]) for b in bins]
    count_ax.bar([b["lower"] for b in bins], counts, width=[b["upper"] - b["lower"] for b in bins], align="edge",
                 color="grey", edgecolor="black", linewidth=0.6)
    if 0 < len(bins) <= 20:
        for b, count in zip(bins, counts):
            if count:
                count_ax.annotate(f"{count}", ((b["lower"] + b["upper"]) / 2, count), xytext=(0, 1),
                                  textcoords="offset points", ha="center", va="bottom", fontsize="x-small")
    # headroom for the count labels above the tallest bar
    count_ax.set_ylim(0, max(counts, default=0) * 1.25 or 1)
    count_ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    count_ax.set_xlabel("confidence (max predicted probability)")
    count_ax.set_ylabel(f"images (n={sum(counts)})")
    count_ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_embedding(features, y_true, y_pred, class_names: Sequence[str], path: Path | str, title: str,
                   seed: int = 0, tsne_max: int = 5000) -> dict:
    """Draw test-image features (e.g. the penultimate layer) in 2-D by PCA and t-SNE to a PNG.

    Points are coloured by true class; misclassified ones get a black ring. PCA is always
    drawn. t-SNE is drawn for 4 to `tsne_max` images: above that it takes minutes, and
    below 4 images its perplexity ((N-1)/3, capped at 30) is under 1, which is meaningless.
    Where t-SNE is not drawn its panel says why.

    Returns {"pca_explained_variance": [ratio per component], "tsne": drawn or not}.
    """
    # Imported here: sklearn brings scipy.stats (0.7 s), which the report job (this module's other user) never needs.
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=float)
    y = np.asarray(y_true).astype(int)
    predicted = np.asarray(y_pred).astype(int)
    k = len(class_names)
    if x.ndim != 2:
        raise ValueError(f"features have shape {x.shape}, expected (n_images, n_features)")
    if not len(x) == len(y) == len(predicted):
        raise ValueError(f"{len(x)} feature rows, {len(y)} true labels and {len(predicted)} predictions: "
                         "expected one of each per test image")
    outside = sorted({int(v) for v in np.concatenate([y, predicted]) if not 0 <= v < k})
    if outside:
        raise ValueError(f"labels {outside} are not indices into the {k} class names")
    n, d = x.shape
    wrong = y != predicted

    fig = Figure(figsize=(13.0, 5.8), layout="constrained")
    pca_ax, tsne_ax = fig.subplots(1, 2)
    styles = _class_styles(k)

    # n-1: n points span at most n-1 directions, so two points get one component, not a zero-variance second
    components = min(2, d, n - 1)
    # identical features (a collapsed embedding) have no variance for PCA to divide by
    collapsed = n > 0 and x.var(axis=0).sum() == 0
    explained: list[float] = []
    if components < 1:
        _say(pca_ax, f"PCA needs at least 2 images; the test split has {n}")
    else:
        if collapsed:
            coords = np.zeros((n, components))
            explained = [0.0] * components
        else:
            pca = PCA(n_components=components, random_state=seed)
            coords = pca.fit_transform(x)
            explained = [float(r) for r in pca.explained_variance_ratio_]
        if components == 1:
            # one component leaves no second axis; a small random vertical spread keeps points of
            # different classes that share a value from hiding each other
            coords = np.column_stack([coords[:, 0], np.random.default_rng(seed).uniform(-0.3, 0.3, n)])
            pca_ax.set_ylim(-1, 1)
            pca_ax.set_yticks([])
            pca_ax.set_ylabel("random jitter (only one component)")
        else:
            pca_ax.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
        pca_ax.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
        _scatter_classes(pca_ax, coords, y, wrong, styles, seed)
    pca_ax.set_title("PCA")

    if d < 2:
        reason = "features are 1-D: the PCA panel already shows them exactly"
    elif n < 4:
        reason = f"too few images for t-SNE ({n}; needs at least 4)"
    elif n > tsne_max:
        reason = f"too many images for t-SNE ({n} > tsne_max = {tsne_max})"
    elif collapsed:
        reason = "all images have identical features"
    else:
        reason = None
    if reason is None:
        tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
        _scatter_classes(tsne_ax, tsne.fit_transform(x), y, wrong, styles, seed)
        # t-SNE coordinates have no units and distances between clusters mean little: hide the scale
        tsne_ax.set_xticks([])
        tsne_ax.set_yticks([])
    else:
        _say(tsne_ax, f"t-SNE not drawn:\n{reason}")
    tsne_ax.set_title("t-SNE")

    present = np.bincount(y, minlength=k)
    handles = [Line2D([], [], linestyle="", marker=marker, color=colour, markersize=6)
               for (colour, marker), count in zip(styles, present) if count]
    labels = [f"{_short(name)} ({count})" for name, count in zip(class_names, present) if count]
    handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none", markeredgecolor="black",
                          markersize=8))
    labels.append(f"misclassified ({int(wrong.sum())} of {n})")
    absent = [_short(name) for name, count in zip(class_names, present) if not count]
    if absent:
        handles.append(Line2D([], [], linestyle=""))
        labels.append("no test images:\n" + "\n".join(absent))
    many = len(labels) > 16
    fig.legend(handles, labels, loc="outside right upper", ncols=2 if many else 1,
               fontsize="x-small" if many else "small", title="true class (test images)",
               title_fontsize="x-small" if many else "small")
    fig.suptitle(title)
    _save(fig, path)
    return {"pca_explained_variance": explained, "tsne": reason is None}


def plot_unavailable(path: Path | str, title: str, reason: str) -> None:
    """A figure that says why a plot could not be drawn: the output exists, and says so."""
    fig = Figure(figsize=(6.0, 2.5), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    _say(ax, reason)
    _save(fig, path)


def most_confident(confidences, max_images: int) -> list[int]:
    """Indices of the `max_images` highest confidences, highest first; ties keep input order."""
    order = np.argsort(-np.asarray(confidences, dtype=float), kind="stable")
    return [int(i) for i in order[:max(max_images, 0)]]


def plot_confident_errors(paths: Sequence[Path | str], true_labels: Sequence[str], predicted_labels: Sequence[str],
                          confidences, path: Path | str, title: str, max_images: int = 16) -> int:
    """Draw the most confidently misclassified test images in a grid to a PNG.

    Takes the misclassified images only, in any order, and draws the `max_images` with the
    highest confidence: the errors the model is surest of are most often label noise or a
    shortcut the model has learned. Each cell shows the true label in green and the predicted
    label with its confidence in red. An image that cannot be read gets a cell that says so.

    Returns the number of images drawn.
    """
    if not len(paths) == len(true_labels) == len(predicted_labels) == len(confidences):
        raise ValueError(f"{len(paths)} paths, {len(true_labels)} true labels, {len(predicted_labels)} predicted "
                         f"labels and {len(confidences)} confidences: expected one of each per image")
    chosen = most_confident(confidences, max_images)
    if not chosen:
        fig = Figure(figsize=(6.0, 2.5), layout="constrained")
        _say(fig.subplots(), "no misclassified test images")
        fig.suptitle(title)
        _save(fig, path)
        return 0

    columns = min(len(chosen), max(4, math.ceil(math.sqrt(len(chosen)))))
    rows = math.ceil(len(chosen) / columns)
    # a cell is a square image plus two label lines above and a file name below; narrower than
    # 6 inches the suptitle would not fit, so one error still gets a readable figure
    fig = Figure(figsize=(max(2.4 * columns, 6.0), 2.9 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, index in zip(axes, chosen):
        image_path = Path(paths[index])
        try:
            with Image.open(image_path) as image:
                pixels = np.asarray(image.convert("L" if image.mode in _GREY_MODES else "RGB"))
        except (OSError, ValueError):
            _say(ax, "unreadable", color="dimgrey")
            ax.set_facecolor("whitesmoke")
            ax.set_box_aspect(1)
        else:
            # nearest neighbour: test images are often 40x40, and smoothing them hides what the model saw
            ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255,
                      interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"pred: {_short(predicted_labels[index])} {float(confidences[index]):.1%}", color="tab:red",
                     fontsize="small")
        ax.annotate(f"true: {_short(true_labels[index])}", (0.5, 1.0), xycoords="axes fraction", xytext=(0, 16),
                    textcoords="offset points", ha="center", va="bottom", color="tab:green", fontsize="small")
        ax.set_xlabel(_short(image_path.name), fontsize="x-small", color="dimgrey")
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.suptitle(f"{title}: {len(chosen)} most confident of {len(paths)} errors")
    _save(fig, path)
    return len(chosen)


def plot_localization_grid(predictions: pd.DataFrame, path: Path | str, title: str, max_images: int = 16) -> int:
    """Test images drawn as seed 004 drew them: the true box (white, dashed) and the predicted
    box (blue), the predicted label in green when right and red when wrong, and the IoU in a
    corner. `predictions` is evaluate's table of a localising model (path, label, predicted,
    predicted_box_*, true_box, iou); up to `max_images` images with a box are drawn, the first
    of each class in turn, so the same model draws the same grid. Returns how many were drawn."""
    from matplotlib.patches import Rectangle

    with_box = predictions[predictions["true_box"].fillna("").astype(str) != ""]
    per_label = math.ceil(max_images / max(1, with_box["label"].nunique()))
    drawn = with_box.groupby("label", sort=True).head(per_label).head(max_images)  # every class, in file order
    if drawn.empty:
        fig = Figure(figsize=(6.0, 2.5), layout="constrained")
        _say(fig.subplots(), "no test image has a box")
        fig.suptitle(title)
        _save(fig, path)
        return 0
    columns = min(len(drawn), 4)
    rows = math.ceil(len(drawn) / columns)
    fig = Figure(figsize=(max(2.4 * columns, 6.0), 2.6 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, row in zip(axes, drawn.itertuples(index=False)):
        with Image.open(row.path) as image:
            pixels = np.asarray(image.convert("L" if image.mode in _GREY_MODES else "RGB"))
        height, width = pixels.shape[:2]
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        true_box = [float(value) for value in str(row.true_box).split(",")]
        predicted = (row.predicted_box_x0, row.predicted_box_y0, row.predicted_box_x1, row.predicted_box_y1)
        for (x0, y0, x1, y1), colour, style in ((true_box, "white", "--"), (predicted, "tab:blue", "-")):
            ax.add_patch(Rectangle((x0 * width - 0.5, y0 * height - 0.5), (x1 - x0) * width, (y1 - y0) * height,
                                   fill=False, edgecolor=colour, linestyle=style, linewidth=1.5))
        ax.text(0.02, 0.98, f"IoU {row.iou:.2f}", transform=ax.transAxes, ha="left", va="top", fontsize="small",
                color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
        right = row.label == row.predicted
        ax.set_title(_short(row.predicted) + ("" if right else f" (true: {_short(row.label)})"),
                     color="tab:green" if right else "tab:red", fontsize="small")
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(drawn):]:
        ax.set_axis_off()
    fig.suptitle(f"{title}: true box dashed white, predicted blue")
    _save(fig, path)
    return len(drawn)


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Average TPR of several ROC curves on the union of their FPR points."""
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    mean_tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], axis=0)
    return grid, mean_tpr


def _class_styles(k: int) -> list[tuple]:
    """(colour, marker) per class: past 20 classes colours repeat, so the marker tells them apart."""
    markers = ["o", "s", "^", "D"]
    return [(colour, markers[(i // 20) % len(markers)]) for i, colour in enumerate(_colours(k))]


def _scatter_classes(ax, coords: np.ndarray, y: np.ndarray, wrong: np.ndarray, styles: list[tuple], seed: int) -> None:
    """Scatter points coloured by class, misclassified ones ringed in black."""
    # a shuffled drawing order, so no class is always painted over the others
    order = np.random.default_rng(seed).permutation(len(y))
    size = 28 if len(y) <= 500 else 10
    for marker in dict.fromkeys(m for _, m in styles):
        picked = np.array([i for i in order if styles[y[i]][1] == marker], dtype=int)
        if not len(picked):
            continue
        ax.scatter(coords[picked, 0], coords[picked, 1], c=[styles[y[i]][0] for i in picked], marker=marker,
                   s=size, alpha=0.8, linewidths=0)
    ax.scatter(coords[wrong, 0], coords[wrong, 1], s=size * 3, facecolors="none", edgecolors="black",
               linewidths=0.8)


def _say(ax, message: str, **text) -> None:
    """Replace an axes' content by a centred message: the PNG then says why it is empty."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True, **text)
    ax.set_xticks([])
    ax.set_yticks([])


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
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")

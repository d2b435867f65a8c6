"""The statistics behind an honest comparison: metrics, their uncertainty, paired tests.

Everything here is a pure function of labels and probabilities, so each figure is
computed once, in one place, and tested against hand-computed values.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

# Probabilities are clipped away from 0 before the log, so one overconfident mistake
# gives a large but finite log loss (scikit-learn's own clip).
LOG_LOSS_EPSILON = np.finfo(np.float64).eps


def macro_f1_from_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro F1 over the classes that are true or predicted at least once (scikit-learn's
    default): a class with no test image, never predicted, has no F1 rather than 0, so a
    bootstrap draw that happens to miss a rare class is not pulled down by it. numpy only,
    fast enough for 1,000 bootstrap draws."""
    true_positive = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    predicted = np.bincount(y_pred, minlength=n_classes)
    actual = np.bincount(y_true, minlength=n_classes)
    denominator = predicted + actual
    present = denominator > 0
    return float((2 * true_positive[present] / denominator[present]).mean())


def log_loss(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log probability of the true class."""
    chosen = probabilities[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(chosen, LOG_LOSS_EPSILON, 1.0))))


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k most probable (ties: lower index first)."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def top_k_values(n_classes: int) -> list[int]:
    """The k worth reporting: 3 and 5 where they are below the number of classes."""
    return [k for k in (3, 5) if k < n_classes]


def calibration_bins(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = 15) -> tuple[list[dict], float]:
    """Equal-width bins of the top-class confidence and the expected calibration error.

    ECE = sum over bins of (images in bin / all images) * |accuracy - mean confidence|
    (Guo et al., 2017). A bin holds confidences in (lower, upper]; the first also holds 0.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        mean_confidence = float(confidence[inside].mean()) if count else None
        accuracy = float(correct[inside].mean()) if count else None
        if count:
            ece += count / len(y_true) * abs(accuracy - mean_confidence)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "confidence": mean_confidence, "accuracy": accuracy})
    return bins, float(ece)


def roc_curves(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """ROC curves and AUCs, the one place imgpipe computes them (report, MLflow and plots).

    Binary: one curve, class index 1 as positive. Multiclass: one-vs-rest per class; the
    macro AUC is the mean over the classes that have both positives and negatives in
    `y_true`; the others are listed in "skipped" (with 3 classes and one absent from the
    test split, the AUC covers the 2 present ones and says so). None where no class has a curve.

    Returns {"per_class": {class: {"fpr", "tpr", "auc"}}, "auc": float | None,
    "skipped": [class, ...], "note": str | None, "n_classes": int}.
    """
    from sklearn import metrics as skm  # here: sklearn imports scipy.stats (0.7 s), which the report job does not need

    n_classes = len(classes)
    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    if n_classes < 2:
        raise ValueError(f"ROC curves need at least 2 classes, got {list(classes)}")
    if probabilities.ndim == 1 and n_classes == 2:  # the positive class's column alone
        probabilities = np.column_stack([1.0 - probabilities, probabilities])
    if probabilities.shape != (len(y_true), n_classes):
        raise ValueError(f"probabilities have shape {probabilities.shape}, expected ({len(y_true)}, {n_classes})")
    curves, skipped = {}, []
    for index in [1] if n_classes == 2 else range(n_classes):
        positives = y_true == index
        if positives.all() or not positives.any():
            skipped.append(classes[index])
            continue
        fpr, tpr, _ = skm.roc_curve(positives, probabilities[:, index])
        curves[classes[index]] = {"fpr": fpr, "tpr": tpr, "auc": float(skm.auc(fpr, tpr))}
    area = float(np.mean([c["auc"] for c in curves.values()])) if curves else None
    note = None
    if not curves:
        note = "the test split holds a single class"
    elif skipped and n_classes > 2:
        note = (f"macro over the {len(curves)} of {n_classes} classes present in the test split "
                f"(absent: {', '.join(skipped)})")
    return {"per_class": curves, "auc": area, "skipped": skipped, "note": note, "n_classes": n_classes}


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, n_resamples: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy and macro F1 over the test images.

    Images are resampled with replacement `n_resamples` times from a fixed seed, so the
    interval is reproducible. With few test images the interval is wide: that is its point.
    """
    if len(y_true) == 0:
        raise ValueError("a bootstrap interval needs at least one test image")
    generator = np.random.default_rng(seed)
    draws = generator.integers(0, len(y_true), size=(n_resamples, len(y_true)))
    correct = (y_true == y_pred).astype(np.float64)
    accuracies = correct[draws].mean(axis=1)
    macro_f1s = np.array([macro_f1_from_counts(y_true[d], y_pred[d], n_classes) for d in draws])
    tail = (1.0 - confidence) / 2 * 100
    return {name: tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))
            for name, values in (("accuracy", accuracies), ("macro_f1", macro_f1s))}


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test of two models on the same test images.

    Only the images they disagree on count: `a_only` right by A alone, `b_only` by B
    alone. Under "equally accurate" each disagreement is a fair coin, so the two-sided
    p-value is the exact binomial one (no disagreement: p = 1).
    """
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"McNemar needs the same images for both models: {correct_a.shape} vs {correct_b.shape}")
    a_only = int((correct_a & ~correct_b).sum())
    b_only = int((~correct_a & correct_b).sum())
    n = a_only + b_only
    return {"a_only": a_only, "b_only": b_only, "p_value": fair_coin_two_sided_p(min(a_only, b_only), n)}


def fair_coin_two_sided_p(k: int, n: int) -> float:
    """The exact two-sided binomial p-value of k <= n/2 heads in n fair tosses: 2 P(X <= k), at most 1.

    What scipy.stats.binomtest(k, n, 0.5) gives (for a fair coin its "outcomes no likelier
    than k" are the two tails), in exact integers, without importing scipy.stats (0.7 s,
    most of the report job's start-up).
    """
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (step-down, monotone, at most 1)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def pairwise_mcnemar(correct: dict[str, np.ndarray], alpha: float = 0.05) -> list[dict]:
    """McNemar's exact test for every pair of models, Holm-corrected across the pairs.

    `correct` maps model -> per-image correctness on the same test images in the same
    order. Each result: a, b, a_only, b_only, p_value, p_holm, significant (p_holm < alpha).
    """
    pairs = list(combinations(correct, 2))
    tests = [{"a": a, "b": b, **mcnemar_exact(correct[a], correct[b])} for a, b in pairs]
    for test, adjusted in zip(tests, holm_adjust([t["p_value"] for t in tests])):
        test["p_holm"] = adjusted
        test["significant"] = bool(adjusted < alpha)
    return tests


def standing_against(best: str, tests: list[dict]) -> dict[str, str]:
    """How every other model stands against `best` in the pairwise tests: 'beaten' (a
    significant difference with `best` right more often), 'tied' (not significant) or
    'better' (significant, the other model right more often)."""
    standing = {}
    for test in tests:
        if best not in (test["a"], test["b"]):
            continue
        best_is_a = test["a"] == best
        other = test["b"] if best_is_a else test["a"]
        best_only, other_only = ((test["a_only"], test["b_only"]) if best_is_a
                                 else (test["b_only"], test["a_only"]))
        if not test["significant"]:
            standing[other] = "tied"
        else:
            standing[other] = "beaten" if best_only > other_only else "better"
    return standing

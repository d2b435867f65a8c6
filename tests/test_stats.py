"""The comparison's statistics against values computed by hand."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from imgpipe.evaluation.stats import (
    bootstrap_intervals,
    calibration_bins,
    holm_adjust,
    log_loss,
    macro_f1_from_counts,
    mcnemar_exact,
    pairwise_mcnemar,
    roc_curves,
    standing_against,
    top_k_accuracy,
)


def test_mcnemar_exact_on_the_issue_example():
    # 269 test images, the models disagree on 7: resnet right on 6, the CNN on 1.
    correct_resnet = np.array([True] * 262 + [True] * 6 + [False])
    correct_cnn = np.array([True] * 262 + [False] * 6 + [True])
    result = mcnemar_exact(correct_resnet, correct_cnn)
    assert (result["a_only"], result["b_only"]) == (6, 1)
    assert result["p_value"] == pytest.approx(0.125)  # 2 * (1 + 7) / 2**7


def test_mcnemar_without_disagreement_and_when_one_side_wins_all():
    same = np.array([True, False, True])
    assert mcnemar_exact(same, same) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    result = mcnemar_exact(np.ones(10, bool), np.zeros(10, bool))
    assert result["p_value"] == pytest.approx(2 / 2**10)
    with pytest.raises(ValueError, match="same images"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


def test_holm_adjustment_is_step_down_and_monotone():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


def test_pairwise_mcnemar_names_the_tied_models():
    truth_size = 200
    strong = np.ones(truth_size, bool)
    weak = np.array([i % 4 != 0 for i in range(truth_size)])  # wrong on 50 images
    near_strong = strong.copy()
    near_strong[:2] = False  # wrong on 2
    tests = pairwise_mcnemar({"strong": strong, "near": near_strong, "weak": weak})
    by_pair = {(t["a"], t["b"]): t for t in tests}
    assert not by_pair[("strong", "near")]["significant"]
    assert by_pair[("strong", "weak")]["significant"]
    assert by_pair[("strong", "near")]["p_holm"] >= by_pair[("strong", "near")]["p_value"]
    assert standing_against("strong", tests) == {"near": "tied", "weak": "beaten"}
    # Seen from the weak model, the strong one is significantly better, not beaten.
    assert standing_against("weak", tests) == {"strong": "better", "near": "better"}


def test_calibration_bins_and_ece_by_hand():
    # Confidences 0.9, 0.9 (one right) and 0.6, 0.6 (both right).
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y_true = np.array([0, 1, 0, 1])
    bins, ece = calibration_bins(y_true, probabilities, n_bins=10)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    filled = [b for b in bins if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(2, 1.0), (2, 0.5)]
    assert sum(b["count"] for b in bins) == 4 and bins[0]["confidence"] is None


def test_log_loss_and_top_k_by_hand():
    probabilities = np.array([[0.8, 0.15, 0.05], [0.25, 0.5, 0.25], [0.1, 0.3, 0.6]])
    y_true = np.array([0, 2, 1])
    assert log_loss(y_true, probabilities) == pytest.approx(-(math.log(0.8) + math.log(0.25) + math.log(0.3)) / 3)
    assert top_k_accuracy(y_true, probabilities, 1) == pytest.approx(1 / 3)
    # Image 2's true class ties with class 0 for second place: the lower index wins the tie.
    assert top_k_accuracy(y_true, probabilities, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(y_true, probabilities, 3) == pytest.approx(1.0)
    assert log_loss(np.array([1]), np.array([[1.0, 0.0]])) < 40  # finite however confident the mistake


def test_macro_f1_counts_match_scikit_learn_with_absent_classes():
    generator = np.random.default_rng(3)
    for _ in range(20):
        y_true = generator.integers(0, 4, 30)  # class 4 of 6 is only predicted, class 5 never appears
        y_pred = generator.integers(0, 5, 30)
        expected = skm.f1_score(y_true, y_pred, average="macro", zero_division=0)  # over classes seen
        assert macro_f1_from_counts(y_true, y_pred, 6) == pytest.approx(expected)


def test_bootstrap_macro_f1_of_a_perfect_model_with_a_rare_class_is_one():
    # A draw that misses the single image of class 2 must not score that class 0.
    y_true = np.array([0] * 50 + [1] * 50 + [2])
    assert bootstrap_intervals(y_true, y_true, 3)["macro_f1"] == (1.0, 1.0)


def test_bootstrap_intervals_are_reproducible_and_plausible():
    y_true = np.array([0, 1] * 200)
    y_pred = y_true.copy()
    y_pred[:80] = 1 - y_pred[:80]  # accuracy 0.8
    first = bootstrap_intervals(y_true, y_pred, 2, seed=1)
    assert first == bootstrap_intervals(y_true, y_pred, 2, seed=1)
    low, high = first["accuracy"]
    normal_half_width = 1.96 * math.sqrt(0.8 * 0.2 / 400)
    assert low < 0.8 < high
    assert (high - low) / 2 == pytest.approx(normal_half_width, rel=0.15)
    assert bootstrap_intervals(y_true, y_true, 2)["macro_f1"] == (1.0, 1.0)


def test_roc_binary_matches_scikit_learn():
    y_true = np.array([0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    result = roc_curves(y_true, np.column_stack([1 - positive, positive]), ["neg", "pos"])
    assert result["auc"] == pytest.approx(skm.roc_auc_score(y_true, positive))
    assert list(result["per_class"]) == ["pos"] and result["note"] is None


def test_roc_multiclass_with_a_class_absent_from_the_test_split():
    probabilities = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    y_true = np.array([0, 0, 1, 1])
    result = roc_curves(y_true, probabilities, ["a", "b", "c"])
    # a: positives 0.9, 0.4 against 0.5, 0.1 -> 3 of 4 pairs ordered; b likewise.
    assert result["per_class"]["a"]["auc"] == pytest.approx(0.75)
    assert result["per_class"]["b"]["auc"] == pytest.approx(0.75)
    assert result["auc"] == pytest.approx(0.75) and result["skipped"] == ["c"]
    assert "2 of 3 classes" in result["note"] and "c" in result["note"]


def test_roc_with_a_single_class_has_no_auc():
    result = roc_curves(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ["a", "b"])
    assert result["auc"] is None and result["note"] == "the test split holds a single class"


def test_the_exact_fair_coin_p_value_is_scipys_binomial_test():
    from scipy.stats import binomtest

    from imgpipe.evaluation.stats import fair_coin_two_sided_p

    for n in [*range(1, 40), 101, 1000, 4001]:
        for k in range(0, n // 2 + 1, max(1, n // 25)):
            expected = min(1.0, binomtest(k, n, 0.5).pvalue)
            assert fair_coin_two_sided_p(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300), (k, n)
    assert fair_coin_two_sided_p(0, 0) == 1.0
    assert fair_coin_two_sided_p(5, 10) == 1.0

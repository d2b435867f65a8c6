import struct
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from imgpipe.plots import plot_confusion_matrix, plot_learning_curves, plot_roc_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) of a PNG, after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    return struct.unpack(">II", data[16:24])


def fake_predictions(n_classes, n=300, seed=0):
    """Labels and probabilities that are informative but not perfect."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probabilities


def test_confusion_matrix_is_a_png(tmp_path):
    path = tmp_path / "sub" / "cm.png"
    plot_confusion_matrix([[27, 3, 0], [2, 25, 3], [0, 1, 29]], ["cat", "dog", "fox"], path, "cnn")
    width, height = png_size(path)
    assert width >= 400 and height >= 400


def test_confusion_matrix_twenty_classes_and_empty_row(tmp_path):
    matrix = np.diag(np.arange(1, 21))
    matrix[3] = 0  # a class without test images must not divide by zero
    names = [f"oregon_wildlife_class_{i}" for i in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_confusion_matrix(matrix, names, tmp_path / "cm.png", "20 classes")
    width, height = png_size(tmp_path / "cm.png")
    # grows with the number of classes so counts stay readable
    assert height > 1000


def test_confusion_matrix_shape_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png", "bad")


def test_roc_binary_matches_sklearn(tmp_path):
    y, probabilities = fake_predictions(2)
    result = plot_roc_curves(y, probabilities, ["elephant", "tank"], tmp_path / "roc.png", "binary")
    png_size(tmp_path / "roc.png")
    assert list(result["per_class"]) == ["tank"]
    assert result["per_class"]["tank"] == pytest.approx(roc_auc_score(y, probabilities[:, 1]))
    assert result["macro"] is None and result["skipped"] == []


def test_roc_binary_accepts_positive_column(tmp_path):
    y, probabilities = fake_predictions(2, seed=1)
    two_columns = plot_roc_curves(y, probabilities, ["a", "b"], tmp_path / "a.png", "t")
    one_column = plot_roc_curves(y, probabilities[:, 1], ["a", "b"], tmp_path / "b.png", "t")
    assert one_column["per_class"] == pytest.approx(two_columns["per_class"])


def test_roc_binary_single_class_does_not_crash(tmp_path):
    y = np.zeros(20, dtype=int)
    result = plot_roc_curves(y, np.full((20, 2), 0.5), ["a", "b"], tmp_path / "roc.png", "one class")
    png_size(tmp_path / "roc.png")
    assert result["per_class"] == {} and result["skipped"] == ["b"]


def test_roc_multiclass_matches_sklearn_ovr(tmp_path):
    y, probabilities = fake_predictions(4)
    names = ["cat", "dog", "fox", "owl"]
    result = plot_roc_curves(y, probabilities, names, tmp_path / "roc.png", "multiclass")
    png_size(tmp_path / "roc.png")
    for index, name in enumerate(names):
        assert result["per_class"][name] == pytest.approx(roc_auc_score(y == index, probabilities[:, index]))
    assert result["macro"] == pytest.approx(roc_auc_score(y, probabilities, multi_class="ovr", average="macro"))


def test_roc_multiclass_skips_class_missing_from_y_true(tmp_path):
    y, probabilities = fake_predictions(3, seed=2)
    y[y == 2] = 0
    result = plot_roc_curves(y, probabilities, ["a", "b", "c"], tmp_path / "roc.png", "missing class")
    png_size(tmp_path / "roc.png")
    assert result["skipped"] == ["c"]
    assert set(result["per_class"]) == {"a", "b"}
    assert result["macro"] == pytest.approx(np.mean(list(result["per_class"].values())))


def test_roc_probability_shape_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match="expected \\(10, 3\\)"):
        plot_roc_curves(np.zeros(10, dtype=int), np.zeros((10, 2)), ["a", "b", "c"], tmp_path / "roc.png", "t")


def history(epochs, offset):
    epoch = np.arange(1, epochs + 1)
    return pd.DataFrame({
        "epoch": epoch,
        "train_loss": 1.0 / epoch + offset,
        "train_accuracy": 1 - 0.5 / epoch,
        "val_loss": 1.2 / epoch + offset,
        "val_accuracy": 1 - 0.6 / epoch,
        "lr": 0.001,
        "seconds": 1.0,
    })


def test_learning_curves(tmp_path):
    plot_learning_curves({"cnn": history(30, 0.0), "resnet18": history(10, 0.1)}, tmp_path / "curves.png")
    width, height = png_size(tmp_path / "curves.png")
    assert width > 2 * height  # two subplots side by side


def test_learning_curves_without_histories_still_writes(tmp_path):
    plot_learning_curves({}, tmp_path / "curves.png")
    png_size(tmp_path / "curves.png")

import struct
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from imgpipe.evaluation.plots import (
    most_confident,
    plot_confident_errors,
    plot_confusion_matrix,
    plot_embedding,
    plot_learning_curves,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_unavailable,
)
from imgpipe.evaluation.stats import calibration_bins, roc_curves

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


def plot_roc(y, probabilities, names, path, title):
    """stats.roc_curves (the one place ROC is computed) drawn by plot_roc_curves."""
    roc = roc_curves(y, probabilities, names)
    plot_roc_curves(roc, path, title)
    png_size(path)
    return {"per_class": {name: c["auc"] for name, c in roc["per_class"].items()}, "macro": roc["auc"],
            "skipped": roc["skipped"]}


def test_roc_binary_matches_sklearn(tmp_path):
    y, probabilities = fake_predictions(2)
    result = plot_roc(y, probabilities, ["elephant", "tank"], tmp_path / "roc.png", "binary")
    assert list(result["per_class"]) == ["tank"]
    assert result["per_class"]["tank"] == pytest.approx(roc_auc_score(y, probabilities[:, 1]))
    assert result["macro"] == pytest.approx(result["per_class"]["tank"]) and result["skipped"] == []


def test_roc_binary_accepts_positive_column(tmp_path):
    y, probabilities = fake_predictions(2, seed=1)
    two_columns = plot_roc(y, probabilities, ["a", "b"], tmp_path / "a.png", "t")
    one_column = plot_roc(y, probabilities[:, 1], ["a", "b"], tmp_path / "b.png", "t")
    assert one_column["per_class"] == pytest.approx(two_columns["per_class"])


def test_roc_binary_single_class_does_not_crash(tmp_path):
    y = np.zeros(20, dtype=int)
    result = plot_roc(y, np.full((20, 2), 0.5), ["a", "b"], tmp_path / "roc.png", "one class")
    assert result["per_class"] == {} and result["skipped"] == ["b"] and result["macro"] is None


def test_roc_multiclass_matches_sklearn_ovr(tmp_path):
    y, probabilities = fake_predictions(4)
    names = ["cat", "dog", "fox", "owl"]
    result = plot_roc(y, probabilities, names, tmp_path / "roc.png", "multiclass")
    for index, name in enumerate(names):
        assert result["per_class"][name] == pytest.approx(roc_auc_score(y == index, probabilities[:, index]))
    assert result["macro"] == pytest.approx(roc_auc_score(y, probabilities, multi_class="ovr", average="macro"))


def test_roc_multiclass_skips_class_missing_from_y_true(tmp_path):
    y, probabilities = fake_predictions(3, seed=2)
    y[y == 2] = 0
    result = plot_roc(y, probabilities, ["a", "b", "c"], tmp_path / "roc.png", "missing class")
    assert result["skipped"] == ["c"]
    assert set(result["per_class"]) == {"a", "b"}
    assert result["macro"] == pytest.approx(np.mean(list(result["per_class"].values())))


def test_roc_probability_shape_mismatch_raises():
    with pytest.raises(ValueError, match="expected \\(10, 3\\)"):
        roc_curves(np.zeros(10, dtype=int), np.zeros((10, 2)), ["a", "b", "c"])


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


def test_reliability_diagram(tmp_path):
    y, probabilities = fake_predictions(10)
    bins, ece = calibration_bins(y, probabilities)
    assert any(b["count"] == 0 for b in bins)  # empty bins are part of what is drawn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_reliability_diagram(bins, ece, tmp_path / "sub" / "reliability.png", "cnn")
    width, height = png_size(tmp_path / "sub" / "reliability.png")
    assert height > width >= 500  # calibration panel above the count panel


@pytest.mark.parametrize("y_true, probabilities", [
    ([0], [[0.97, 0.03]]),
    ([1, 1, 0], [[0.55, 0.45], [0.09, 0.91], [0.99, 0.01]]),
    ([0, 2, 1], [[0.8, 0.1, 0.1], [0.05, 0.1, 0.85], [0.05, 0.9, 0.05]]),  # no errors
])
def test_reliability_diagram_tiny_inputs(tmp_path, y_true, probabilities):
    bins, ece = calibration_bins(np.array(y_true), np.array(probabilities))
    plot_reliability_diagram(bins, ece, tmp_path / "reliability.png", "tiny")
    png_size(tmp_path / "reliability.png")


def test_reliability_diagram_without_images_still_writes(tmp_path):
    empty = [{"lower": i / 10, "upper": (i + 1) / 10, "count": 0, "confidence": None, "accuracy": None}
             for i in range(10)]
    plot_reliability_diagram(empty, 0.0, tmp_path / "a.png", "empty")
    plot_reliability_diagram([], 0.0, tmp_path / "b.png", "no bins")
    png_size(tmp_path / "a.png")
    png_size(tmp_path / "b.png")


def clustered_features(n_classes, n, dim=16, seed=0):
    """Features that cluster by class, and predictions with some errors."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    features = rng.normal(0.0, 4.0, size=(n_classes, dim))[y] + rng.normal(size=(n, dim))
    predicted = np.where(rng.random(n) < 0.2, rng.integers(0, n_classes, size=n), y)
    return features, y, predicted


def test_embedding_pca_and_tsne(tmp_path):
    features, y, predicted = clustered_features(10, 120)
    names = [f"class_{i}" for i in range(10)]
    result = plot_embedding(features, y, predicted, names, tmp_path / "sub" / "embedding.png", "cnn")
    width, height = png_size(tmp_path / "sub" / "embedding.png")
    assert width > 2 * height  # PCA and t-SNE side by side, legend beside them
    assert result["tsne"] is True
    assert len(result["pca_explained_variance"]) == 2
    assert result["pca_explained_variance"][0] >= result["pca_explained_variance"][1] > 0
    assert sum(result["pca_explained_variance"]) <= 1.0 + 1e-9


def test_embedding_skips_tsne_above_tsne_max(tmp_path):
    features, y, predicted = clustered_features(2, 60)
    result = plot_embedding(features, y, predicted, ["cat", "dog"], tmp_path / "e.png", "t", tsne_max=59)
    png_size(tmp_path / "e.png")
    assert result["tsne"] is False
    assert len(result["pca_explained_variance"]) == 2


def test_embedding_thirty_classes_with_one_absent(tmp_path):
    features, y, predicted = clustered_features(29, 300, seed=1)
    names = [f"oregon_wildlife_class_{i}" for i in range(30)]
    predicted[0] = 29  # predicted, yet without test images of its own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = plot_embedding(features, y, predicted, names, tmp_path / "e.png", "30 classes", tsne_max=100)
    png_size(tmp_path / "e.png")
    assert result["tsne"] is False


@pytest.mark.parametrize("n, components, tsne", [(0, 0, False), (1, 0, False), (2, 1, False), (3, 2, False),
                                                 (4, 2, True)])
def test_embedding_tiny_inputs(tmp_path, n, components, tsne):
    features, y, predicted = clustered_features(3, n)
    result = plot_embedding(features, y, predicted, ["a", "b", "c"], tmp_path / "e.png", "tiny")
    png_size(tmp_path / "e.png")
    # n points span n-1 directions at most
    assert len(result["pca_explained_variance"]) == components
    assert result["tsne"] is tsne


def test_embedding_one_dimensional_features(tmp_path):
    features, y, predicted = clustered_features(2, 50, dim=1)
    result = plot_embedding(features, y, predicted, ["cat", "dog"], tmp_path / "e.png", "1-d")
    png_size(tmp_path / "e.png")
    assert result == {"pca_explained_variance": [pytest.approx(1.0)], "tsne": False}


def test_embedding_identical_features_and_no_errors(tmp_path):
    y = np.array([0, 1, 0, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = plot_embedding(np.ones((6, 8)), y, y, ["cat", "dog"], tmp_path / "e.png", "collapsed")
    png_size(tmp_path / "e.png")
    assert result["pca_explained_variance"] == [0.0, 0.0]


def test_embedding_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="3 feature rows, 2 true labels"):
        plot_embedding(np.zeros((3, 4)), [0, 1], [0, 1], ["a", "b"], tmp_path / "e.png", "bad")
    with pytest.raises(ValueError, match="labels \\[2\\]"):
        plot_embedding(np.zeros((2, 4)), [0, 2], [0, 1], ["a", "b"], tmp_path / "e.png", "bad")


def test_most_confident_sorts_and_truncates():
    assert most_confident([0.6, 0.99, 0.7, 0.95], 2) == [1, 3]
    assert most_confident([0.6, 0.99, 0.7], 16) == [1, 2, 0]
    assert most_confident([0.8, 0.9, 0.8], 3) == [1, 0, 2]  # ties keep input order: reruns draw the same grid
    assert most_confident([], 16) == []


def write_images(directory, n, size=40):
    """Small PNGs, alternately grayscale and RGB, as the preprocess stage writes them."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        shape = (size, size) if i % 2 else (size, size, 3)
        path = directory / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_confident_errors_draws_at_most_max_images(tmp_path):
    paths = write_images(tmp_path, 20)
    confidences = np.linspace(0.4, 0.99, 20)
    drawn = plot_confident_errors(paths, ["cat"] * 20, ["dog"] * 20, confidences, tmp_path / "out" / "e.png", "cnn")
    assert drawn == 16
    width, height = png_size(tmp_path / "out" / "e.png")
    assert width >= 800 and height >= 800  # a 4 x 4 grid of thumbnails


@pytest.mark.parametrize("n", [1, 2, 3])
def test_confident_errors_tiny_inputs(tmp_path, n):
    paths = write_images(tmp_path, n)
    names = ["tank", "elephant"]
    drawn = plot_confident_errors(paths, names[:1] * n, names[1:] * n, [0.9] * n, tmp_path / "e.png", "tiny")
    assert drawn == n
    png_size(tmp_path / "e.png")


def test_confident_errors_unreadable_image_does_not_crash(tmp_path):
    paths = write_images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths += [tmp_path / "missing.png", tmp_path / "broken.png"]
    drawn = plot_confident_errors(paths, ["a"] * 4, ["b"] * 4, [0.5, 0.6, 0.99, 0.98], tmp_path / "e.png", "t",
                                  max_images=3)
    assert drawn == 3
    png_size(tmp_path / "e.png")


def test_confident_errors_without_errors_still_writes(tmp_path):
    assert plot_confident_errors([], [], [], [], tmp_path / "e.png", "perfect") == 0
    png_size(tmp_path / "e.png")


def test_confident_errors_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="2 paths, 1 true labels"):
        plot_confident_errors(["a.png", "b.png"], ["x"], ["y", "y"], [0.9, 0.8], tmp_path / "e.png", "bad")


def test_an_unavailable_plot_says_why(tmp_path):
    plot_unavailable(tmp_path / "embedding.png", "cnn: embedding", "not drawn: no Linear layer")
    png_size(tmp_path / "embedding.png")

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import model_settings

from imgpipe.core.manifests import SPEED_KEYS
from imgpipe.evaluation.evaluate import (
    classification_metrics,
    evaluate_checkpoint,
    mlflow_test_metrics,
    write_evaluation_outputs,
)
from imgpipe.models.checkpoints import CheckpointError
from imgpipe.models.networks import load_trained_model
from imgpipe.training.engine import TrainingJob, train_model

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}


def test_evaluation_on_the_test_split(shapes_manifest, tmp_path):
    settings = model_settings(epochs=4, lr=0.01, batch_size=16)
    train_model(TrainingJob("cnn", settings, IMAGE, shapes_manifest, tmp_path / "resume", tmp_path / "m.pt",
                            torch.device("cpu")))
    evaluation = evaluate_checkpoint(tmp_path / "m.pt", shapes_manifest, device="cpu", batch_size=16)
    metrics, predictions, probabilities = evaluation.metrics, evaluation.predictions, evaluation.probabilities
    split = pd.read_csv(shapes_manifest)
    assert metrics["n_test"] == (split["split"] == "test").sum() == len(predictions)
    assert metrics["accuracy"] == pytest.approx((predictions["label"] == predictions["predicted"]).mean())
    assert set(metrics["per_class"]) == {"bright", "dark"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_test"]
    assert metrics["roc_auc"] is not None and probabilities.shape == (metrics["n_test"], 2)
    json.dumps(metrics)  # plain types only
    low, high = metrics["confidence_intervals"]["accuracy"]
    assert low <= metrics["accuracy"] <= high
    assert metrics["latency_ms_batch1"] > 0 and metrics["throughput_images_per_s"] > 0
    assert metrics["throughput_batch_size"] == 16
    assert metrics["file_bytes"] == (tmp_path / "m.pt").stat().st_size
    assert sum(b["count"] for b in metrics["calibration_bins"]) == metrics["n_test"]
    assert "top3_accuracy" not in metrics  # 2 classes: top-3 would always be 1
    # Features are the classifier's input, one row per test image.
    model, _ = load_trained_model(tmp_path / "m.pt")
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert evaluation.features.shape == (metrics["n_test"], linear.in_features)
    assert np.allclose(predictions[["p_bright", "p_dark"]].sum(axis=1), 1.0, atol=1e-5)

    # the speed figures are measurements: written beside metrics.json, not in it
    again = evaluate_checkpoint(tmp_path / "m.pt", shapes_manifest, device="cpu", batch_size=16).metrics
    for name, figures in (("a", metrics), ("b", again)):
        write_evaluation_outputs(figures, [tmp_path / f"{name}.json"], tmp_path / f"{name}.speed.json", 1.5)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    speed = json.loads((tmp_path / "a.speed.json").read_text())
    assert speed == {key: metrics[key] for key in SPEED_KEYS} | {"train_seconds": 1.5}
    assert not set(SPEED_KEYS) & set(json.loads((tmp_path / "a.json").read_text()))
    model, checkpoint = load_trained_model(tmp_path / "m.pt")
    assert not model.training and checkpoint["arch"] == "simple_cnn"


def test_a_truncated_model_with_its_own_head_is_rebuilt_for_evaluation(shapes_manifest, tmp_path):
    settings = model_settings(arch="resnet18", truncate="layer3", head_hidden=[16], head_dropout=0.3, epochs=1)
    train_model(TrainingJob("cut", settings, IMAGE, shapes_manifest, tmp_path / "resume", tmp_path / "m.pt",
                            torch.device("cpu")))
    model, checkpoint = load_trained_model(tmp_path / "m.pt")
    assert checkpoint["build"] == {"arch": "resnet18", "truncate": "layer3", "head_hidden": [16], "head_dropout": 0.3}
    assert not hasattr(model, "layer3") and model.head[-1].out_features == 2
    evaluation = evaluate_checkpoint(tmp_path / "m.pt", shapes_manifest, device="cpu")
    assert evaluation.metrics["n_test"] > 0 and evaluation.features.shape[1] == 16


def test_evaluating_a_plain_state_dict_says_what_it_lacks(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="weights.pt' is not an imgpipe model checkpoint .*lacks state_dict, arch"):
        load_trained_model(path)


def test_metrics_on_known_predictions_with_a_class_absent_from_the_test_split():
    # Four classes; "d" has no test image and is never predicted.
    y_true = np.array([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    probabilities = np.eye(4)[predicted] * 0.6 + 0.1
    metrics = classification_metrics(y_true, probabilities, ["a", "b", "c", "d"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["a"]["recall"] == pytest.approx(0.5)
    # F1 per class: a 1/2, b 4/5, c 2/3; d has no test image and is never predicted: left out, and said so.
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert metrics["macro_f1_note"] == "macro over the 3 of 4 classes in the test split or predicted (absent: d)"
    assert metrics["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["weighted_f1"] == pytest.approx((2 * 1 / 2 + 2 * 4 / 5 + 2 * 2 / 3) / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert metrics["top3_accuracy"] == pytest.approx(1.0) and "top5_accuracy" not in metrics
    assert metrics["log_loss"] == pytest.approx(-(4 * np.log(0.7) + 2 * np.log(0.1)) / 6)
    assert metrics["ece"] == pytest.approx(abs(4 / 6 - 0.7))  # every confidence is 0.7
    assert metrics["roc_auc"] is not None and "3 of 4 classes" in metrics["roc_auc_note"]
    assert metrics["confused_pairs"] == [{"true": "a", "predicted": "b", "count": 1},
                                         {"true": "c", "predicted": "a", "count": 1}]


def test_non_finite_outputs_are_refused_with_the_cause():
    probabilities = np.array([[0.5, 0.5], [np.nan, np.nan]])
    with pytest.raises(ValueError, match="not finite numbers .* for 1 test image.*training diverged"):
        classification_metrics(np.array([0, 1]), probabilities, ["a", "b"])


def test_metrics_in_the_binary_case():
    y_true = np.array([0, 0, 0, 1, 1])
    positive = np.array([0.2, 0.7, 0.1, 0.9, 0.4])
    metrics = classification_metrics(y_true, np.column_stack([1 - positive, positive]), ["cat", "dog"])
    # Predicted: 0 1 0 1 0 -> cat P 2/3 R 2/3, dog P 1/2 R 1/2.
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["per_class"]["dog"]["f1"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # dog scores 0.9, 0.4 against 0.2, 0.7, 0.1: 5 of 6 pairs ordered.
    assert metrics["roc_auc"] == pytest.approx(5 / 6) and metrics["roc_auc_note"] is None
    assert not any(key.startswith("top") for key in metrics)


def test_mlflow_test_metrics_name_every_headline_figure():
    y_true = np.array([0, 1, 2, 3, 0, 1])
    probabilities = np.eye(4)[[0, 1, 2, 0, 0, 2]] * 0.7 + 0.075
    metrics = classification_metrics(y_true, probabilities, ["a", "b", "c", "d"])
    logged = mlflow_test_metrics({**metrics, "latency_ms_batch1": 0.5, "roc_auc": None})
    assert logged["test/accuracy"] == pytest.approx(4 / 6)
    assert logged["test/top3_accuracy"] == metrics["top3_accuracy"]
    assert logged["test_interval/accuracy_low"] <= logged["test/accuracy"] <= logged["test_interval/accuracy_high"]
    assert logged["test_per_class/f1_a"] == metrics["per_class"]["a"]["f1"] and "test_per_class/support_a" not in logged
    assert "test/roc_auc" not in logged and logged["test/latency_ms_batch1"] == 0.5
    assert all(isinstance(value, float) for value in logged.values())


def test_penultimate_features_need_a_linear_classifier():
    from imgpipe.evaluation.evaluate import penultimate_features

    with pytest.raises(ValueError, match="Sequential has no Linear layer"):
        penultimate_features(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    hook, collected = penultimate_features(model)
    model(torch.ones(5, 4))
    hook.remove()
    model(torch.ones(5, 4))
    assert len(collected) == 1 and collected[0].shape == (5, 3)  # the last Linear's input, until removed

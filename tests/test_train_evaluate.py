import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import model_settings
from imgpipe.checkpoints import CheckpointError, load_trained_model
from imgpipe.evaluate import classification_metrics, evaluate_checkpoint, roc_auc
from imgpipe.training.engine import TrainingJob, train_model

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}


def test_evaluation_on_the_test_split(shapes_manifest, tmp_path):
    settings = model_settings(epochs=4, lr=0.01, batch_size=16)
    train_model(TrainingJob("cnn", settings, IMAGE, shapes_manifest, tmp_path / "resume", tmp_path / "m.pt",
                            torch.device("cpu")))
    metrics, predictions, y_true, probabilities = evaluate_checkpoint(tmp_path / "m.pt", shapes_manifest, device="cpu")
    split = pd.read_csv(shapes_manifest)
    assert metrics["n_test"] == (split["split"] == "test").sum() == len(predictions)
    assert metrics["accuracy"] == pytest.approx((predictions["label"] == predictions["predicted"]).mean())
    assert set(metrics["per_class"]) == {"bright", "dark"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_test"]
    assert metrics["roc_auc"] is not None and probabilities.shape == (metrics["n_test"], 2)
    json.dumps(metrics)  # plain types only
    model, checkpoint = load_trained_model(tmp_path / "m.pt")
    assert not model.training and checkpoint["arch"] == "simple_cnn"


def test_a_truncated_model_with_its_own_head_is_rebuilt_for_evaluation(shapes_manifest, tmp_path):
    settings = model_settings(arch="resnet18", truncate="layer3", head_hidden=[16], head_dropout=0.3, epochs=1)
    train_model(TrainingJob("cut", settings, IMAGE, shapes_manifest, tmp_path / "resume", tmp_path / "m.pt",
                            torch.device("cpu")))
    model, checkpoint = load_trained_model(tmp_path / "m.pt")
    assert checkpoint["build"] == {"arch": "resnet18", "truncate": "layer3", "head_hidden": [16], "head_dropout": 0.3}
    assert not hasattr(model, "layer3") and model.head[-1].out_features == 2
    metrics, *_ = evaluate_checkpoint(tmp_path / "m.pt", shapes_manifest, device="cpu")
    assert metrics["n_test"] > 0


def test_evaluating_a_plain_state_dict_says_what_it_lacks(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="weights.pt' is not an imgpipe model checkpoint .*lacks state_dict, arch"):
        load_trained_model(path)


def test_metrics_on_known_predictions():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    metrics = classification_metrics(y_true, probabilities, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["a"]["recall"] == pytest.approx(0.5)


def test_roc_auc_says_why_it_is_missing():
    probabilities = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    auc, note = roc_auc(np.array([0, 1]), probabilities)
    assert auc is None and "lacks 1 of 3" in note
    auc, note = roc_auc(np.array([1, 1]), probabilities[:, :2])
    assert auc is None and "single class" in note
    auc, _ = roc_auc(np.array([0, 1]), np.array([[0.7, 0.3], [0.2, 0.8]]))
    assert auc == 1.0

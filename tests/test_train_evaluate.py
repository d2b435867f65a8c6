import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_shape_images
from imgpipe.evaluate import classification_metrics, evaluate_checkpoint, roc_auc
from imgpipe.preprocess import prepare_image
from imgpipe.split import stratified_group_split, write_manifest
from imgpipe.train import HISTORY_COLUMNS, load_trained_model, pick_device, train_classifier

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}
SETTINGS = {"arch": "simple_cnn", "weights": "none", "epochs": 4, "batch_size": 16, "optimizer": "adam",
            "lr": 0.01, "scheduler": "cosine", "momentum": 0.9, "weight_decay": 0.0, "seed": 5, "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for kind in ("bright", "dark"):
        for path in write_shape_images(root / "raw" / kind, kind, 40):
            target = root / "images" / kind / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            prepare_image(path, 32, "grayscale", "stretch").save(target)
            rows.append((str(target), kind, str(target)))
    path = root / "manifest.csv"
    write_manifest(stratified_group_split(pd.DataFrame(rows, columns=["path", "label", "group"]),
                                          {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0), path)
    return path


def test_training_keeps_the_best_validation_epoch_and_is_reproducible(manifest, tmp_path):
    epochs_seen = []
    history, summary = train_classifier("cnn", SETTINGS, IMAGE, manifest, tmp_path / "a.pt",
                                        on_epoch=epochs_seen.append)
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == 4
    assert [row["epoch"] for row in epochs_seen] == [1, 2, 3, 4]
    best = history.sort_values(["val_accuracy", "val_loss"], ascending=[False, True]).iloc[0]
    assert summary["best_epoch"] == best["epoch"]
    checkpoint = torch.load(tmp_path / "a.pt", weights_only=True)
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["classes"] == ["bright", "dark"]
    assert checkpoint["image"] == IMAGE and summary["device"] == "cpu" and summary["threads"] == 1
    assert summary["best_val_accuracy"] > 0.8  # two easy shapes: a model that learned nothing scores 0.5

    again, _ = train_classifier("cnn", SETTINGS, IMAGE, manifest, tmp_path / "b.pt")
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), again.drop(columns="seconds"))


def test_evaluation_on_the_test_split(manifest, tmp_path):
    train_classifier("cnn", SETTINGS, IMAGE, manifest, tmp_path / "m.pt")
    metrics, predictions, y_true, probabilities = evaluate_checkpoint(tmp_path / "m.pt", manifest, device="cpu")
    split = pd.read_csv(manifest)
    assert metrics["n_test"] == (split["split"] == "test").sum() == len(predictions)
    assert metrics["accuracy"] == pytest.approx((predictions["label"] == predictions["predicted"]).mean())
    assert set(metrics["per_class"]) == {"bright", "dark"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_test"]
    assert metrics["roc_auc"] is not None and probabilities.shape == (metrics["n_test"], 2)
    json.dumps(metrics)  # plain types only
    model, checkpoint = load_trained_model(tmp_path / "m.pt")
    assert not model.training and checkpoint["arch"] == "simple_cnn"


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


def test_an_absent_device_is_an_error_and_auto_falls_back_to_cpu():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda'"):
            pick_device("cuda")
        assert pick_device("auto").type == "cpu"
    assert pick_device("cpu").type == "cpu"

"""Evaluation on the held-out test split: the figures a comparison needs, computed once."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from imgpipe.checkpoints import load_trained_model
from imgpipe.datasets import Normalizer, load_split
from imgpipe.manifests import read_split_manifest
from imgpipe.training.devices import pick_device

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(model, images: torch.Tensor, normalization, device, batch_size: int = 256) -> np.ndarray:
    normalize = Normalizer(normalization, device)
    outputs = []
    for start in range(0, len(images), batch_size):
        logits = model(normalize(images[start:start + batch_size].to(device)))
        outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(outputs).numpy()


def roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[float | None, str | None]:
    """Binary AUC, or macro one-vs-rest AUC; (None, why) when the test split cannot give one."""
    n_classes = probabilities.shape[1]
    present = np.unique(y_true)
    if len(present) < 2:
        return None, "the test split holds a single class"
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true, probabilities[:, 1])), None
    if len(present) < n_classes:
        return None, f"the test split lacks {n_classes - len(present)} of {n_classes} classes"
    return float(skm.roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro")), None


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    auc, auc_note = roc_auc(y_true, probabilities)
    return {
        "n_test": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": auc,
        "roc_auc_note": auc_note,
        "classes": list(classes),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def evaluate_checkpoint(checkpoint_path: Path | str, manifest_path: Path | str, device: str | torch.device = "auto",
                        threads: int = 1) -> tuple[dict, pd.DataFrame, np.ndarray, np.ndarray]:
    """Metrics, per-image predictions, true labels and probabilities of one model on the test split."""
    torch.set_num_threads(threads)
    device = device if isinstance(device, torch.device) else pick_device(device)
    model, checkpoint = load_trained_model(checkpoint_path, device)
    classes = checkpoint["classes"]
    manifest = read_split_manifest(manifest_path)
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise ValueError(f"test labels {unknown} in {manifest_path} are not among the classes {checkpoint_path} "
                         f"was trained on ({classes})")
    test = load_split(manifest, "test", classes)
    started = time.perf_counter()
    probabilities = predict_probabilities(model, test.images, checkpoint["normalization"], device)
    seconds = time.perf_counter() - started
    y_true = test.labels.numpy()
    result = classification_metrics(y_true, probabilities, classes)
    result["inference_ms_per_image"] = 1000 * seconds / len(y_true)
    predictions = pd.DataFrame({
        "path": test.paths,
        "label": [classes[i] for i in y_true],
        "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
        "confidence": probabilities.max(axis=1),
    })
    log.info("%s: test accuracy %.4f, macro F1 %.4f on %d images", checkpoint["model_name"], result["accuracy"],
             result["macro_f1"], result["n_test"])
    return result, predictions, y_true, probabilities

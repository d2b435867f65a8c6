"""Evaluation on the held-out test split: the figures a comparison needs, computed once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from imgpipe.core.files import write_json
from imgpipe.core.manifests import SPEED_KEYS, read_split_manifest
from imgpipe.evaluation import stats
from imgpipe.models.checkpoints import checkpoint_task
from imgpipe.models.localize import box_iou, split_outputs
from imgpipe.models.networks import load_trained_model
from imgpipe.training.datasets import Normalizer, load_split
from imgpipe.training.devices import pick_device

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(model, images: torch.Tensor, normalization, device, batch_size: int = 256,
                          num_classes: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Class probabilities of each image; for a localising model (give its `num_classes`) also
    its predicted box (x0, y0, x1, y1, shares of the image): (probabilities, boxes)."""
    normalize = Normalizer(normalization, device)
    probabilities, boxes = [], []
    for start in range(0, len(images), batch_size):
        outputs = model(normalize(images[start:start + batch_size].to(device))).float()
        if num_classes is not None:
            outputs, predicted = split_outputs(outputs, num_classes)
            boxes.append(predicted.cpu())
        probabilities.append(torch.softmax(outputs, dim=1).cpu())
    if num_classes is None:
        return torch.cat(probabilities).numpy()
    return torch.cat(probabilities).numpy(), torch.cat(boxes).numpy()


def localization_metrics(y_true: np.ndarray, true_boxes: np.ndarray, has_box: np.ndarray, predicted_boxes: np.ndarray,
                         classes: list[str]) -> dict:
    """mIoU over the test images with a box, the share with IoU >= 0.5, and mIoU per class."""
    ious = box_iou(torch.from_numpy(predicted_boxes).double(), torch.from_numpy(true_boxes).double()).numpy()
    scored = ious[has_box]
    per_class = {name: float(ious[has_box & (y_true == index)].mean())
                 for index, name in enumerate(classes) if (has_box & (y_true == index)).any()}
    return {"miou": float(scored.mean()) if len(scored) else None,
            "iou_at_least_0_5": float((scored >= 0.5).mean()) if len(scored) else None,
            "n_boxes": int(has_box.sum()), "miou_per_class": per_class, "ious": ious}


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           bootstrap_seed: int = 0, roc: dict | None = None) -> dict:
    """Every test figure of one model that depends only on labels and probabilities.

    `roc`: stats.roc_curves of the same data, when the caller has it already (for the plot).
    """
    if not np.isfinite(probabilities).all():
        raise ValueError("the model's outputs are not finite numbers (NaN or infinity) for "
                         f"{int((~np.isfinite(probabilities)).any(axis=1).sum())} test image(s): its training "
                         f"diverged; retrain it with a lower lr")
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    # Macro F1 averages over the classes the test split holds or the model predicts, as
    # balanced accuracy and ROC AUC leave out a class without test images.
    seen = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    roc = roc if roc is not None else stats.roc_curves(y_true, probabilities, classes)
    bins, ece = stats.calibration_bins(y_true, probabilities)
    confusion = skm.confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n_test": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=seen, average="macro", zero_division=0)),
        "macro_f1_note": (None if len(seen) == len(classes) else
                          f"macro over the {len(seen)} of {len(classes)} classes in the test split or predicted "
                          f"(absent: {', '.join(classes[i] for i in labels if i not in seen)})"),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        **{f"top{k}_accuracy": stats.top_k_accuracy(y_true, probabilities, k) for k in stats.top_k_values(len(classes))},
        "log_loss": stats.log_loss(y_true, probabilities),
        "ece": ece,
        "calibration_bins": bins,
        "roc_auc": roc["auc"],
        "roc_auc_note": roc["note"],
        "confidence_intervals": {name: list(interval) for name, interval in stats.bootstrap_intervals(
            y_true, y_pred, len(classes), seed=bootstrap_seed).items()},
        "classes": list(classes),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
        "confused_pairs": most_confused_pairs(confusion, classes),
    }


def most_confused_pairs(confusion: np.ndarray, classes: list[str], top: int = 5) -> list[dict]:
    """The (true, predicted) class pairs with the most mistakes, most first."""
    mistakes = [(int(confusion[t, p]), classes[t], classes[p])
                for t in range(len(classes)) for p in range(len(classes)) if t != p and confusion[t, p] > 0]
    mistakes.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [{"true": t, "predicted": p, "count": n} for n, t, p in mistakes[:top]]


@dataclass
class Evaluation:
    """One model on the test split: metrics.json's content and what the plots need."""

    metrics: dict
    predictions: pd.DataFrame  # path, label, predicted, confidence, one probability column per class
    y_true: np.ndarray
    probabilities: np.ndarray
    features: np.ndarray | None  # the classifier layer's input per test image (for the embedding plot)
    features_note: str | None  # why there are no features (no Linear classifier layer)
    roc: dict  # stats.roc_curves: the curves the plot draws and the AUC the metrics report


# metrics.json figures that MLflow shows as the run's test_* metrics.
MLFLOW_TEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "log_loss", "ece",
                       "n_test", "latency_ms_batch1", "throughput_images_per_s", "inference_ms_per_image",
                       "n_parameters", "file_bytes", "miou", "iou_at_least_0_5", "n_boxes")


def mlflow_test_metrics(metrics: dict) -> dict[str, float]:
    """The run's test metrics: 'test/<figure>' (top-k included), interval bounds under
    'test_interval/', per-class figures under 'test_per_class/'; None skipped.

    MLflow's chart view groups metrics into sections by the part before '/', sorted by
    name, with the unprefixed ones (the training curves) last: so the headline figures'
    charts open the page, and a 100-class experiment's 300 per-class charts sit in a
    section of their own.
    """
    chosen = {f"test/{key}": metrics.get(key) for key in MLFLOW_TEST_METRICS}
    chosen.update({f"test/{key}": value for key, value in metrics.items()
                   if key.startswith("top") and key.endswith("_accuracy")})
    for name, (low, high) in metrics.get("confidence_intervals", {}).items():
        chosen[f"test_interval/{name}_low"], chosen[f"test_interval/{name}_high"] = low, high
    chosen.update({f"test_per_class/miou_{name}": value for name, value in metrics.get("miou_per_class", {}).items()})
    for name, figures in metrics.get("per_class", {}).items():
        chosen.update({f"test_per_class/{stat}_{name}": value for stat, value in figures.items() if stat != "support"})
    return {key: float(value) for key, value in chosen.items() if value is not None}


def penultimate_features(model: torch.nn.Module):
    """(hook handle, list): the list collects the input of the model's last Linear layer
    on each forward pass until the handle is removed.

    In every architecture imgpipe builds, the classifier is the last Linear module
    registered, and its input is the penultimate-layer representation; in a localising
    model, the last of its class head (the box head beside it comes after).
    """
    from imgpipe.models.localize import ClassAndBoxHead

    heads = [module for module in model.modules() if isinstance(module, ClassAndBoxHead)]
    searched = heads[0].classes if heads else model
    linear = [module for module in searched.modules() if isinstance(module, torch.nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no Linear layer to take penultimate features from")
    collected: list[torch.Tensor] = []
    handle = linear[-1].register_forward_hook(
        lambda module, inputs, output: collected.append(inputs[0].detach().float().cpu()))
    return handle, collected


@torch.no_grad()
def measure_speed(model, example: torch.Tensor, batch_size: int, device, budget_seconds: float = 3.0) -> dict:
    """Latency at batch 1 and throughput at `batch_size`: medians after warm-up.

    Each is timed for at most about `budget_seconds` (at least 3 repetitions), so a large
    model on a CPU does not turn evaluation into a benchmark run.
    """
    def synchronize() -> None:  # GPU calls return before the work is done
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    def median_seconds(batch: torch.Tensor) -> float:
        for _ in range(2):  # warm-up: first calls allocate and pick kernels
            model(batch)
        synchronize()
        times: list[float] = []
        deadline = time.perf_counter() + budget_seconds
        while len(times) < 3 or (len(times) < 30 and time.perf_counter() < deadline):
            started = time.perf_counter()
            model(batch)
            synchronize()
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    single = example[:1].to(device)
    batch = example[:1].expand(batch_size, *example.shape[1:]).contiguous().to(device)
    return {
        "latency_ms_batch1": 1000 * median_seconds(single),
        "throughput_images_per_s": batch_size / median_seconds(batch),
        "throughput_batch_size": batch_size,
    }


def evaluate_checkpoint(checkpoint_path: Path | str, manifest_path: Path | str, device: str | torch.device = "auto",
                        threads: int = 1, batch_size: int = 32) -> Evaluation:
    """One model on the test split: metrics, per-image predictions, features and speed.

    `batch_size` is the batch the model was trained with: throughput is measured at it.
    """
    torch.set_num_threads(threads)
    device = device if isinstance(device, torch.device) else pick_device(device)
    checkpoint_path = Path(checkpoint_path)
    model, checkpoint = load_trained_model(checkpoint_path, device)
    classes = checkpoint["classes"]
    manifest = read_split_manifest(manifest_path)
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise ValueError(f"test labels {unknown} in {manifest_path} are not among the classes {checkpoint_path} "
                         f"was trained on ({classes})")
    test = load_split(manifest, "test", classes)
    localize = checkpoint_task(checkpoint) == "localize"
    if localize and test.boxes is None:
        raise ValueError(f"{checkpoint_path} is a localising model, but the split manifest {manifest_path} has no "
                         f"boxes")
    try:
        hook, collected = penultimate_features(model)
        features_note = None
    except ValueError as error:  # a classifier without a Linear layer (SqueezeNet's is a convolution)
        hook, collected, features_note = None, [], str(error)
        log.warning("no embedding plot: %s", error)
    started = time.perf_counter()
    boxes = None
    if localize:
        probabilities, boxes = predict_probabilities(model, test.images, checkpoint["normalization"], device,
                                                     num_classes=len(classes))
    else:
        probabilities = predict_probabilities(model, test.images, checkpoint["normalization"], device)
    seconds = time.perf_counter() - started
    if hook is not None:
        hook.remove()
    features = torch.cat(collected).flatten(1).numpy() if collected else None
    y_true = test.labels.numpy()
    roc = stats.roc_curves(y_true, probabilities, classes)
    result = classification_metrics(y_true, probabilities, classes, roc=roc)
    normalized = Normalizer(checkpoint["normalization"], device)(test.images[:1].to(device))
    speed = measure_speed(model, normalized, batch_size, device)
    result.update({
        "inference_ms_per_image": 1000 * seconds / len(y_true),
        **speed,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "file_bytes": checkpoint_path.stat().st_size,
        "eval_device": str(device),
    })
    predictions = pd.DataFrame({
        "path": test.paths,
        "label": [classes[i] for i in y_true],
        "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
        "confidence": probabilities.max(axis=1),
        **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
    })
    if localize:
        has_box = test.has_box.numpy()
        localization = localization_metrics(y_true, test.boxes.numpy(), has_box, boxes, classes)
        ious = localization.pop("ious")
        result.update(localization)
        for index, column in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
            predictions[f"predicted_{column}"] = boxes[:, index].round(6)
        predictions["true_box"] = [",".join(f"{v:.6g}" for v in box) if ok else ""
                                   for box, ok in zip(test.boxes.numpy(), has_box)]
        predictions["iou"] = np.where(has_box, ious.round(6), np.nan)
        if result["miou"] is None:
            log.warning("%s: no test image has a usable box: no localisation figures", checkpoint["model_name"])
        else:
            log.info("%s: test mIoU %.4f over %d images with a box, %.1f%% with IoU >= 0.5",
                     checkpoint["model_name"], result["miou"], result["n_boxes"], 100 * result["iou_at_least_0_5"])
    log.info("%s: test accuracy %.4f (95%% CI %.4f-%.4f), macro F1 %.4f on %d images; %.2f ms per image at "
             "batch 1, %.0f images/s at batch %d", checkpoint["model_name"], result["accuracy"],
             *result["confidence_intervals"]["accuracy"], result["macro_f1"], result["n_test"],
             speed["latency_ms_batch1"], speed["throughput_images_per_s"], batch_size)
    return Evaluation(result, predictions, y_true, probabilities, features, features_note, roc)


def write_evaluation_outputs(metrics: dict, metrics_paths: list[Path | str], speed_path: Path | str,
                             train_seconds: float | None) -> None:
    """metrics.json (at each of `metrics_paths`) without wall-clock figures, so the same
    model evaluated again writes the same bytes; the speed figures (SPEED_KEYS) and the
    training time go to speed.json beside it."""
    results = {key: value for key, value in metrics.items() if key not in SPEED_KEYS}
    speed = {key: metrics[key] for key in SPEED_KEYS if key in metrics} | {"train_seconds": train_seconds}
    for path in metrics_paths:
        write_json(path, results)
    write_json(speed_path, speed)


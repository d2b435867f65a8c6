"""Predict: a trained model directory applied to new images, with the preprocessing it was trained with.

A model directory (`results/<experiment>/models/<model>/`) is all it needs: model.pt holds
the network, the classes, the `images:` settings and the normalisation, so new images go
through exactly the pipeline's steps (`imgpipe.data.preprocess.prepare_image`, the split's
uint8 C x H x W layout, `imgpipe.evaluation.evaluate.predict_probabilities` with its `Normalizer`),
whatever the current config says. model_card.json and test_metrics.json, where present,
add provenance and test figures to the output; neither is required.

A file that is not an image, or does not decode, is listed with the reason and every
other file is still predicted.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from imgpipe.core.files import error_text, read_optional_json, walk_files, writing
from imgpipe.data.boxes import Box, box_on_upright_image, upright_size
from imgpipe.data.images import inspect_image
from imgpipe.data.preprocess import prepare_image_with_geometry, resize_image, to_color
from imgpipe.evaluation.evaluate import predict_probabilities
from imgpipe.models.checkpoints import checkpoint_task
from imgpipe.models.networks import load_trained_model
from imgpipe.serving.modelcard import CARD_FILE
from imgpipe.training.datasets import image_to_chw
from imgpipe.training.devices import pick_device

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
TEST_METRICS_FILE = "test_metrics.json"
DEFAULT_TOP_K = 3
OUTPUT_FORMATS = (".json", ".csv")


class ModelDirError(ValueError):
    """A path that is not a trained model directory; the message names it and says what to pass."""


@dataclass
class Classifier:
    """A trained model ready to predict, with what its directory says about it."""

    model: torch.nn.Module
    checkpoint: dict
    device: torch.device
    checkpoint_path: Path
    card: dict | None = None
    test_metrics: dict | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint["classes"])

    @property
    def localizes(self) -> bool:
        """Whether the model also puts a box on each image (task: localize)."""
        return checkpoint_task(self.checkpoint) == "localize"

    @property
    def image_settings(self) -> dict:
        return dict(self.checkpoint["image"])

    def header(self) -> dict:
        """What the output says about the model: enough to trace a prediction back to it."""
        header = {
            "model_dir": str(self.checkpoint_path.parent),
            "model_name": self.checkpoint.get("model_name"),
            "arch": self.checkpoint["arch"],
            "classes": self.classes,
            "image": self.image_settings,
            "normalization": self.checkpoint["normalization"],
        }
        if self.card is not None:
            header["provenance"] = self.card.get("provenance")
            header["training"] = self.card.get("training")
        if self.test_metrics is not None and "accuracy" in self.test_metrics:
            header["test_accuracy"] = self.test_metrics["accuracy"]
        return header


def open_classifier(checkpoint_path: Path | str, device: str | torch.device = "auto",
                    card_path: Path | str | None = None, test_metrics_path: Path | str | None = None) -> Classifier:
    """A Classifier from an imgpipe model.pt (and, optionally, its model card and test metrics)."""
    device = device if isinstance(device, torch.device) else pick_device(device)
    model, checkpoint = load_trained_model(checkpoint_path, device)
    return Classifier(model, checkpoint, device, Path(checkpoint_path),
                      card=read_optional_json(card_path, "the model card"),
                      test_metrics=read_optional_json(test_metrics_path, "the test metrics"))


def load_classifier(model_dir: Path | str, device: str | torch.device = "auto") -> Classifier:
    """The trained model in `model_dir` (results/<experiment>/models/<model>/)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        hint = " (pass its folder, not the file)" if model_dir.name == CHECKPOINT_FILE else ""
        raise ModelDirError(f"model directory '{model_dir}' is not a folder{hint}: pass a trained model's folder, "
                            f"results/<experiment>/models/<model>/")
    if not (model_dir / CHECKPOINT_FILE).is_file():
        raise ModelDirError(f"model directory '{model_dir}' holds no {CHECKPOINT_FILE}: pass a trained model's "
                            f"folder, results/<experiment>/models/<model>/ (its train job writes {CHECKPOINT_FILE})")
    return open_classifier(model_dir / CHECKPOINT_FILE, device, model_dir / CARD_FILE, model_dir / TEST_METRICS_FILE)


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[dict]]:
    """(files to predict, failures): files as given, folders recursively, glob patterns expanded.

    Each file is taken once, in the order first found. An input that names nothing is a
    failure with its reason, so a typo shows up instead of silently predicting less.
    """
    files: dict[Path, None] = {}
    failures = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = walk_files(path, follow_outside_links=True)  # the user's own folder, named on the command line
            if not found:
                failures.append({"path": item, "reason": "empty folder: no files below it"})
        elif glob.has_magic(item):
            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                found.extend(walk_files(match, follow_outside_links=True) if Path(match).is_dir() else [Path(match)])
            if not found:
                failures.append({"path": item, "reason": "the pattern matches no file"})
        else:
            failures.append({"path": item, "reason": "no such file or folder"})
            found = []
        files.update(dict.fromkeys(found))
    return list(files), failures


def prepare_file(path: Path | str, image_settings: dict) -> np.ndarray:
    """One image file through the model's preprocessing, as uint8 C x H x W."""
    return prepare_file_with_geometry(path, image_settings)[0]


def prepare_file_with_geometry(path: Path | str, image_settings: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`prepare_file`, and the file's stored width, height and EXIF orientation (for its box)."""
    image, stored = prepare_image_with_geometry(path, image_settings["size"], image_settings["color"],
                                                image_settings["resize"], image_settings["pad_color"])
    return image_to_chw(image), stored


def prepare_array(array: np.ndarray, image_settings: dict) -> np.ndarray:
    """A decoded image (uint8 H x W, or H x W x 1/3/4) through the model's preprocessing, as uint8 C x H x W.

    The same colour conversion and resize as `prepare_image`, minus decoding a file.
    """
    array = np.asarray(array)
    # JSON (MLflow serving) carries no uint8: whole numbers within 0-255 are taken as such.
    if array.dtype.kind in "iu" and array.size and 0 <= array.min() and array.max() <= 255:
        array = array.astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must hold 0-255 as uint8, got {array.dtype}: convert with "
                         f"(array * 255).astype('uint8') if it holds 0-1 floats")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be H x W (grayscale) or H x W x 3/4 (RGB/RGBA), got shape "
                         f"{array.shape}")
    image = Image.fromarray(array)
    return image_to_chw(resize_image(to_color(image, image_settings["color"]), image_settings["size"],
                                     image_settings["resize"], image_settings["pad_color"]))


def classify(classifier: Classifier, images: Sequence[np.ndarray], batch_size: int = 64
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N x classes) of preprocessed uint8 C x H x W images, and for a
    localising model the boxes (N x 4, shares of the preprocessed image; else None)."""
    if not len(images):
        return np.zeros((0, len(classifier.classes)), dtype=np.float32), (
            np.zeros((0, 4), dtype=np.float32) if classifier.localizes else None)
    batch = torch.from_numpy(np.stack(images))
    result = predict_probabilities(classifier.model, batch, classifier.checkpoint["normalization"], classifier.device,
                                   batch_size=batch_size,
                                   num_classes=len(classifier.classes) if classifier.localizes else None)
    return result if classifier.localizes else (result, None)


def why_unreadable(path: Path, error: Exception) -> str:
    """The reason a file could not be preprocessed, in the crawl stage's words where it has them."""
    try:
        check = inspect_image(path)
    except OSError as os_error:
        return f"cannot read the file: {error_text(os_error)}"
    return check.reason if not check.ok else f"cannot preprocess: {error_text(error)}"


@dataclass
class Predictions:
    """Probabilities of the files that were predicted, and the inputs that were not, with reasons."""

    classes: list[str]
    paths: list[str] = field(default_factory=list)
    probabilities: np.ndarray | None = None
    failures: list[dict] = field(default_factory=list)
    boxes: list[list[float]] | None = None  # a localising model's: x0, y0, x1, y1 in pixels of the upright image

    def records(self, top_k: int) -> list[dict]:
        """One dict per predicted image: path, label, probability and the top-k labels and
        probabilities (and the box, for a localising model)."""
        records = []
        for number, (path, row) in enumerate(zip(self.paths, self.probabilities)):
            order = np.argsort(-row, kind="stable")[:top_k]
            records.append({
                "path": path,
                "label": self.classes[order[0]],
                "probability": float(row[order[0]]),
                "top_k": [{"label": self.classes[i], "probability": float(row[i])} for i in order],
                **({"box": self.boxes[number]} if self.boxes is not None else {}),
            })
        return records


def predict_files(classifier: Classifier, paths: Sequence[Path | str], batch_size: int = 64,
                  on_progress: Callable[[int], None] | None = None) -> Predictions:
    """Predict every file, `batch_size` images decoded at a time; files that fail are listed with the reason.

    `on_progress` gets the number of files handled after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    result = Predictions(classifier.classes, boxes=[] if classifier.localizes else None)
    chunks = []
    for start in range(0, len(paths), batch_size):
        images, sizes = [], []
        for path in paths[start:start + batch_size]:
            try:
                image, stored = prepare_file_with_geometry(path, classifier.image_settings)
                images.append(image)
                sizes.append(upright_size(stored))
                result.paths.append(str(path))
            except Exception as error:  # one bad file must not stop the others; it is listed with the reason
                result.failures.append({"path": str(path), "reason": why_unreadable(Path(path), error)})
        probabilities, boxes = classify(classifier, images, batch_size)
        chunks.append(probabilities)
        if boxes is not None:
            image = classifier.image_settings
            for box, (width, height) in zip(boxes.tolist(), sizes):
                upright = box_on_upright_image(Box(*box), width, height, image["size"], image["resize"])
                inside = upright.clipped(width, height) or Box(0, 0, 0, 0)  # none left: an empty box, said so
                result.boxes.append([round(value, 1) for value in inside.as_tuple()])
        if on_progress is not None:
            on_progress(min(start + batch_size, len(paths)))
    result.probabilities = (np.concatenate(chunks) if chunks
                            else np.zeros((0, len(classifier.classes)), dtype=np.float32))
    return result


def predict_inputs(classifier: Classifier, inputs: Iterable[str | Path], batch_size: int = 64,
                   on_start: Callable[[int], Callable[[int], None] | None] | None = None) -> Predictions:
    """Predict files, folders and glob patterns; inputs that name nothing are listed as failures too.

    `on_start` gets the number of files found and may return an `on_progress` callback.
    """
    files, failures = collect_inputs(inputs)
    predictions = predict_files(classifier, files, batch_size, on_start(len(files)) if on_start else None)
    predictions.failures = failures + predictions.failures
    for failure in predictions.failures:
        log.warning("not predicted: %s: %s", failure["path"], failure["reason"])
    log.info("%d image(s) predicted, %d input(s) failed", len(predictions.paths), len(predictions.failures))
    return predictions


def best_model_name(summary_path: Path | str) -> str:
    """The model the report ranks first: 'best_model' in its summary.json."""
    try:
        best = json.loads(Path(summary_path).read_text())["best_model"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the best model from the report summary '{summary_path}' "
                         f"({error_text(error)}); rerun the report (snakemake --forcerun report)") from error
    if not best:
        raise ValueError(f"the report summary '{summary_path}' names no best model (no model has a test figure "
                         f"to rank by); name the models to predict with in predict.models")
    return best


def resolve_top_k(top_k: int | None, classes: Sequence[str]) -> int:
    """`top_k` checked against the classes; None: DEFAULT_TOP_K, or all classes when there are fewer."""
    if top_k is None:
        return min(DEFAULT_TOP_K, len(classes))
    if not 1 <= top_k <= len(classes):
        raise ValueError(f"top-k must be between 1 and the model's {len(classes)} classes, got {top_k}")
    return top_k


def csv_columns(top_k: int, boxes: bool = False) -> list[str]:
    columns = ["path", "label", "probability"]
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}_label", f"top{rank}_probability"]
    return columns + (["box_x0", "box_y0", "box_x1", "box_y1"] if boxes else []) + ["error"]


def write_csv(predictions: Predictions, top_k: int, handle) -> None:
    """One row per input: the prediction with its top-k, or an empty prediction and the error."""
    writer = csv.writer(handle, lineterminator="\n")
    boxes = predictions.boxes is not None
    writer.writerow(csv_columns(top_k, boxes))
    for record in predictions.records(top_k):
        ranked = [value for entry in record["top_k"] for value in (entry["label"], entry["probability"])]
        writer.writerow([record["path"], record["label"], record["probability"], *ranked, *record.get("box", []), ""])
    for failure in predictions.failures:
        writer.writerow([failure["path"], *[""] * (2 + 2 * top_k + 4 * boxes), failure["reason"]])


def prediction_document(classifier: Classifier, predictions: Predictions, top_k: int) -> dict:
    return {"model": classifier.header(), "top_k": top_k, "n_predicted": len(predictions.paths),
            "n_failed": len(predictions.failures), "predictions": predictions.records(top_k),
            "failed": predictions.failures}


def write_predictions(classifier: Classifier, predictions: Predictions, top_k: int, out: Path | str | None,
                      stdout=None) -> None:
    """JSON or CSV by the suffix of `out` (written to a temporary file, then renamed); JSON to stdout without one."""
    if out is None:
        json.dump(prediction_document(classifier, predictions, top_k), stdout, indent=2)
        stdout.write("\n")
        return
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"output file '{out}' must end in .json or .csv")
    buffer = io.StringIO()
    if suffix == ".csv":
        write_csv(predictions, top_k, buffer)
    else:
        json.dump(prediction_document(classifier, predictions, top_k), buffer, indent=2)
        buffer.write("\n")
    partial = out.with_name(f".{out.name}.partial")
    with writing(out, partial=partial):
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(buffer.getvalue())
        os.replace(partial, out)

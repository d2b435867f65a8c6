"""A trained imgpipe model as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(images)`.

The logged model holds model.pt (and model_card.json when present) as artifacts and the
imgpipe package itself as code, so it loads and predicts outside this checkout, with the
same preprocessing as `imgpipe predict` (it calls imgpipe.serving.predict; nothing is repeated here).

Input: image paths (a DataFrame with a "path" column, or a list of path strings) or
decoded images (a uint8 H x W or H x W x C numpy array, a list of them, or a batch array
N x H x W (x C)). Output: a DataFrame with label, probability and one `probability_<class>`
column per class.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import imgpipe
from imgpipe.models.checkpoints import read_model_checkpoint
from imgpipe.serving.modelcard import CARD_FILE
from imgpipe.serving.predict import classify, open_classifier, prepare_array, prepare_file, why_unreadable

log = logging.getLogger(__name__)

PATH_COLUMN = "path"
LOGGED_NAME_BAD_CHARS = ("/", ":", ".", "%", '"', "'")  # mlflow.utils.validation._validate_logged_model_name


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """`imgpipe.serving.predict` for MLflow: artifacts `checkpoint` (model.pt) and, optionally, `model_card`.

    `predict` has no type hints on purpose (MLflow warns about it when the class is defined):
    it takes paths or images, and a hint would make MLflow accept only one of them.
    """

    def load_context(self, context):
        self.classifier = open_classifier(context.artifacts["checkpoint"], "auto",
                                          card_path=context.artifacts.get("model_card"))

    def predict(self, context, model_input, params=None):
        images = prepare_input(model_input, self.classifier.image_settings)
        probabilities, _boxes = classify(self.classifier, images)  # (the MLflow model gives class probabilities)
        return probability_frame(probabilities, self.classifier.classes)


def prepare_input(model_input, image_settings: dict) -> list[np.ndarray]:
    """Every input image through the model's preprocessing; bad ones raise one error that names them all."""
    paths, arrays = split_input(model_input)
    images, failures = [], []
    if paths is not None:
        for path in paths:
            try:
                images.append(prepare_file(path, image_settings))
            except Exception as error:  # collected, so one error names every bad file at once
                failures.append(f"{path}: {why_unreadable(Path(path), error)}")
    else:
        for index, array in enumerate(arrays):
            try:
                images.append(prepare_array(array, image_settings))
            except ValueError as error:
                failures.append(f"image array {index}: {error}")
    if failures:
        raise ValueError(f"{len(failures)} of {len(paths or arrays)} images cannot be predicted: "
                         f"{'; '.join(failures)}")
    return images


def split_input(model_input) -> tuple[list[str] | None, list[np.ndarray] | None]:
    """(paths, None) or (None, arrays) from the input forms the model accepts; anything else is an error."""
    if isinstance(model_input, pd.DataFrame):
        if PATH_COLUMN not in model_input.columns:
            raise ValueError(f"a DataFrame input needs a '{PATH_COLUMN}' column of image paths; it has "
                             f"{list(model_input.columns)}")
        return [str(path) for path in model_input[PATH_COLUMN]], None
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind in "iu":
            return None, image_list(model_input)
        if model_input.dtype.kind in "OU" and model_input.ndim == 1:
            return [str(path) for path in model_input], None
    if isinstance(model_input, (list, tuple)) and model_input:
        if all(isinstance(item, (str, Path)) for item in model_input):
            return [str(item) for item in model_input], None
        if all(isinstance(item, np.ndarray) for item in model_input):
            return None, list(model_input)
    raise ValueError("input must be image paths (a DataFrame with a 'path' column, or a list of strings) or "
                     "uint8 image arrays (H x W or H x W x C, or a list of them); got "
                     f"{type(model_input).__name__}")


def image_list(array: np.ndarray) -> list[np.ndarray]:
    """One array as images: H x W and H x W x 1/3/4 are one image; N x H x W (not ending in 1, 3
    or 4: no image is that narrow) and N x H x W x C a batch, which is how MLflow serving hands
    over JSON `{"inputs": [image, ...]}`."""
    if array.ndim == 4 or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        return list(array)
    return [array]


def probability_frame(probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """label, probability (of the label), probability_<class> for each class."""
    frame = pd.DataFrame({
        "label": [classes[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else [],
        "probability": probabilities.max(axis=1) if len(probabilities) else [],
    })
    for index, name in enumerate(classes):
        frame[f"probability_{name}"] = probabilities[:, index]
    return frame


def logged_model_name(name: str) -> str:
    """`name` with the characters MLflow refuses in logged model names (imgpipe allows '.', as in a
    sweep's `lr0.001`) replaced by '_'; registered model names may keep them."""
    return "".join("_" if char in LOGGED_NAME_BAD_CHARS else char for char in name)


def output_schema(classes: list[str]) -> Schema:
    return Schema([ColSpec("string", "label"), ColSpec("float", "probability"),
                   *(ColSpec("float", f"probability_{name}") for name in classes)])


def example_image(image_settings: dict) -> np.ndarray:
    """A mid-grey image of the model's input size and colour, uint8 H x W (x 3 for rgb)."""
    size = image_settings["size"]
    shape = (size, size) if image_settings["color"] == "grayscale" else (size, size, 3)
    return np.full(shape, 128, dtype=np.uint8)


def pip_requirements() -> list[str]:
    """What the model needs, pinned to what trained it (inferring them costs MLflow ~10 s per model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "scikit-learn")]


def log_classifier_model(checkpoint_path: Path | str, name: str, registered_model_name: str | None = None):
    """Log the model in `checkpoint_path` (an imgpipe model.pt) as a pyfunc model on the active run.

    Registered in the model registry under `registered_model_name` when given. Returns
    MLflow's ModelInfo.
    """
    checkpoint_path = Path(checkpoint_path)
    artifacts = {"checkpoint": str(checkpoint_path)}
    if checkpoint_path.with_name(CARD_FILE).is_file():
        artifacts["model_card"] = str(checkpoint_path.with_name(CARD_FILE))
    checkpoint = read_model_checkpoint(checkpoint_path)
    logged_name = logged_model_name(name)
    if logged_name != name:
        log.info("MLflow refuses %s in a logged model's name: '%s' is logged as '%s'%s",
                 " ".join(LOGGED_NAME_BAD_CHARS), name, logged_name,
                 f" (registered as '{registered_model_name}')" if registered_model_name else "")
    started = time.perf_counter()
    info = mlflow.pyfunc.log_model(
        name=logged_name,
        python_model=ImageClassifierModel(),
        artifacts=artifacts,
        code_paths=[str(Path(imgpipe.__file__).parent)],
        pip_requirements=pip_requirements(),
        # Outputs only: an input schema would hold the model to one of its input forms
        # (paths or arrays). The example is an image, which serving can send as JSON; a
        # path would name a file that only this machine has.
        signature=ModelSignature(outputs=output_schema(checkpoint["classes"])),
        input_example=example_image(checkpoint["image"]),
        registered_model_name=registered_model_name,
    )
    log.info("model '%s' logged to MLflow as a pyfunc model in %.1f s%s", name, time.perf_counter() - started,
             f", registered as '{registered_model_name}'" if registered_model_name else "")
    return info

"""A trained model as an MLflow pyfunc model: logged into a real SQLite store, loaded back, and served by
the real `mlflow models predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import model_settings, write_shape_images
from mlflow.tracking import MlflowClient
from PIL import Image

from imgpipe.serving.predict import load_classifier, predict_files
from imgpipe.serving.pyfunc import log_classifier_model
from imgpipe.training.engine import TrainingJob, train_model

IMAGE = {"size": 32, "color": "grayscale", "resize": "pad", "pad_color": "white"}
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def model_dir(shapes_manifest, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "cnn"
    train_model(TrainingJob("cnn", model_settings(epochs=3, lr=0.01, batch_size=16), IMAGE, shapes_manifest,
                            folder / "resume", folder / "model.pt", torch.device("cpu")))
    return folder


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    """New 48 px RGB images (the model was trained on 32 px grayscale)."""
    return write_shape_images(tmp_path / "photos", "bright", 2, seed=3) + write_shape_images(
        tmp_path / "photos", "dark", 2, seed=4)


def test_logged_model_predicts_paths_and_arrays_like_imgpipe_predict(model_dir, photos, mlflow_uri, tmp_path):
    with mlflow.start_run() as run:
        info = log_classifier_model(model_dir / "model.pt", "cnn-lr0.01", registered_model_name="cnn-lr0.01")
    # MLflow refuses '.' in logged model names; the registry keeps the model's own name.
    assert info.name == "cnn-lr0_01" and info.run_id == run.info.run_id
    assert MlflowClient().get_model_version("cnn-lr0.01", "1").run_id == run.info.run_id
    expected = predict_files(load_classifier(model_dir, "cpu"), photos)
    classes = ["bright", "dark"]

    model = mlflow.pyfunc.load_model("models:/cnn-lr0.01/1")
    by_frame = model.predict(pd.DataFrame({"path": [str(path) for path in photos]}))
    assert list(by_frame.columns) == ["label", "probability", "probability_bright", "probability_dark"]
    np.testing.assert_allclose(by_frame[["probability_bright", "probability_dark"]].to_numpy(),
                               expected.probabilities, rtol=0, atol=1e-6)
    assert list(by_frame["label"]) == [classes[i] for i in expected.probabilities.argmax(axis=1)]
    np.testing.assert_allclose(by_frame["probability"], expected.probabilities.max(axis=1), rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(model.predict([str(path) for path in photos]), by_frame)

    arrays = []
    for path in photos:
        with Image.open(path) as image:
            arrays.append(np.asarray(image).copy())
    pd.testing.assert_frame_equal(model.predict(arrays), by_frame)
    pd.testing.assert_frame_equal(model.predict(arrays[2]), by_frame.iloc[[2]].reset_index(drop=True))
    pd.testing.assert_frame_equal(model.predict(np.stack(arrays)), by_frame)  # a batch, as JSON serving sends it
    gray = [np.asarray(Image.fromarray(array).convert("L")) for array in arrays]
    assert model.predict(gray[1].astype(np.int64)).shape == (1, 4)  # JSON numbers arrive as int64

    missing = tmp_path / "gone.png"
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(Exception, match=r"2 of 3 images cannot be predicted: .*gone.png: .*notes.txt: not an image"):
        model.predict([str(photos[0]), str(missing), str(tmp_path / "notes.txt")])
    with pytest.raises(Exception, match="a DataFrame input needs a 'path' column"):
        model.predict(pd.DataFrame({"file": [str(photos[0])]}))

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    assert (local / "code" / "imgpipe" / "serving" / "predict.py").is_file()  # loads outside this checkout
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "pillow==" in requirements
    assert json.loads((local / "serving_input_example.json").read_text())["inputs"][0][0] == 128


def test_mlflow_models_predict_cli_serves_the_logged_model(model_dir, photos, mlflow_uri, tmp_path):
    with mlflow.start_run():
        info = log_classifier_model(model_dir / "model.pt", "cnn")
    expected = predict_files(load_classifier(model_dir, "cpu"), photos)
    labels = [["bright", "dark"][i] for i in expected.probabilities.argmax(axis=1)]
    (tmp_path / "input.json").write_text(json.dumps(
        {"dataframe_split": {"columns": ["path"], "data": [[str(path)] for path in photos]}}))

    result = subprocess.run([MLFLOW, "models", "predict", "-m", info.model_uri, "-i", str(tmp_path / "input.json"),
                             "-o", str(tmp_path / "output.json"), "--env-manager", "local"],
                            cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "output.json").read_text())["predictions"]
    assert [row["label"] for row in predictions] == labels
    np.testing.assert_allclose([[row["probability_bright"], row["probability_dark"]] for row in predictions],
                               expected.probabilities, rtol=0, atol=1e-6)


def test_arrays_are_one_image_or_a_batch_by_shape():
    from imgpipe.serving.pyfunc import image_list

    assert len(image_list(np.zeros((28, 28), np.uint8))) == 1
    assert len(image_list(np.zeros((28, 28, 1), np.uint8))) == 1  # one grayscale image, not 28
    assert len(image_list(np.zeros((28, 28, 3), np.uint8))) == 1
    assert len(image_list(np.zeros((5, 28, 28), np.uint8))) == 5
    assert len(image_list(np.zeros((5, 28, 28, 3), np.uint8))) == 5

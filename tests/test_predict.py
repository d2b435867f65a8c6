"""imgpipe predict: the library, the real `imgpipe` command, the model card, and the `predict` config key."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, model_settings, write_shape_images
from crawl_server import truncated_jpeg
from PIL import Image

from imgpipe.config.schema import ConfigError, load_schema
from imgpipe.config.validation import validate_config
from imgpipe.core.manifests import read_split_manifest
from imgpipe.data.preprocess import prepare_image
from imgpipe.evaluation.evaluate import predict_probabilities
from imgpipe.serving.cli import ProgressBar, main
from imgpipe.serving.modelcard import write_model_card
from imgpipe.serving.predict import (
    collect_inputs,
    load_classifier,
    predict_files,
    prepare_array,
    prepare_file,
    resolve_top_k,
)
from imgpipe.tracking.provenance import VERSION
from imgpipe.training.datasets import load_split
from imgpipe.training.engine import TrainingJob, train_model

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}
IMGPIPE = str(Path(sys.executable).with_name("imgpipe"))


@pytest.fixture(scope="module")
def model_dir(shapes_manifest, tmp_path_factory) -> Path:
    """results/<experiment>/models/cnn/ of a small CNN trained on bright discs against dark bars."""
    folder = tmp_path_factory.mktemp("results") / "models" / "cnn"
    settings = model_settings(epochs=4, lr=0.01, batch_size=16)
    _, summary = train_model(TrainingJob("cnn", settings, IMAGE, shapes_manifest, folder / "resume",
                                         folder / "model.pt", torch.device("cpu")))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def photos(tmp_path) -> Path:
    """New images as they come: 48 px RGB, a nested folder, a truncated JPEG and a text file among them."""
    folder = tmp_path / "photos"
    write_shape_images(folder, "bright", 3, seed=7)
    write_shape_images(folder / "nested", "dark", 3, seed=8)
    (folder / "nested" / "cut.jpg").write_bytes(truncated_jpeg())
    (folder / "notes.txt").write_text("these are the holiday photos\n")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IMGPIPE, *args], capture_output=True, text=True, timeout=300)


def test_predictions_equal_the_pipelines_own_on_the_test_split(model_dir, shapes_manifest):
    classifier = load_classifier(model_dir, "cpu")
    test = load_split(read_split_manifest(shapes_manifest), "test", classifier.classes)
    expected = predict_probabilities(classifier.model, test.images, classifier.checkpoint["normalization"], "cpu")

    predicted = predict_files(classifier, test.paths, batch_size=7)

    assert predicted.paths == test.paths and not predicted.failures
    np.testing.assert_allclose(predicted.probabilities, expected, rtol=0, atol=1e-6)
    accuracy = (predicted.probabilities.argmax(axis=1) == test.labels.numpy()).mean()
    assert accuracy >= 0.75  # the model learned something, so equal outputs are not equal noise


def test_new_images_get_the_preprocessing_stored_with_the_model(model_dir, photos):
    classifier = load_classifier(model_dir, "cpu")
    path = photos / "bright_000.png"
    with Image.open(path) as image:
        assert image.size == (48, 48) and image.mode == "RGB"
        array = np.asarray(image).copy()
    prepared = prepare_file(path, classifier.image_settings)
    assert prepared.shape == (1, 32, 32) and prepared.dtype == np.uint8
    np.testing.assert_array_equal(prepared[0], np.asarray(prepare_image(path, 32, "grayscale", "stretch")))
    np.testing.assert_array_equal(prepare_array(array, classifier.image_settings), prepared)
    with pytest.raises(ValueError, match="must hold 0-255 as uint8, got float64"):
        prepare_array(array / 255.0, classifier.image_settings)
    with pytest.raises(ValueError, match=r"H x W x 3/4 .* got shape \(48, 48, 2\)"):
        prepare_array(array[:, :, :2], classifier.image_settings)


def test_folder_with_bad_files_predicts_the_good_ones_and_lists_the_bad(model_dir, photos, tmp_path):
    result = run_cli("predict", str(model_dir), str(photos), "-o", str(tmp_path / "out.json"))

    assert result.returncode == 1, result.stderr
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal
    document = json.loads((tmp_path / "out.json").read_text())
    predicted = {Path(record["path"]).relative_to(photos).as_posix(): record for record in document["predictions"]}
    assert sorted(predicted) == ["bright_000.png", "bright_001.png", "bright_002.png",
                                 "nested/dark_000.png", "nested/dark_001.png", "nested/dark_002.png"]
    assert {name: record["label"] for name, record in predicted.items()} == {
        name: "dark" if name.startswith("nested") else "bright" for name in predicted}
    failed = {Path(entry["path"]).name: entry["reason"] for entry in document["failed"]}
    assert failed == {"cut.jpg": failed["cut.jpg"], "notes.txt": "not an image: text"}
    assert failed["cut.jpg"].startswith("truncated or corrupt image data")
    assert document["n_predicted"] == 6 and document["n_failed"] == 2
    header = document["model"]
    assert header["classes"] == ["bright", "dark"] and header["image"] == IMAGE and header["arch"] == "simple_cnn"
    assert "cut.jpg" in result.stderr and "not predicted" in result.stderr


def test_csv_output_has_a_row_per_input_with_the_error_column(model_dir, photos, tmp_path):
    result = subprocess.run([sys.executable, "-m", "imgpipe", "predict", str(model_dir), str(photos), "--top-k", "2",
                             "-o", str(tmp_path / "out.csv"), "--batch-size", "2"],
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 1, result.stderr
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert list(rows[0]) == ["path", "label", "probability", "top1_label", "top1_probability", "top2_label",
                             "top2_probability", "error"]
    good = [row for row in rows if not row["error"]]
    bad = {Path(row["path"]).name: row for row in rows if row["error"]}
    assert len(good) == 6 and set(bad) == {"cut.jpg", "notes.txt"}
    assert all(row["label"] == "" for row in bad.values())
    for row in good:
        assert row["label"] == row["top1_label"] and {row["top1_label"], row["top2_label"]} == {"bright", "dark"}
        assert float(row["top1_probability"]) >= float(row["top2_probability"])
        assert float(row["top1_probability"]) + float(row["top2_probability"]) == pytest.approx(1, abs=1e-5)


def test_globs_and_files_are_predicted_once_each(model_dir, photos, capsys):
    status = main(["predict", str(model_dir), str(photos / "*.png"), str(photos / "bright_000.png"),
                   str(photos / "**" / "dark_00[01].png"), "--top-k", "1"])

    assert status == 0
    document = json.loads(capsys.readouterr().out)
    names = [Path(record["path"]).name for record in document["predictions"]]
    assert names == ["bright_000.png", "bright_001.png", "bright_002.png", "dark_000.png", "dark_001.png"]
    assert all(len(record["top_k"]) == 1 and record["top_k"][0]["label"] == record["label"]
               for record in document["predictions"])
    assert document["failed"] == []


def test_inputs_that_name_nothing_are_listed_as_failures(tmp_path):
    (tmp_path / "empty").mkdir()
    files, failures = collect_inputs([tmp_path / "missing.png", str(tmp_path / "*.jpg"), tmp_path / "empty"])
    assert files == []
    assert [failure["reason"] for failure in failures] == [
        "no such file or folder", "the pattern matches no file", "empty folder: no files below it"]


def test_model_card_provenance_and_test_accuracy_reach_the_output_header(model_dir, tmp_path, capsys):
    folder = tmp_path / "cnn"
    shutil.copytree(model_dir, folder)
    config = {"experiment": "shapes", "models": {"cnn": {"lr": 0.01}}}
    card_path = write_model_card(folder / "model.pt", {"arch": "simple_cnn", "lr": 0.01},
                                 json.loads((folder / "summary.json").read_text()), config, workflow_dir=REPO)
    card = json.loads(card_path.read_text())
    assert card_path == folder / "model_card.json" and not list(folder.glob(".*partial"))
    assert card["classes"] == ["bright", "dark"] and card["preprocessing"]["image"] == IMAGE
    assert card["preprocessing"]["normalization"]["mean"][0] > 0 and card["architecture"]["arch"] == "simple_cnn"
    assert card["settings"] == {"arch": "simple_cnn", "lr": 0.01} and card["training"]["epochs"] == 4
    assert 0 < card["training"]["best_val_accuracy"] <= 1 and card["training"]["n_parameters"] > 1000
    provenance = card["provenance"]
    assert provenance["imgpipe_version"] == VERSION and len(provenance["git"]["commit"]) == 40
    assert len(provenance["config_hash"]) == 16 and provenance["experiment"] == "shapes"
    (folder / "test_metrics.json").write_text(json.dumps({"accuracy": 0.875}))

    assert main(["predict", str(folder), str(REPO / "tests" / "data")]) == 1  # tests/data holds an HTML page
    header = json.loads(capsys.readouterr().out)["model"]
    assert header["provenance"] == provenance and header["test_accuracy"] == 0.875
    assert header["training"]["best_epoch"] == card["training"]["best_epoch"]


@pytest.mark.parametrize("arguments, message", [
    (["--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
    (["--top-k", "three"], "argument --top-k: 'three' is not a whole number"),
    (["--top-k", "5"], "--top-k must be between 1 and the model's 2 classes, got 5"),
    (["-o", "out.txt"], "-o/--output 'out.txt' must end in .json or .csv"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
])
def test_usage_errors_exit_2_naming_the_argument(model_dir, photos, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model_dir), str(photos), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_a_model_directory_is_a_usage_error(model_dir, tmp_path):
    result = run_cli("predict", str(tmp_path), str(tmp_path))
    assert result.returncode == 2
    assert f"MODEL_DIR: model directory '{tmp_path}' holds no model.pt" in result.stderr
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model_dir / "model.pt"), str(tmp_path)])
    assert exit_info.value.code == 2


def test_top_k_defaults_to_three_or_all_classes():
    assert resolve_top_k(None, ["a", "b"]) == 2 and resolve_top_k(None, list("abcdef")) == 3
    with pytest.raises(ValueError, match="between 1 and the model's 2 classes, got 3"):
        resolve_top_k(3, ["a", "b"])


def test_progress_bar_redraws_one_line():
    stream = io.StringIO()
    bar = ProgressBar(10, stream)
    bar(4)
    bar(10)
    text = stream.getvalue()
    assert text.startswith("\rpredict  4/10 images [============                  ]")
    assert "\rpredict 10/10 images [==============================]" in text and text.endswith("\n")


# --- the `predict` config key -------------------------------------------------------------------------------

SCHEMA = load_schema(REPO / "workflow/schemas/config.schema.yaml")


def predict_config(tmp_path, predict: dict | None = None, models: dict | None = None) -> dict:
    (tmp_path / "new").mkdir(exist_ok=True)
    config = {"experiment": "pets",
              "classes": {"cat": {"sources": [{"digits": 1}]}, "dog": {"sources": [{"digits": 2}]}},
              "crawl": {"min_size": 8},  # the digits are 8x8
              "models": models or {"cnn": {"arch": "simple_cnn"}, "cnn2": {"arch": "simple_cnn", "lr": 0.01}}}
    if predict is not None:
        config["predict"] = predict
    return config


def test_predict_defaults(tmp_path):
    validated = validate_config(predict_config(tmp_path), SCHEMA, tmp_path)
    assert validated["predict"] == {"folders": {}, "models": "best", "top_k": None}
    assert validated["mlflow"]["register_models"] is False
    validated = validate_config(predict_config(tmp_path, {"folders": {"new": "new"}, "models": ["cnn2", "cnn"],
                                                          "top_k": 2}), SCHEMA, tmp_path)
    assert validated["predict"] == {"folders": {"new": "new"}, "models": ["cnn2", "cnn"], "top_k": 2}


@pytest.mark.parametrize("predict, models, message", [
    ({"models": ["cnn", "cnx"]}, None, "config key 'predict.models[1]': no model named 'cnx' in this config; "
                                       "similar: cnn"),
    ({"models": ["resnet"]}, {"resnet": {"arch": "resnet18", "sweep": {"lr": [0.1, 0.01]}}},
     "config key 'predict.models[0]': 'resnet' is a sweep; name its models: resnet-lr0.1, resnet-lr0.01"),
    ({"models": "worst"}, None, "config key 'predict.models'"),
    ({"models": []}, None, "config key 'predict.models'"),
    ({"folders": {"new": "no/such/folder"}}, None, "config key 'predict.folders.new': 'no/such/folder' does not exist"),
    ({"folders": {"bad name": "new"}}, None, "config key 'predict.folders'"),
    ({"top_k": 3}, None, "config key 'predict.top_k': 3 is more than the 2 classes"),
    ({"top_k": 0}, None, "config key 'predict.top_k'"),
])
def test_predict_mistakes_name_the_key(tmp_path, predict, models, message):
    with pytest.raises(ConfigError) as error:
        validate_config(predict_config(tmp_path, predict, models), SCHEMA, tmp_path)
    assert message in str(error.value)


def test_a_predict_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ConfigError, match="'predict.folders.new': 'list.txt' is not a folder"):
        validate_config(predict_config(tmp_path, {"folders": {"new": "list.txt"}}), SCHEMA, tmp_path)


def test_an_unexpected_error_exits_3_not_as_a_partial_failure(model_dir, photos, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    unwritable = tmp_path / "a_file" / "out.json"  # its folder is a file: writing fails
    result = run_cli("predict", str(model_dir), str(photos), "-o", str(unwritable))
    assert result.returncode == 3, result.stderr
    assert "a_file" in result.stderr

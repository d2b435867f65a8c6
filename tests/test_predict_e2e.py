"""The `predict` rule through the real `snakemake`: a folder of new images classified by the report's best model."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import write_shape_images
from test_pipeline_e2e import (
    planned_jobs,
    runs_by_name,
    snakemake,
    store,
    workdir,  # noqa: F401 (a fixture)
    write_config,
)

pytestmark = pytest.mark.e2e


def test_a_predict_folder_is_classified_by_the_best_model_and_reruns_when_it_changes(workdir):
    data = workdir / "data"
    write_shape_images(data / "bright", "bright", 24, seed=1)
    write_shape_images(data / "dark", "dark", 24, seed=2)
    new = data / "new"
    write_shape_images(new, "bright", 2, seed=11)
    write_shape_images(new / "nested", "dark", 2, seed=12)
    (new / "broken.png").write_bytes((new / "bright_000.png").read_bytes()[:60])
    write_config(workdir, {
        "experiment": "shapes",
        "classes": {"bright": {"sources": [{"folder": "data/bright"}]},
                    "dark": {"sources": [{"folder": "data/dark"}]}},
        "images": {"size": 32},
        "dedupe": {"near_distance": 0},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3},
        "models": {"cnn": {"arch": "simple_cnn", "epochs": 3, "lr": 0.01, "batch_size": 16}},
        "predict": {"folders": {"new": "data/new"}, "models": "best", "top_k": 2},
        "mlflow": {"register_models": True},
    })

    snakemake(workdir)

    results = workdir / "results" / "shapes"
    card = json.loads((results / "models" / "cnn" / "model_card.json").read_text())
    assert card["classes"] == ["bright", "dark"] and card["provenance"]["config_hash"]
    document = json.loads((results / "predict" / "new" / "best.json").read_text())
    assert document["model"]["model_name"] == "cnn" and document["model"]["provenance"] == card["provenance"]
    assert sorted(record["path"] for record in document["predictions"]) == [
        "data/new/bright_000.png", "data/new/bright_001.png", "data/new/nested/dark_000.png",
        "data/new/nested/dark_001.png"]
    assert [entry["path"] for entry in document["failed"]] == ["data/new/broken.png"]
    assert all(len(record["top_k"]) == 2 for record in document["predictions"])
    table = pd.read_csv(results / "predict" / "new" / "best.csv", keep_default_na=False)
    assert len(table) == 5 and list(table.loc[table["error"] != "", "path"]) == ["data/new/broken.png"]

    client = store(workdir)
    runs = runs_by_name(client, "shapes")
    predict_run = runs["predict new best"]
    assert predict_run.data.metrics == {"n_predicted": 4, "n_failed": 1}
    assert predict_run.data.tags["imgpipe.predict_model"] == "cnn"
    version = client.get_model_version("cnn", "1")
    assert version.run_id == runs["cnn"].info.run_id

    assert planned_jobs(workdir) == {}
    shutil.copy(data / "dark" / "dark_005.png", new / "added.png")
    assert planned_jobs(workdir) == {"predict": 1, "all": 1}

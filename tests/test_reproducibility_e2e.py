"""The same config run from scratch in two folders gives the same results, byte for byte."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import write_shape_images
from test_pipeline_e2e import snakemake, write_config

pytestmark = pytest.mark.e2e

# What a run measures or where it ran, kept apart from results (see the README's
# Reproducibility): wall-clock times, the MLflow run of one store, the machine.
MEASUREMENTS = {
    "models/{model}/timing.json",
    "models/{model}/mlflow_run.json",
    "eval/{model}/speed.json",
    "report/report.md",  # the comparison shows each model's measured speed ...
    "report/report.html",  # ... as does its page
    "provenance/environment.json",
    "provenance/requirements.txt",
    "provenance/config.resolved.yaml",
}
MODELS = ("cnn", "tiny")


def run_from_scratch(workdir: Path, template_db: Path) -> Path:
    workdir.mkdir()
    shutil.copy(template_db, workdir / "mlflow.db")
    write_shape_images(workdir / "data" / "bright", "bright", 20, seed=1)
    write_shape_images(workdir / "data" / "dark", "dark", 20, seed=2)
    write_config(workdir, {
        "experiment": "same",
        "classes": {"bright": {"sources": [{"folder": "data/bright"}]},
                    "dark": {"sources": [{"folder": "data/dark"}]}},
        "images": {"size": 32},
        "dedupe": {"near_distance": 6, "near_action": "group"},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3},
        "models": {
            "cnn": {"arch": "simple_cnn", "epochs": 2, "lr": 0.01, "batch_size": 16, "augment": "light"},
            "tiny": {"arch": "simple_cnn", "epochs": 2, "lr": 0.005, "batch_size": 8, "optimizer": "sgd"},
        },
    })
    snakemake(workdir)
    return workdir / "results" / "same"


def test_a_config_run_twice_from_scratch_gives_the_same_results(tmp_path, mlflow_template_db):
    first = run_from_scratch(tmp_path / "first", mlflow_template_db)
    second = run_from_scratch(tmp_path / "second", mlflow_template_db)

    measured = {pattern.format(model=model) for pattern in MEASUREMENTS for model in MODELS}
    files = {str(p.relative_to(first)) for p in first.rglob("*") if p.is_file() and "crawl-store" not in p.parts}
    assert files == {str(p.relative_to(second)) for p in second.rglob("*")
                     if p.is_file() and "crawl-store" not in p.parts}
    assert measured <= files
    compared = sorted(files - measured)
    differ = [name for name in compared if (first / name).read_bytes() != (second / name).read_bytes()]
    assert differ == [], f"differ between two runs of one config: {differ}"
    # what was compared: every manifest, each model's history, summary, card, weights and test metrics
    for name in ("raw/bright.csv", "dedupe/manifest.csv", "images/dark.csv", "split/manifest.csv",
                 "models/cnn/history.csv", "models/cnn/summary.json", "models/cnn/model.pt",
                 "models/cnn/model_card.json", "eval/tiny/metrics.json", "eval/tiny/predictions.csv",
                 "report/summary.json"):
        assert name in compared
    # and the measurements are where the README says
    speed = json.loads((first / "eval" / "cnn" / "speed.json").read_text())
    assert speed["latency_ms_batch1"] > 0 and speed["train_seconds"] > 0
    assert len(json.loads((first / "models" / "tiny" / "timing.json").read_text())["epoch_seconds"]) == 2

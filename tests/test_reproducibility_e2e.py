"""The same config run from scratch in two folders gives the same results, byte for byte."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_shape_images
from crawl_server import LocalServer, Response, distinct_jpeg
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
# the crawl key that lets a config fetch from this machine's test servers (see README, Hostile sources)
LOCAL_SERVER_ALLOWED = {"allow_private_hosts": ["127.0.0.1"]}


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


def compared_results(first: Path, second: Path, models=MODELS) -> list[str]:
    """The results files two runs share, less the measurements, after asserting they are equal byte for byte.

    crawl-store/ is a cache (its journal keeps download times, its numbering the download order).
    """
    measured = {pattern.format(model=model) for pattern in MEASUREMENTS for model in models}
    files = {str(p.relative_to(first)) for p in first.rglob("*") if p.is_file() and "crawl-store" not in p.parts}
    assert files == {str(p.relative_to(second)) for p in second.rglob("*")
                     if p.is_file() and "crawl-store" not in p.parts}
    assert measured <= files
    compared = sorted(files - measured)
    differ = [name for name in compared if not same_results_file(first / name, second / name)]
    assert differ == [], f"differ between two runs of one config: {differ}"
    return compared


def same_results_file(first: Path, second: Path) -> bool:
    """Byte for byte; a crawl manifest's download times (fetched_at, a measurement) aside."""
    if first.parent.name == "raw" and first.suffix == ".csv":
        tables = [pd.read_csv(path, dtype=str, keep_default_na=False) for path in (first, second)]
        if tables[0]["fetched_at"].ne("").any():
            return tables[0].drop(columns="fetched_at").equals(tables[1].drop(columns="fetched_at"))
    return first.read_bytes() == second.read_bytes()


def test_a_config_run_twice_from_scratch_gives_the_same_results(tmp_path, mlflow_template_db):
    first = run_from_scratch(tmp_path / "first", mlflow_template_db)
    second = run_from_scratch(tmp_path / "second", mlflow_template_db)

    compared = compared_results(first, second)
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


def test_a_crawl_of_a_slow_server_run_twice_from_scratch_gives_the_same_results(tmp_path, mlflow_template_db):
    # Every request waits a random time: four download threads per URL list finish in another
    # order each run, and the greedy crawl's pages and images arrive in another order too. Raw
    # numbering, manifests, split, weights and metrics must not follow that order.
    routes = {f"/a/{n}.jpg": Response(distinct_jpeg(n)) for n in range(14)}
    routes |= {f"/b/{n}.jpg": Response(distinct_jpeg(100 + n)) for n in range(8)}
    routes["/a/13.jpg"] = Response(routes["/a/2.jpg"].body)  # the same bytes twice: one is an exact duplicate
    routes["/site"] = Response(b'<html><a href="/site/p2.html">2</a>'
                                + b"".join(b'<img src="/b/%d.jpg">' % n for n in range(4)) + b"</html>", "text/html")
    routes["/site/p2.html"] = Response(b"<html>" + b"".join(b'<img src="/b/%d.jpg">' % n for n in range(4, 8))
                                       + b"</html>", "text/html")
    results = []
    with LocalServer(routes, latency_s=0.05) as server:
        for name in ("first", "second"):
            workdir = tmp_path / name
            workdir.mkdir()
            shutil.copy(mlflow_template_db, workdir / "mlflow.db")
            (workdir / "a.txt").write_text("".join(server.url(f"/a/{n}.jpg") + "\n" for n in range(15)))  # /a/14: 404
            write_shape_images(workdir / "data" / "dark", "dark", 12, seed=2)
            write_config(workdir, {
                "experiment": "web",
                "classes": {"noise": {"sources": [{"urls": "a.txt", "threads": 4},
                                                  {"greedy": server.url("/site"), "threads": 4}]},
                            "dark": {"sources": [{"folder": "data/dark"}]}},
                "crawl": {"min_size": 8, "timeout_s": 2, **LOCAL_SERVER_ALLOWED},
                "images": {"size": 32},
                "dedupe": {"near_distance": 6},
                "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 3},
                "models": {"cnn": {"arch": "simple_cnn", "epochs": 1, "batch_size": 8}},
            })
            snakemake(workdir)
            results.append(workdir / "results" / "web")
    compared = compared_results(*results, models=("cnn",))
    raw = pd.read_csv(results[0] / "raw" / "noise.csv")
    assert list(raw["rank"][:15]) == list(range(1, 16)), "a URL list's rows are numbered by line"
    assert (raw.status == "ok").sum() == 22 and (raw.status == "failed").sum() == 1
    for name in ("raw/noise.csv", "raw/noise.json", "dedupe/manifest.csv", "images/noise.csv", "split/manifest.csv",
                 "models/cnn/model.pt", "eval/cnn/metrics.json", "eval/cnn/predictions.csv"):
        assert name in compared

"""What a user sees in `mlflow ui`: the real server on 127.0.0.1, asked through its REST API.

The UI's first screen is the experiment's top-level runs (children are collapsed under
their parent): each model must be one of them, with its test metrics and provenance, and
the data jobs must sit under the invocation's run.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import pytest
import yaml
from conftest import REPO, write_shape_images
from test_pipeline_e2e import snakemake, write_config
from test_tracking import make_git_checkout

from imgpipe.config.schema import load_schema
from imgpipe.config.validation import validate_config
from imgpipe.tracking.invocation import end_invocation, start_invocation
from imgpipe.tracking.provenance import config_hash, git_commit
from imgpipe.tracking.records import data_job_run
from imgpipe.tracking.runs import job_run, log_split_dataset
from imgpipe.tracking.tags import INVOCATION_TAGS_ENV

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
DATA_STAGES = ("crawl", "dedupe", "preprocess", "split", "report")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_ui(store: Path, log_path: Path, seconds: float = 180) -> Iterator[str]:
    """`mlflow ui` serving the SQLite store `store` on 127.0.0.1; yields its base URL, always stops it."""
    port = free_port()
    with open(log_path, "w") as server_log:
        server = subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=server_log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + seconds
        while True:
            assert server.poll() is None, f"mlflow ui exited ({server.returncode}):\n{log_path.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"mlflow ui did not answer within {seconds} s:\n" \
                                                f"{log_path.read_text()[-4000:]}"
            time.sleep(0.5)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def rest(base_url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """A call to the server's REST API: GET with `query`, or POST with the JSON `body`."""
    url = f"{base_url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def experiment_runs(base_url: str, experiment: str) -> dict[str, dict]:
    """Run name -> run as the REST API returns it (tags and metrics turned into dicts)."""
    experiment_id = rest(base_url, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    found = rest(base_url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})
    runs = {}
    for run in found["runs"]:
        run["tags"] = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
        run["metrics"] = {metric["key"]: metric["value"] for metric in run["data"].get("metrics", [])}
        assert run["info"]["run_name"] not in runs, f"two runs named {run['info']['run_name']!r}"
        runs[run["info"]["run_name"]] = run
    return runs


def check_what_the_ui_shows(base_url: str, experiment: str, models: list[str], classes: list[str],
                            expected_tags: dict[str, str]) -> None:
    """The UI's first screen: one row per model (its test metrics, tags, split dataset) and
    the invocation's row, with every data job's run under it."""
    with urllib.request.urlopen(base_url, timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    runs = experiment_runs(base_url, experiment)
    invocation = runs[f"snakemake {experiment}"]
    invocation_id = invocation["info"]["run_id"]
    top_level = {name for name, run in runs.items() if "mlflow.parentRunId" not in run["tags"]}
    assert top_level == {f"snakemake {experiment}", *models}

    for name in models:
        model = runs[name]
        assert {"test/accuracy", "test/macro_f1"} <= set(model["metrics"]), name
        assert 0 <= model["metrics"]["test/accuracy"] <= 1
        assert model["info"]["status"] == "FINISHED"
        assert model["tags"].items() >= {"imgpipe.model": name, "imgpipe.experiment": experiment,
                                         "imgpipe.invocation": invocation_id, "mlflow.source.name": f"imgpipe model {name}",
                                         **expected_tags}.items(), name

    data_runs = {name: run for name, run in runs.items() if name not in top_level}
    expected_data = {"dedupe", "split", "report", *(f"{stage} {cls}" for stage in ("crawl", "preprocess")
                                                    for cls in classes)}
    assert set(data_runs) == expected_data
    for name, run in data_runs.items():
        assert run["tags"]["mlflow.parentRunId"] == invocation_id, name
        assert run["tags"]["imgpipe.stage"] in DATA_STAGES
        assert run["tags"]["mlflow.source.name"] == f"imgpipe {name}"
    # The invocation's row has the data counts as params: as metrics, their charts would come before the models'.
    assert not invocation.get("metrics")
    assert {"images_ok"} <= set(data_runs[f"crawl {classes[0]}"]["metrics"])
    invocation_params = {p["key"] for p in invocation["data"].get("params", [])}
    assert {f"crawl/{cls}/images_ok" for cls in classes} <= invocation_params

    for name in models:
        inputs = runs[name].get("inputs", {}).get("dataset_inputs", [])
        assert [entry["dataset"]["name"] for entry in inputs] == [f"{experiment} split"], name
        assert json.loads(inputs[0]["dataset"]["source"])["uri"].endswith(f"{experiment}/split/manifest.csv")


def test_the_ui_shows_one_row_per_model_from_tracking_runs(mlflow_uri, tmp_path, monkeypatch):
    commit = make_git_checkout(tmp_path / "workflow", dirty=False)
    config = {"experiment": "pets", "models": {"cnn": {"lr": 0.1}, "resnet": {"lr": 0.01}}}
    manifest = tmp_path / "results/pets/split/manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("path,label,split\na.png,cat,train\nb.png,dog,val\nc.png,cat,test\nd.png,dog,test\n")

    # start_invocation exports its tags for the jobs it starts: set here, monkeypatch removes them after the test.
    monkeypatch.setenv(INVOCATION_TAGS_ENV, "{}")
    start_invocation(None, "pets", config, workflow_folder=tmp_path / "workflow", records_root=tmp_path / "records")
    # Data jobs write records that the invocation publishes (as in the pipeline); models log themselves.
    for cls in ("cat", "dog"):
        for stage in ("crawl", "preprocess"):
            with data_job_run(f"{stage} {cls}", tags={"imgpipe.stage": stage, "imgpipe.class": cls}) as run:
                run.log_metric("images_ok", 2)
    for stage in ("dedupe", "split"):
        with data_job_run(stage, tags={"imgpipe.stage": stage}) as run:
            run.log_metric("n_test", 2)
    for name, accuracy in (("cnn", 0.5), ("resnet", 1.0)):
        tags = {"imgpipe.stage": "model", "imgpipe.model": name}
        with job_run(name, tags=tags) as train:
            log_split_dataset(manifest, "training")
            mlflow.log_metric("best_val_accuracy", 1.0)
        with job_run(name, tags=tags, resume_run_id=train.info.run_id):
            log_split_dataset(manifest, "evaluation")
            mlflow.log_metrics({"test/accuracy": accuracy, "test/macro_f1": accuracy})
    with data_job_run("report", tags={"imgpipe.stage": "report"}) as run:
        run.log_metric("best_accuracy", 1.0)
    end_invocation(success=True)

    store = Path(mlflow_uri.removeprefix("sqlite:///"))
    with mlflow_ui(store, tmp_path / "mlflow-ui.log") as base_url:
        check_what_the_ui_shows(base_url, "pets", ["cnn", "resnet"], ["cat", "dog"], {
            "mlflow.source.git.commit": commit, "imgpipe.git_dirty": "false",
            "imgpipe.config_hash": config_hash(config)})


@pytest.mark.e2e
def test_the_ui_shows_one_row_per_model_after_a_pipeline_run(tmp_path, mlflow_template_db):
    workdir = tmp_path
    shutil.copy(mlflow_template_db, workdir / "mlflow.db")
    write_shape_images(workdir / "data" / "bright", "bright", 12, seed=1)
    write_shape_images(workdir / "data" / "dark", "dark", 12, seed=2)
    write_config(workdir, {
        "experiment": "ui",
        "classes": {"bright": {"sources": [{"folder": "data/bright"}]},
                    "dark": {"sources": [{"folder": "data/dark"}]}},
        "images": {"size": 32},
        "dedupe": {"near_distance": 0},
        "models": {"cnn": {"arch": "simple_cnn", "epochs": 1},
                   "wide": {"arch": "simple_cnn", "epochs": 1, "lr": 0.01}},
    })
    snakemake(workdir)

    # The pipeline hashes the config as validated (defaults filled in), and records the
    # commit of the checkout holding the Snakefile.
    validated = validate_config(yaml.safe_load((workdir / "config.yaml").read_text()),
                                load_schema(REPO / "workflow/schemas/config.schema.yaml"), base_dir=workdir)
    expected_tags = {"imgpipe.config_hash": config_hash(validated)}
    git = git_commit(REPO)
    if git is not None:
        expected_tags |= {"mlflow.source.git.commit": git["commit"], "imgpipe.git_dirty": str(git["dirty"]).lower()}
    with mlflow_ui(workdir / "mlflow.db", workdir / "mlflow-ui.log") as base_url:
        check_what_the_ui_shows(base_url, "ui", ["cnn", "wide"], ["bright", "dark"], expected_tags)
        if git is None:
            model_tags = experiment_runs(base_url, "ui")["cnn"]["tags"]
            assert "mlflow.source.git.commit" not in model_tags

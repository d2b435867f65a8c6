"""The training engine through the real `snakemake`: strategies side by side, reruns that
follow the config's meaning, a SIGKILL mid-training resumed to the same result, GPU claims."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, reordered, write_shape_images
from test_pipeline_e2e import SNAKEMAKE, planned_jobs, runs_by_name, snakemake, store, write_config

pytestmark = pytest.mark.e2e


def shapes_config(experiment: str, models: dict) -> dict:
    return {
        "experiment": experiment,
        "classes": {"bright": {"sources": [{"folder": "data/bright"}]},
                    "dark": {"sources": [{"folder": "data/dark"}]}},
        "images": {"size": 32},
        "dedupe": {"near_distance": 0},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3},
        "models": models,
    }


def write_shapes(workdir: Path, per_class: int = 24) -> None:
    write_shape_images(workdir / "data" / "bright", "bright", per_class, seed=1)
    write_shape_images(workdir / "data" / "dark", "dark", per_class, seed=2)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", re.MULTILINE)


def job_span(log: Path) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f") for text in LOG_TIME.findall(log.read_text())]
    return stamps[0], stamps[-1]


def test_strategies_side_by_side_and_reruns_that_follow_the_config(tmp_path, mlflow_template_db, monkeypatch):
    monkeypatch.setenv("IMGPIPE_GPUS", "")  # a machine without a GPU, even where the tests run on one
    workdir = tmp_path
    shutil.copy(mlflow_template_db, workdir / "mlflow.db")
    write_shapes(workdir)
    config = shapes_config("strategies", {
        "cnn": {"arch": "simple_cnn", "epochs": 2, "lr": 0.01, "batch_size": 8},
        "transfer": {"arch": "simple_cnn", "init_from": "cnn", "strategy": "staged", "head_epochs": 1, "epochs": 2,
                     "batch_size": 8},
        "small": {"arch": "simple_cnn", "epochs": 1, "augment": "light", "sweep": {"batch_size": [8, 16]}},
    })
    write_config(workdir, config)
    dry_run = snakemake(workdir, "-n").stdout
    held = re.findall(r"resources: .*gpu=(\d)", dry_run)
    assert held == ["0"] * 8  # no GPU here: the 4 train and 4 evaluate jobs hold none
    snakemake(workdir)

    results = workdir / "results" / "strategies"
    models = ("cnn", "transfer", "small-bs8", "small-bs16")
    for model in models:
        assert json.loads((results / "eval" / model / "metrics.json").read_text())["n_test"] > 0
        assert not (results / "models" / model / "resume").exists()  # cleared once the job's outputs are written
    report = (results / "report" / "report.md").read_text()
    assert all(model in report for model in models)
    transfer = json.loads((results / "models" / "transfer" / "summary.json").read_text())
    assert transfer["start_weights"]["fresh"] == [] and "'cnn'" in transfer["start_weights"]["origin"]
    assert pd.read_csv(results / "models" / "transfer" / "history.csv")["backbone_frozen"].tolist() == [1, 0]

    runs = runs_by_name(store(workdir), "strategies")
    assert all(runs[model].info.status == "FINISHED" for model in models)
    assert "from model 'cnn'" in runs["transfer"].data.tags["imgpipe.start_weights"]
    assert runs["small-bs16"].data.params["batch_size"] == "16"

    # Without a GPU the models trained side by side on the two cores.
    spans = [job_span(workdir / "logs" / "strategies" / "train" / f"{model}.log") for model in models]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])

    assert planned_jobs(workdir) == {}
    write_config(workdir, reordered(config))  # same settings, every key order reversed
    assert planned_jobs(workdir) == {}
    faster = json.loads(json.dumps(config))
    faster["models"]["cnn"].update(threads=2, device="cpu")  # where and how fast, not what it learns
    write_config(workdir, faster)
    assert planned_jobs(workdir) == {}

    changed = json.loads(json.dumps(config))
    changed["models"]["cnn"]["lr"] = 0.02  # retrains cnn, and transfer, which starts from it
    write_config(workdir, changed)
    assert planned_jobs(workdir) == {"train": 2, "evaluate": 2, "report": 1, "all": 1}
    assert "model=small" not in snakemake(workdir, "-n").stdout

    changed = json.loads(json.dumps(config))
    changed["models"]["small"]["sweep"]["batch_size"] = [8, 32]  # one sweep value: one new model
    changed["models"]["new"] = {"arch": "simple_cnn", "epochs": 1}  # a new model trains only itself
    write_config(workdir, changed)
    dry_run = snakemake(workdir, "-n").stdout
    assert planned_jobs(workdir) == {"train": 2, "evaluate": 2, "report": 1, "all": 1}
    assert "model=small-bs32" in dry_run and "model=new" in dry_run and "model=small-bs8" not in dry_run


def test_a_training_job_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, mlflow_template_db):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    shutil.copy(mlflow_template_db, whole / "mlflow.db")
    write_shapes(whole, per_class=30)
    write_config(whole, shapes_config("resume", {
        "slow": {"arch": "resnet18", "truncate": "layer4", "head_hidden": [16], "head_dropout": 0.3, "epochs": 8,
                 "batch_size": 8, "augment": "light", "sampler": "balanced", "scheduler": "cosine", "lr": 0.01},
    }))
    snakemake(whole, "--cores", "2", "results/resume/split/manifest.csv")  # a target must not follow --resources
    shutil.copytree(whole, killed)  # the same data, Snakemake metadata and MLflow store in both folders
    snakemake(whole)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    command = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(killed), "--configfile",
               str(killed / "config.yaml"), "--cores", "2", "--resources", "gpu=1"]
    log = killed / "logs" / "resume" / "train" / "slow.log"
    process = subprocess.Popen(command, cwd=killed, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (log.exists() and "epoch 3/8" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "training never reached epoch 3"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the whole process group: snakemake and its job
    process.wait()
    time.sleep(1)
    model_dir = killed / "results" / "resume" / "models" / "slow"
    assert (model_dir / "resume" / "last.pt").exists() and not (model_dir / "model.pt").exists()

    locked = snakemake(killed, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(killed, "--unlock")
    snakemake(killed)
    assert "resuming from" in log.read_text()

    first = torch.load(whole / "results/resume/models/slow/model.pt", weights_only=True)
    second = torch.load(model_dir / "model.pt", weights_only=True)
    assert first["epoch"] == second["epoch"]
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
    pd.testing.assert_frame_equal(pd.read_csv(whole / "results/resume/models/slow/history.csv"),
                                  pd.read_csv(model_dir / "history.csv"))
    metrics = [json.loads((folder / "results/resume/eval/slow/metrics.json").read_text()) for folder in (whole, killed)]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"] and metrics[0]["macro_f1"] == metrics[1]["macro_f1"]
    assert not (model_dir / "resume").exists()

    client = store(killed)
    experiment_id = client.get_experiment_by_name("resume").experiment_id
    runs = client.search_runs([experiment_id])
    slow = [run for run in runs if run.info.run_name == "slow"]
    assert len(slow) == 1 and slow[0].info.status == "FINISHED"  # the resumed job continued its own run
    steps = [metric.step for metric in client.get_metric_history(slow[0].info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(1, 9))  # every epoch once: none lost, none logged twice
    assert not [run.info.run_name for run in runs if run.info.status == "RUNNING"]
    assert [run.info.status for run in runs if run.info.run_name == "snakemake resume"].count("KILLED") == 1


def run_with_two_declared_gpus(workdir: Path, experiment: str, models: dict) -> str:
    """The pipeline on shape images with devices 0 and 1 declared (none is real) and gpu=2; its output."""
    write_shapes(workdir, per_class=16)
    write_config(workdir, shapes_config(experiment, models))
    env = {"IMGPIPE_GPUS": "0,1", "IMGPIPE_GPU_LOCK_DIR": str(workdir / "locks")}
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
         str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=2"],
        cwd=workdir, env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **env},
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def test_each_gpu_job_claims_its_own_device(tmp_path, mlflow_template_db):
    # No GPU here: the device list is declared, so the DAG gives the jobs gpu=1 and each
    # claims a device; torch then finds no CUDA and they train on the CPU.
    workdir = tmp_path
    shutil.copy(mlflow_template_db, workdir / "mlflow.db")
    output = run_with_two_declared_gpus(workdir, "gpus", {"a": {"arch": "simple_cnn", "epochs": 3},
                                                          "b": {"arch": "simple_cnn", "epochs": 3}})
    assert re.findall(r"resources: .*gpu=(\d)", output) == ["1"] * 4
    claims = {}
    for model in ("a", "b"):
        text = (workdir / "logs" / "gpus" / "train" / f"{model}.log").read_text()
        claims[model] = re.search(r"claimed GPU (\S+)", text).group(1)
        assert "torch sees no CUDA device" in text
    spans = [job_span(workdir / "logs" / "gpus" / "train" / f"{model}.log") for model in ("a", "b")]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # both ready at once, gpu=2: side by side
    assert sorted(claims.values()) == ["0", "1"]  # so each on its own device
    runs = runs_by_name(store(workdir), "gpus")
    assert {runs[m].data.params["gpu"] for m in ("a", "b")} == set(claims.values())


def test_a_model_with_two_gpus_trains_in_two_processes_on_both_claimed_devices(tmp_path, mlflow_template_db):
    # Two devices declared, none real: the train job holds gpu=2, claims both, finds no CUDA and
    # trains data-parallel in two processes on the CPU (gloo); evaluation holds one device.
    workdir = tmp_path
    shutil.copy(mlflow_template_db, workdir / "mlflow.db")
    output = run_with_two_declared_gpus(workdir, "ddp", {"pair": {"arch": "simple_cnn", "epochs": 3, "gpus": 2,
                                                                  "threads": 2, "batch_size": 4}})
    assert sorted(re.findall(r"rule (train|evaluate):\n(?:.*\n)*?.*resources: .*gpu=(\d)", output)) == [
        ("evaluate", "1"), ("train", "2")]
    log = (workdir / "logs" / "ddp" / "train" / "pair.log").read_text()
    assert sorted(re.findall(r"claimed GPU (\S+)", log)) == ["0", "1"]
    assert "data-parallel training in 2 processes (gloo)" in log
    assert "[rank 0]" in log and "epoch 3/3" in log
    assert "the weights are identical in the 2 processes" in log
    model_dir = workdir / "results" / "ddp" / "models" / "pair"
    assert json.loads((model_dir / "summary.json").read_text())["data_parallel_processes"] == 2
    assert (workdir / "results" / "ddp" / "eval" / "pair" / "metrics.json").exists()
    client = store(workdir)
    run = runs_by_name(client, "ddp")["pair"]
    assert run.data.params["gpus"] == "2" and run.data.params["gpu"] == "0,1"
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3], "process 0 logged every epoch once"
    assert "test/accuracy" in run.data.metrics


@pytest.mark.parametrize("example", sorted((REPO / "config" / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_build_their_dag(example, tmp_path):
    """Each seed's example validates and dry-runs, its folders pointed at small generated images."""
    config = yaml.safe_load(example.read_text())
    for name, spec in config["classes"].items():
        for source in spec["sources"]:
            if "folder" in source:
                write_shape_images(tmp_path / source["folder"], "bright", 2, seed=len(name))
    shutil.copy(example, tmp_path / "config.yaml")
    result = snakemake(tmp_path, "-n")
    jobs = planned_jobs(tmp_path)
    n_models = len(re.findall(r"wildcards: evaluated=", result.stdout))
    assert jobs["train"] == jobs["evaluate"] == n_models >= 2
    assert jobs["crawl"] == len(config["classes"])

"""The real `snakemake --profile profiles/slurm` on a one-machine Slurm cluster, logging to a
real `mlflow server`, against a plain local run of the same experiment.

The cluster (tests/slurm_cluster.py) is brought up for this module: slurmctld, slurmd,
slurmdbd with MariaDB (so `sacct` answers, as the executor plugin expects) and munge, all in
a temporary folder, with one node (this machine) holding one dummy GPU. Debian's packages
are installed with apt when missing. Nothing is skipped: a cluster that cannot be set up
is an error that says why.

What it shows:
- every Snakemake job ran as its own sbatch job (sacct lists exactly the planned jobs, all
  COMPLETED), with the partition, account, CPUs and memory the profile asks for;
- train and evaluate were submitted with --gpus=1 although the submit side sees no GPU
  (the profile requests it), were given the node's gres/gpu, never ran two at a time,
  and inside the job claimed the device Slurm handed them (CUDA_VISIBLE_DEVICES=0) and,
  torch seeing no CUDA, fell back to the CPU;
- the results are those of a local `snakemake --cores 2` run of the same config: byte for
  byte where the pipeline guarantees it (split, de-duplication, preprocessed images,
  checkpoints, predictions, the report's summary), all but the timings elsewhere;
- the MLflow server holds the same runs, with the same tags, params and metrics, as the
  local run's SQLite store, and the models' artifacts reached it through the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from mlflow.tracking import MlflowClient
from slurm_cluster import ACCOUNT, PARTITION, SlurmCluster, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
MLFLOW = str(BIN / "mlflow")
EXPERIMENT = "tiny"
# Two digit classes of 50 images, 32 px; two small CNNs, so the run is mostly job start-up.
CONFIG = {
    "experiment": EXPERIMENT,
    "classes": {"three": {"sources": [{"digits": 3}], "target": 50},
                "eight": {"sources": [{"digits": 8}], "target": 50}},
    "crawl": {"min_size": 8},
    "images": {"size": 32, "color": "grayscale", "resize": "stretch"},
    "dedupe": {"near_distance": 0},
    "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3},
    "models": {"cnn": {"arch": "simple_cnn", "epochs": 2, "batch_size": 16},
               "cnn_fast": {"arch": "simple_cnn", "epochs": 1, "batch_size": 16, "lr": 0.01}},
}
GPU_RULES = {"train", "evaluate"}
# Files the pipeline writes identically from the same inputs and settings on the CPU
# (measurements of the machine are kept in timing.json and speed.json).
BYTE_IDENTICAL = ["raw/three.csv", "raw/eight.csv", "raw/three.json", "split/manifest.csv", "split/sizes.json",
                  "dedupe/manifest.csv", "dedupe/summary.json", "images/three.csv", "images/eight.csv",
                  "report/summary.json",
                  *(f"models/{m}/{name}" for m in CONFIG["models"]
                    for name in ("model.pt", "history.csv", "summary.json", "model_card.json")),
                  *(f"eval/{m}/{name}" for m in CONFIG["models"] for name in ("predictions.csv", "metrics.json"))]
# Timings differ between two runs; run ids between two stores.
VOLATILE_METRICS = {"seconds", "train_seconds", "test/inference_ms_per_image", "test/latency_ms_batch1",
                    "test/throughput_images_per_s"}
# Tags naming a process, a folder or a command line; run ids are compared by the run they name.
VOLATILE_TAGS = {"imgpipe.pid", "imgpipe.pid_started", "imgpipe.command", "imgpipe.workdir"}
RUN_ID_TAGS = {"imgpipe.invocation", "imgpipe.last_invocation", "mlflow.parentRunId"}
SNAKEMAKE_TIMEOUT_S = 900


def stop_process_group(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    cluster = SlurmCluster.start()
    print(f"\nslurm bring-up: {cluster.startup_seconds}")
    yield cluster
    cluster.stop(keep_logs_in=tmp_path_factory.mktemp("slurm-daemon-logs"))


@pytest.fixture
def mlflow_server(tmp_path, mlflow_template_db):
    """`mlflow server` on a free port of 127.0.0.1, its runs in SQLite, its artifacts in a
    folder it serves (--artifacts-destination: jobs upload through the server)."""
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    shutil.copy(mlflow_template_db, folder / "mlflow.db")  # an existing schema: no migrations at start
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No background job runners (six huey consumers polling on a 2-core machine); the
    # pipeline uses none of MLflow's server-side jobs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited ({process.returncode}):\n{(folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > 120:
                pytest.fail(f"mlflow server not up after 120 s:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        print(f"mlflow server up in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        stop_process_group(process)


def start_snakemake(workdir: Path, env: dict, *args: str) -> tuple[subprocess.Popen, Path]:
    log = workdir / "snakemake.out"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
             "--configfile", str(workdir / "config.yaml"), *args],
            cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def finish(process: subprocess.Popen, log: Path, what: str, deadline: float, cluster: SlurmCluster | None = None) -> str:
    try:
        process.wait(max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        stop_process_group(process)
        pytest.fail(f"{what} still running after {SNAKEMAKE_TIMEOUT_S} s:\n{log.read_text()[-6000:]}"
                    + (f"\n{cluster.logs()}" if cluster else ""))
    output = log.read_text()
    if process.returncode != 0:
        pytest.fail(f"{what} failed ({process.returncode}):\n{output[-8000:]}" + (f"\n{cluster.logs()}" if cluster else ""))
    return output


def planned_jobs(output: str) -> Counter:
    """Rule -> count from the run's first 'Job stats' table."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return Counter({rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)
                    if rule != "total"})


def profile_memory_requests() -> list[int]:
    return [int(value) for value in re.findall(r"^\s*mem_mb:\s*(\d+)\s*$",
                                               (REPO / "profiles/slurm/profile.yaml").read_text(), re.MULTILINE)]


def store_runs(client: MlflowClient) -> dict[str, dict]:
    """run name -> what must agree between two stores (run ids replaced by the names they name)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment '{EXPERIMENT}' in {client.tracking_uri}"
    runs = client.search_runs([experiment.experiment_id])
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)), f"run names repeat in {client.tracking_uri}: {sorted(names)}"
    name_of = {run.info.run_id: run.info.run_name for run in runs}
    described = {}
    for run in runs:
        tags = {k: (name_of.get(v, f"unknown run {v}") if k in RUN_ID_TAGS else v)
                for k, v in run.data.tags.items() if k not in VOLATILE_TAGS}
        described[run.info.run_name] = {
            "status": run.info.status, "tags": tags, "params": dict(run.data.params),
            "metrics": {k: v for k, v in run.data.metrics.items() if k not in VOLATILE_METRICS},
            "metric_names": set(run.data.metrics), "run_id": run.info.run_id,
        }
    return described


def test_pipeline_on_slurm_matches_a_local_run(tmp_path, slurm_cluster, mlflow_server, mlflow_template_db):
    cluster = slurm_cluster
    real_memory = int(cluster.hardware["RealMemory"])
    assert max(profile_memory_requests()) <= real_memory, (
        f"profiles/slurm asks up to {max(profile_memory_requests())} MB for a job; this machine's node has "
        f"{real_memory} MB, so sbatch would refuse it")

    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    for workdir in (local, on_slurm):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    shutil.copy(mlflow_template_db, local / "mlflow.db")
    # Neither side sees a GPU: the submit side, like a login node, declares none.
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MLFLOW_", "IMGPIPE_", "SLURM_")) and k not in ("CUDA_VISIBLE_DEVICES",)}
    clean["IMGPIPE_OFFLINE"] = "1"
    slurm_env = {**clean, "SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": cluster.env["PATH"],
                 "MLFLOW_TRACKING_URI": mlflow_server,
                 "IMGPIPE_SLURM_PARTITION": PARTITION, "IMGPIPE_SLURM_ACCOUNT": ACCOUNT,
                 # jobs' GPU claims in the test's folder, not in the machine's /tmp
                 "IMGPIPE_GPU_LOCK_DIR": str(tmp_path / "gpu-locks")}
    for name in ("MLFLOW_EXPERIMENT_NAME", "IMGPIPE_GPUS", "CUDA_VISIBLE_DEVICES"):
        assert name not in slurm_env

    # Both at once: the Slurm run spends most of its time starting jobs and polling sacct.
    started = time.monotonic()
    deadline = started + SNAKEMAKE_TIMEOUT_S
    slurm_process, slurm_log = start_snakemake(
        on_slurm, slurm_env, "--profile", str(REPO / "profiles/slurm"),
        # The plugin's first status check comes 40 s after a submission and again 40 s after
        # each finished job; 2 s keeps this DAG of 12 short jobs from taking ten minutes.
        "--slurm-init-seconds-before-status-checks", "2")
    local_process, local_log = start_snakemake(local, clean, "--cores", "2")
    try:
        local_output = finish(local_process, local_log, "local snakemake", deadline)
        local_s = time.monotonic() - started
        slurm_output = finish(slurm_process, slurm_log, "snakemake --profile profiles/slurm", deadline, cluster)
        slurm_s = time.monotonic() - started
    finally:  # one failed: the other is not left running
        for process in (local_process, slurm_process):
            stop_process_group(process)
    print(f"local run {local_s:.0f} s, Slurm run {slurm_s:.0f} s (side by side)")

    # --- Slurm: one sbatch job per planned job, as the profile asked -------------------
    planned = planned_jobs(slurm_output)
    assert planned == planned_jobs(local_output)
    # `all` has no action: Snakemake completes it itself, without a Slurm job.
    submitted = planned - Counter({"all": planned["all"]})
    run_id = re.search(r"SLURM run ID: (\S+)", slurm_output).group(1)
    fields = ("JobID", "JobName", "State", "Partition", "Account", "AllocTRES", "Start", "End", "Comment")
    jobs = []
    for _ in range(60):  # slurmctld hands finished jobs to slurmdbd within seconds
        jobs = cluster.sacct(*fields)
        if len(jobs) >= sum(submitted.values()) and all(job["End"] not in ("", "Unknown") for job in jobs):
            break
        time.sleep(0.5)
    table = "\n".join("|".join(job[f] for f in fields) for job in jobs)
    assert len(jobs) == sum(submitted.values()), f"planned {dict(submitted)}, sacct lists:\n{table}"
    assert {job["JobName"] for job in jobs} == {run_id}, table
    assert {job["State"] for job in jobs} == {"COMPLETED"}, table
    assert {job["Partition"] for job in jobs} == {PARTITION}, table
    assert {job["Account"] for job in jobs} == {ACCOUNT}, table
    for job in jobs:  # the plugin's comment: rule_<rule> or rule_<rule>_wildcards_<values>
        job["rule"] = re.fullmatch(r"rule_([a-z]+)(_wildcards_.*)?", job["Comment"]).group(1)
        job["tres"] = dict(item.split("=", 1) for item in job["AllocTRES"].split(","))
    assert Counter(job["rule"] for job in jobs) == submitted, table

    gpu_jobs = [job for job in jobs if job["rule"] in GPU_RULES]
    assert len(gpu_jobs) == 2 * len(CONFIG["models"])
    assert all(job["tres"].get("gres/gpu") == "1" for job in gpu_jobs), table
    assert not any("gres/gpu" in job["tres"] for job in jobs if job["rule"] not in GPU_RULES), table
    # The node has one GPU: Slurm ran the GPU jobs one after another (sacct: whole seconds).
    spans = sorted((datetime.fromisoformat(job["Start"]), datetime.fromisoformat(job["End"])) for job in gpu_jobs)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), table
    # CPUs and memory as the profile sets them: cpus_per_task is the rule's threads.
    by_rule = {job["rule"]: job["tres"] for job in jobs}
    assert by_rule["dedupe"]["cpu"] == "2" and by_rule["train"]["cpu"] == "1", table
    assert by_rule["train"]["mem"] == "8000M" and by_rule["split"]["mem"] == "2000M", table

    # Inside the job: the device Slurm handed out was claimed, then torch found no CUDA.
    for model in CONFIG["models"]:
        for stage in ("train", "evaluate"):
            log = (on_slurm / f"logs/{EXPERIMENT}/{stage}/{model}.log").read_text()
            assert "claimed GPU 0" in log, log[-2000:]
            assert "torch sees no CUDA device" in log, log[-2000:]
        assert "claimed GPU" not in (local / f"logs/{EXPERIMENT}/train/{model}.log").read_text()

    # --- the same results as the local run ----------------------------------------------
    results_local, results_slurm = local / "results" / EXPERIMENT, on_slurm / "results" / EXPERIMENT
    for name in BYTE_IDENTICAL:
        assert (results_slurm / name).read_bytes() == (results_local / name).read_bytes(), name
    assert json.loads((results_slurm / "report/summary.json").read_text())["ranking"]

    # --- the same MLflow runs -------------------------------------------------------------
    server = store_runs(MlflowClient(tracking_uri=mlflow_server))
    local_store = store_runs(MlflowClient(tracking_uri=f"sqlite:///{local / 'mlflow.db'}"))
    assert set(server) == set(local_store)
    assert {f"snakemake {EXPERIMENT}", "dedupe", "split", "report", *CONFIG["models"]} <= set(server)
    for name in sorted(server):
        slurm_run, local_run = server[name], local_store[name]
        assert slurm_run["status"] == local_run["status"] == "FINISHED", name
        assert slurm_run["tags"] == local_run["tags"], name
        assert slurm_run["metric_names"] == local_run["metric_names"], name
        assert slurm_run["metrics"] == local_run["metrics"], name
        slurm_params, local_params = dict(slurm_run["params"]), dict(local_run["params"])
        if name in CONFIG["models"]:
            # the device each model's job claimed: Slurm's on the cluster, none locally
            assert (slurm_params.pop("gpu"), local_params.pop("gpu")) == ("0", "none"), name
        assert slurm_params == local_params, name
    client = MlflowClient(tracking_uri=mlflow_server)
    for model in CONFIG["models"]:
        artifacts = {a.path for a in client.list_artifacts(server[model]["run_id"])}
        assert {"model.pt", "history.csv", "evaluation"} <= artifacts, artifacts
    artifacts = tmp_path / "mlflow-server" / "artifacts"
    assert any(path.name == "model.pt" for path in artifacts.rglob("*")), "artifacts did not go through the server"

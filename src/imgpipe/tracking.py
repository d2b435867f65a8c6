"""MLflow: one parent run per invocation, a child run per job, one run per model.

The store is created once, in the Snakemake process before any job starts (concurrent
first-time creation of the SQLite database corrupts it). The invocation's parent run id
and the experiment reach jobs through the environment, not through params, so moving
the tracking store never reruns a job. (MLFLOW_RUN_ID would mean "resume this run" to
MLflow, so the parent id travels under a name of our own.)

A process killed with SIGKILL cannot close its run, so every run records its owner
(host, pid, process start time) and each new invocation marks the runs whose owner is
gone KILLED instead of leaving them RUNNING forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from imgpipe.files import error_text

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "IMGPIPE_MLFLOW_PARENT_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
TAG_PREFIX = "imgpipe."
HOST_TAG = f"{TAG_PREFIX}host"
PID_TAG = f"{TAG_PREFIX}pid"
PID_STARTED_TAG = f"{TAG_PREFIX}pid_started"
ABANDONED_TAG = f"{TAG_PREFIX}abandoned"


def flatten(values: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested config as MLflow params."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


SECRET_KEYS = ("api_key",)


def redact_secrets(values):
    """A copy of a nested config with secrets (a Flickr api_key) replaced, for logging."""
    if isinstance(values, dict):
        return {k: "<redacted>" if k in SECRET_KEYS else redact_secrets(v) for k, v in values.items()}
    if isinstance(values, list):
        return [redact_secrets(v) for v in values]
    return values


def process_stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/<pid>/stat (field N at index N - 3); None where unreadable.

    Field 2, the command name, is in parentheses and may itself contain spaces and ')',
    so the fields are counted from its last ')'.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22).

    '' where there is no /proc (not Linux) or no such process. Together with the pid it
    identifies a process: a pid reused by a later process has a later start time.
    """
    fields = process_stat_fields(pid)
    return fields[22 - 3] if fields else ""


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that will close a run (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_STARTED_TAG: process_start_time(pid)}


def process_is_running(pid: int, started: str) -> bool:
    """Whether process `pid` exists and, where `started` is known, is the one that started then.

    A zombie counts as ended: it can no longer close anything. Where it cannot be told
    (no /proc, another user's hidden process), a live pid counts as the owner.
    """
    try:
        os.kill(pid, 0)
        other_users = False
    except ProcessLookupError:
        return False
    except PermissionError:
        other_users = True
    if not Path("/proc/self/stat").exists():
        return True  # not Linux: the pid is all we can compare
    fields = process_stat_fields(pid)
    if fields is None:
        # Gone since os.kill looked, unless /proc hides other users' processes (hidepid).
        return other_users
    state, start_time = fields[3 - 3], fields[22 - 3]
    if state in ("Z", "X"):
        return False
    return not started or start_time == started


def mark_abandoned_runs(client, experiment_id: str, marked_by: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose owner process has ended; return their ids.

    Their owner was killed (SIGKILL, the OOM killer, a lost terminal) before it could close
    them. Runs without owner tags (not opened by imgpipe) and runs of other hosts (a cluster
    node whose processes we cannot see) are left alone. One query, then one update per run
    marked: this runs at the start of every invocation. `marked_by` describes the caller
    for the tag on each marked run.
    """
    this_host = socket.gethostname()
    marked_by = marked_by or f"process {os.getpid()}"
    abandoned = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  page_token=page_token)
        for run in page:
            tags = run.data.tags
            if tags.get(HOST_TAG) != this_host:
                continue
            try:
                owner_pid = int(tags[PID_TAG])
            except (KeyError, ValueError):
                continue
            if owner_pid <= 0 or process_is_running(owner_pid, tags.get(PID_STARTED_TAG, "")):
                continue
            reason = (f"process {owner_pid} on host {this_host} ended without closing this run; "
                      f"marked KILLED by {marked_by}")
            client.set_tag(run.info.run_id, ABANDONED_TAG, reason)
            client.set_terminated(run.info.run_id, "KILLED")
            log.info("MLflow: run '%s' (%s) was left RUNNING by process %d, which has ended; marked KILLED",
                     run.info.run_name, run.info.run_id, owner_pid)
            abandoned.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            return abandoned


def start_invocation(tracking_uri: str | None, experiment: str, config: dict) -> str:
    """Create the store and experiment if needed, open the invocation's parent run, export both.

    Returns the parent run id. Called from the Snakefile's onstart.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        os.environ[TRACKING_URI_ENV] = tracking_uri
    mlflow.set_tracking_uri(None)  # a process-wide URI would shadow the environment variable
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    # Before our own run exists: what a killed invocation left RUNNING is closed first.
    abandoned = mark_abandoned_runs(
        client, experiment_id, marked_by=f"the snakemake invocation started by process {os.getpid()}")
    if abandoned:
        log.info("MLflow: marked %d run(s) left RUNNING by ended processes as KILLED", len(abandoned))
    else:
        log.debug("MLflow: no run left RUNNING by an ended process")
    run = client.create_run(
        experiment_id,
        run_name=f"snakemake {config['experiment']}",
        tags={
            f"{TAG_PREFIX}kind": "invocation",
            f"{TAG_PREFIX}experiment": config["experiment"],
            f"{TAG_PREFIX}command": " ".join(sys.argv),
            f"{TAG_PREFIX}workdir": str(Path.cwd()),
            **owner_tags(),  # this Snakemake process closes it, in onsuccess / onerror
        },
    )
    client.log_dict(run.info.run_id, redact_secrets(config), "config.resolved.yaml")
    os.environ[EXPERIMENT_ENV] = experiment
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    log.info("MLflow: experiment '%s' at %s, invocation run %s", experiment, mlflow.get_tracking_uri(),
             run.info.run_id)
    return run.info.run_id


def end_invocation(success: bool) -> None:
    """Mark the invocation's parent run FINISHED or FAILED (onsuccess / onerror)."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, "FINISHED" if success else "FAILED")


@contextlib.contextmanager
def job_run(run_name: str, tags: dict | None = None, resume_run_id: str | None = None) -> Iterator:
    """An MLflow run for one job: a child of the invocation's run, or `resume_run_id` resumed.

    A job that raises leaves its run FAILED. A run to resume that the store no longer has
    (the database was deleted or moved) is replaced by a new one, with a warning. The run
    is tagged with this process as its owner, also when resumed (a run marked KILLED
    after its process was killed can be resumed).
    """
    import mlflow
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = None
    if resume_run_id:
        # The run keeps its own experiment: setting ours first would refuse to resume it
        # if mlflow.experiment changed since.
        resume_tags = owner_tags()
        if os.environ.get(PARENT_RUN_ENV):
            resume_tags[f"{TAG_PREFIX}last_invocation"] = os.environ[PARENT_RUN_ENV]
        try:
            # Owner first, then RUNNING: an invocation starting meanwhile never sees the run
            # RUNNING under its previous, ended owner and marks it KILLED under our feet.
            MlflowClient().log_batch(resume_run_id, tags=[RunTag(k, v) for k, v in resume_tags.items()])
            run = mlflow.start_run(run_id=resume_run_id)
        except MlflowException as error:
            log.warning("MLflow run %s cannot be resumed (%s); starting a new one", resume_run_id, error)
        if run is not None and ABANDONED_TAG in run.data.tags:
            # The tag says why the run is KILLED; running again, it no longer is.
            log.info("MLflow: resuming run %s, which had been marked KILLED (%s)", resume_run_id,
                     run.data.tags[ABANDONED_TAG])
            mlflow.delete_tag(ABANDONED_TAG)
    if run is None:
        experiment = os.environ.get(EXPERIMENT_ENV)
        if experiment:
            mlflow.set_experiment(experiment)
        all_tags = {f"{TAG_PREFIX}kind": "job", **(tags or {}), **owner_tags()}
        run = mlflow.start_run(run_name=run_name, parent_run_id=os.environ.get(PARENT_RUN_ENV), tags=all_tags)
    try:
        yield run
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def write_run_reference(run, path: Path | str) -> None:
    """Record which MLflow run holds a model, so its evaluate job logs into the same run."""
    import mlflow

    Path(path).write_text(json.dumps({
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
    }, indent=2) + "\n")


def read_run_reference(path: Path | str) -> str:
    """The run id `write_run_reference` recorded; a missing or damaged file is an error, not a new run."""
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the MLflow run reference {path} ({error_text(error)}); it is written by "
                         f"the model's train job: rerun it (snakemake --forcerun train)") from error


def log_epoch(row: dict) -> None:
    """One history row as MLflow metrics at step = epoch."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_params_once(params: dict) -> None:
    """Log params on the active run unless it has them: a resumed run keeps its first ones
    (MLflow refuses to change a param, and a resumed job may run on other threads)."""
    import mlflow

    run = mlflow.active_run()
    if not mlflow.get_run(run.info.run_id).data.params:
        mlflow.log_params(params)


def log_start_weights(load) -> None:
    """What loading the starting weights did (an imgpipe.models.WeightsLoad, or None for
    random initialisation), on the active run, before training starts."""
    if load is None:
        return
    import mlflow

    start_weights = load.as_dict()
    mlflow.log_dict(start_weights, "start_weights.json")
    mlflow.set_tag(f"{TAG_PREFIX}start_weights", f"{len(start_weights['loaded'])} tensors loaded, "
                   f"{len(start_weights['fresh'])} fresh, from {start_weights['origin']}")


def log_missing_epochs(run_id: str, history: list[dict]) -> int:
    """Log the history rows a run lacks (a job killed after saving an epoch, before logging it).

    A resumed job calls this with the history of its resume state, so every epoch appears
    exactly once in the run's curves. Returns how many rows were logged.
    """
    from mlflow.tracking import MlflowClient

    logged = {metric.step for metric in MlflowClient().get_metric_history(run_id, "val_accuracy")}
    missing = [row for row in history if int(row["epoch"]) not in logged]
    for row in missing:
        log_epoch(row)
    if missing:
        log.info("logged %d epoch(s) the interrupted job had saved but not logged", len(missing))
    return len(missing)


def log_torch_model(model, example_input, name: str = "model") -> None:
    """Log a trained model in MLflow's pytorch flavour.

    pip_requirements are given explicitly: inferring them costs ~10 s per model.
    """
    import mlflow.pytorch
    import torch
    import torchvision

    started = time.perf_counter()
    mlflow.pytorch.log_model(
        model,
        name=name,
        input_example=example_input,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}"],
    )
    log.info("model logged to MLflow (pytorch flavour) in %.1f s", time.perf_counter() - started)

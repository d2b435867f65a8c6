"""MLflow: one parent run per invocation, a child run per job, one run per model.

The store is created once, in the Snakemake process before any job starts (concurrent
first-time creation of the SQLite database corrupts it). The invocation's parent run id
and the experiment reach jobs through the environment, not through params, so moving
the tracking store never reruns a job. (MLFLOW_RUN_ID would mean "resume this run" to
MLflow, so the parent id travels under a name of our own.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "IMGPIPE_MLFLOW_PARENT_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
TAG_PREFIX = "imgpipe."


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
    run = client.create_run(
        experiment_id,
        run_name=f"snakemake {config['experiment']}",
        tags={
            f"{TAG_PREFIX}kind": "invocation",
            f"{TAG_PREFIX}experiment": config["experiment"],
            f"{TAG_PREFIX}command": " ".join(sys.argv),
            f"{TAG_PREFIX}workdir": str(Path.cwd()),
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
    (the database was deleted or moved) is replaced by a new one, with a warning.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    run = None
    if resume_run_id:
        # The run keeps its own experiment: setting ours first would refuse to resume it
        # if mlflow.experiment changed since.
        try:
            run = mlflow.start_run(run_id=resume_run_id)
            if os.environ.get(PARENT_RUN_ENV):
                mlflow.set_tag(f"{TAG_PREFIX}last_invocation", os.environ[PARENT_RUN_ENV])
        except MlflowException as error:
            log.warning("MLflow run %s cannot be resumed (%s); starting a new one", resume_run_id, error)
    if run is None:
        experiment = os.environ.get(EXPERIMENT_ENV)
        if experiment:
            mlflow.set_experiment(experiment)
        all_tags = {f"{TAG_PREFIX}kind": "job", **(tags or {})}
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


def read_run_reference(path: Path | str) -> str | None:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def log_epoch(row: dict) -> None:
    """One history row as MLflow metrics at step = epoch."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


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

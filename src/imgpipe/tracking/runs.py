"""A job's own MLflow run: opened, tagged, resumed, closed on failure, and the files that name it.

Snakemake runs each script from a temporary copy, so MLflow's own source name (the
script's path) and git tags (of the folder that copy sits in, the working directory)
would describe that copy: runs carry our own instead, saying the stage and the model or
class, and the commit of the workflow's own checkout.

A model's run (one per model: train opens it, evaluate logs into it) is found again three ways,
and these are all of them:
- the train job writes its id to the model's `mlflow_run` file (`write_run_reference`), which
  evaluate, a later job of another process, reads (`read_run_reference`) to log into the same run;
- the train job stores it in the resume state's metadata (`TrainingJob.metadata`,
  key `mlflow_run_id`), so that a training resumed after a kill continues its run instead of
  opening a second one;
- data-parallel training hands it to process 0 inside its callbacks (`RunLogger`, pickled with
  the worker's task), which log each epoch's metrics to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from imgpipe.core.files import error_text
from imgpipe.tracking.owners import owner_tags
from imgpipe.tracking.store import (
    check_tracking_server,
    record_counts_on_invocation,
    store_write_failure,
    with_context_tags,
)
from imgpipe.tracking.tags import (
    ABANDONED_TAG,
    CLASS_TAG,
    ERROR_TAG,
    ERROR_TAG_CHARS,
    EXPERIMENT_ENV,
    EXPERIMENT_TAG,
    INVOCATION_TAG,
    INVOCATION_TAGS_ENV,
    KIND_TAG,
    LAST_INVOCATION_TAG,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MODEL_STAGE,
    MODEL_TAG,
    PARENT_RUN_ENV,
    STAGE_TAG,
    TAG_PREFIX,
)

log = logging.getLogger(__name__)


def job_source_name(run_name: str, tags: dict) -> str:
    """What mlflow.source.name says of a job's run: the stage and the model or class it is
    for ('imgpipe crawl cat', 'imgpipe model cnn'); the run name where there is no stage."""
    if STAGE_TAG not in tags:
        return f"imgpipe {run_name}"
    subject = tags.get(MODEL_TAG) or tags.get(CLASS_TAG)
    return " ".join(part for part in ("imgpipe", tags[STAGE_TAG], subject) if part)


def job_tags(run_name: str, tags: dict, invocation_id: str | None, shared_tags: dict, owner: dict) -> dict:
    """All the tags of a job's new run: kind, source name, the invocation's shared tags, its run id,
    the parent (the invocation's run, except for a model's run, which is top level), the job's
    own tags and its owner process."""
    parent_id = invocation_id if tags.get(STAGE_TAG) != MODEL_STAGE else None
    return {
        KIND_TAG: "job",
        MLFLOW_SOURCE_NAME: job_source_name(run_name, tags),
        MLFLOW_SOURCE_TYPE: "LOCAL",
        **shared_tags,
        **({INVOCATION_TAG: invocation_id} if invocation_id else {}),
        **({MLFLOW_PARENT_RUN_ID: parent_id} if parent_id else {}),
        **tags,
        **owner,
    }


def job_experiment_id() -> str:
    """The experiment a job's run goes to: the invocation's (exported), else MLflow's own choice,
    as mlflow.start_run makes it outside an invocation."""
    import mlflow
    from mlflow.tracking.fluent import _get_experiment_id

    experiment = os.environ.get(EXPERIMENT_ENV)
    return mlflow.set_experiment(experiment).experiment_id if experiment else _get_experiment_id()


def new_job_run(run_name: str, tags: dict) -> tuple:
    """Open (and make active) a new run for a job; return it and the run it is nested under, or None.

    A model's run (stage 'model') is top level, so that each model is one row in the MLflow
    UI, and names its invocation in a tag; any other job's run is a child of the invocation's.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment_id = job_experiment_id()
    all_tags = job_tags(run_name, tags, os.environ.get(PARENT_RUN_ENV),
                        json.loads(os.environ.get(INVOCATION_TAGS_ENV, "{}")), owner_tags())
    # Created by the client, not mlflow.start_run, which would add MLflow's source and git
    # tags of the temporary script (see the module's docstring); then resumed to be active.
    created = MlflowClient().create_run(experiment_id, run_name=run_name, tags=with_context_tags(all_tags))
    return mlflow.start_run(run_id=created.info.run_id), all_tags.get(MLFLOW_PARENT_RUN_ID)


@contextlib.contextmanager
def job_run(run_name: str, tags: dict | None = None, resume_run_id: str | None = None, then: str = "") -> Iterator:
    """An MLflow run for one job, or `resume_run_id` resumed.

    A model's run (tag imgpipe.stage 'model') is a top-level run; any other job's run is a
    child of the invocation's run and, when it finishes, records its counts there (see
    `record_counts_on_invocation`). New runs carry the invocation's tags (see `invocation_tags`) and its
    run id (imgpipe.invocation), and a source name that says the stage and the model or class.
    A job that raises leaves its run FAILED, its error in tag imgpipe.error; a store on a full
    disk fails the job with an error that says so and names the database (`then`: what a rerun
    does), and never hides the job's own error when the run cannot be closed. A run to resume
    that the store no longer has (the database was deleted or moved) is replaced by a new one, with a warning. The run
    is tagged with this process as its owner, also when resumed (a run marked KILLED
    after its process was killed can be resumed).
    """
    import mlflow
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_tracking_server(mlflow.get_tracking_uri())
    tags = tags or {}
    run = None
    parent_id = None
    if resume_run_id:
        # The run keeps its own experiment: setting ours first would refuse to resume it
        # if mlflow.experiment changed since.
        resume_tags = owner_tags()
        if os.environ.get(PARENT_RUN_ENV):
            resume_tags[LAST_INVOCATION_TAG] = os.environ[PARENT_RUN_ENV]
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
        run, parent_id = new_job_run(run_name, tags)
    try:
        yield run
        if parent_id:
            record_counts_on_invocation(MlflowClient().get_run(run.info.run_id).data.metrics, parent_id,
                                        prefix=run_name.replace(" ", "/"))
    except BaseException as error:
        explained = store_write_failure(error, then)
        _end_failed_run(explained or error)
        if explained is not None:
            raise explained from error
        raise
    mlflow.end_run("FINISHED")


def _end_failed_run(error: BaseException) -> None:
    """Mark the active run FAILED with the job's error in tag imgpipe.error. The store may be
    failing too (on the disk that just filled up): then that is logged, and the job's own error
    stays the one it ends with, instead of MLflow's hiding it."""
    import mlflow

    try:
        mlflow.set_tag(ERROR_TAG, error_text(error)[:ERROR_TAG_CHARS])
    except Exception as tag_error:  # noqa: BLE001 - see the docstring
        log.error("MLflow: the job's error could not be recorded on its run (%s)", error_text(tag_error))
    try:
        mlflow.end_run("FAILED")
    except Exception as end_error:  # noqa: BLE001
        log.error("MLflow: the run could not be marked FAILED (%s); the next invocation marks it KILLED",
                  error_text(end_error))


def log_split_dataset(manifest_path: Path | str, context: str, name: str | None = None) -> None:
    """Log the split manifest (path,label,split) as an MLflow dataset input of the active run.

    `context` says what the run used it for ('training', 'evaluation'); `name` defaults to
    '<experiment> split' (the run's imgpipe.experiment tag), or 'split' on a run without one.
    The digest is the file's sha256, so a changed split is a new dataset version. MLflow
    keeps one input per dataset and run, with the context it was first logged with: the
    same manifest logged again (by a resumed train job, by the evaluate job) adds nothing,
    and is still logged by the evaluate job in case its run replaced a lost one.
    """
    import hashlib

    import mlflow
    import mlflow.data
    from mlflow.exceptions import MlflowException

    from imgpipe.core.manifests import read_split_manifest

    manifest_path = Path(manifest_path).resolve()
    manifest = read_split_manifest(manifest_path)
    if name is None:
        experiment = mlflow.active_run().data.tags.get(EXPERIMENT_TAG)
        name = f"{experiment} split" if experiment else "split"
    digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:16]
    dataset = mlflow.data.from_pandas(manifest, source=str(manifest_path), targets="label", name=name, digest=digest)
    # Models train side by side: two jobs logging the same new dataset race to insert its row
    # (MLflow checks, then inserts), and the loser gets a UNIQUE constraint error. By then the
    # row exists, so logging again links it.
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as error:
            if "UNIQUE constraint" not in str(error) or attempt == 2:
                raise
            log.info("MLflow: dataset '%s' was being logged by another job at the same time; linking it again", name)
            time.sleep(0.2 * (attempt + 1))


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


class RunLogger:
    """Logs a training job's progress to its run by id: picklable, so that the first process of
    data-parallel training (imgpipe.training.distributed) logs it from its own process."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_epoch(self, row: dict) -> None:
        """One history row as MLflow metrics at step = epoch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client().log_batch(self.run_id, metrics=[
            Metric(key, float(value), now, int(row["epoch"])) for key, value in row.items() if key != "epoch"])

    def log_start_weights(self, load) -> None:
        """What loading the starting weights did (an imgpipe.models.networks.WeightsLoad, or None for
        random initialisation), before training starts."""
        if load is None:
            return
        start_weights = load.as_dict()
        client = self.client()
        client.log_dict(self.run_id, start_weights, "start_weights.json")
        client.set_tag(self.run_id, f"{TAG_PREFIX}start_weights", f"{len(start_weights['loaded'])} tensors loaded, "
                       f"{len(start_weights['fresh'])} fresh, from {start_weights['origin']}")


def log_params_once(params: dict) -> None:
    """Log params on the active run unless it has them: a resumed run keeps its first ones
    (MLflow refuses to change a param, and a resumed job may run on other threads)."""
    import mlflow

    run = mlflow.active_run()
    if not mlflow.get_run(run.info.run_id).data.params:
        mlflow.log_params(params)


def log_missing_epochs(run_id: str, history: list[dict]) -> int:
    """Log the history rows a run lacks (a job killed after saving an epoch, before logging it).

    A resumed job calls this with the history of its resume state, so every epoch appears
    exactly once in the run's curves. Returns how many rows were logged.
    """
    from mlflow.tracking import MlflowClient

    logged = {metric.step for metric in MlflowClient().get_metric_history(run_id, "val_accuracy")}
    missing = [row for row in history if int(row["epoch"]) not in logged]
    for row in missing:
        RunLogger(run_id).log_epoch(row)
    if missing:
        log.info("logged %d epoch(s) the interrupted job had saved but not logged", len(missing))
    return len(missing)


"""MLflow: one run per invocation with its data jobs nested under it, one top-level run per model.

What `mlflow ui` opens on is the experiment's top-level runs: each model is one row there
(train and evaluate log into the same run), with its test metrics in the chart view (and as
table columns once picked), next to one collapsed row per invocation that holds the data jobs (crawl,
dedupe, preprocess, split, report) with their counts, which it also records as params
(not metrics: in the chart view every metric of a visible run gets a chart, and 30 data
counts would push the models' charts off the page). A model run
names its invocation in a tag instead of being its child: children sit collapsed under
their parent, out of sight and out of the charts.

The invocation's run id, the
experiment and the tags every run carries (git commit, config hash) reach jobs through
the environment, not through params, so moving the tracking store or the checkout never
reruns a job. (MLFLOW_RUN_ID would mean "resume this run" to MLflow, so the parent id
travels under a name of our own.)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from imgpipe.core.files import error_text
from imgpipe.tracking.owners import mark_abandoned_runs, owner_tags
from imgpipe.tracking.provenance import VERSION, config_hash, git_commit
from imgpipe.tracking.records import RECORDS_ENV, RecordPublisher, publish_leftovers
from imgpipe.tracking.store import (
    check_tracking_server,
    experiment_id_named,
    store_creation_lock,
    with_context_tags,
)
from imgpipe.tracking.tags import (
    CONFIG_HASH_TAG,
    EXPERIMENT_ENV,
    EXPERIMENT_TAG,
    GIT_DIRTY_TAG,
    INVOCATION_TAGS_ENV,
    KIND_TAG,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    PARENT_RUN_ENV,
    TAG_PREFIX,
    TRACKING_URI_ENV,
    VERSION_TAG,
    redact_secrets,
)

log = logging.getLogger(__name__)


def invocation_tags(config: dict, workflow_folder: Path | str | None) -> dict[str, str]:
    """The tags every run of an invocation carries: where its results came from.

    The git commit is that of the checkout holding `workflow_folder` (the Snakefile's
    folder), not of the working directory, with whether files tracked there had
    uncommitted changes; outside a git checkout, or with no folder given, there is none.
    """
    tags = {EXPERIMENT_TAG: config["experiment"], CONFIG_HASH_TAG: config_hash(config), VERSION_TAG: VERSION}
    if workflow_folder is None:
        log.info("MLflow: no workflow folder given: runs carry no git commit")
        return tags
    git = git_commit(workflow_folder)
    if git is None:
        log.info("MLflow: the workflow folder %s is not in a git checkout (or git is not installed): "
                 "runs carry no git commit", workflow_folder)
        return tags
    return tags | {MLFLOW_GIT_COMMIT: git["commit"], GIT_DIRTY_TAG: str(git["dirty"]).lower()}


# The invocation's publisher of its data jobs' records (imgpipe.tracking.records), stopped by end_invocation.
_record_publisher = None


def start_invocation(tracking_uri: str | None, experiment: str, config: dict,
                     workflow_folder: Path | str | None = None, provenance_folder: Path | str | None = None,
                     records_root: Path | str | None = None) -> str:
    """Create the store and experiment if needed, open the invocation's parent run, export both.

    With `records_root`, the data jobs' runs come as records in a folder of this invocation
    under it, which a thread of this process publishes (imgpipe.tracking.records); records earlier
    invocations left there unpublished are published first. Without it, jobs log their runs
    themselves.

    The files in `provenance_folder` (imgpipe.tracking.provenance.write_provenance) are logged to the
    run under provenance/.

    Also computes, once, the tags every run of the invocation carries (`invocation_tags`:
    `workflow_folder` is the Snakefile's folder, whose git commit is recorded) and exports
    them. Returns the parent run id. Called from the Snakefile's onstart.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        os.environ[TRACKING_URI_ENV] = tracking_uri
    mlflow.set_tracking_uri(None)  # a process-wide URI would shadow the environment variable
    uri = mlflow.get_tracking_uri()
    check_tracking_server(uri)
    with store_creation_lock(uri):  # the client's first use creates a new store
        client = MlflowClient()
        experiment_id = experiment_id_named(client, experiment)
    # Before our own run exists: what a killed invocation left RUNNING is closed first.
    abandoned = mark_abandoned_runs(
        client, experiment_id, marked_by=f"the snakemake invocation started by process {os.getpid()}")
    if abandoned:
        log.info("MLflow: marked %d run(s) left RUNNING by ended processes as KILLED", len(abandoned))
    else:
        log.debug("MLflow: no run left RUNNING by an ended process")
    shared_tags = invocation_tags(config, workflow_folder)
    run = client.create_run(
        experiment_id,
        run_name=f"snakemake {config['experiment']}",
        tags=with_context_tags({
            KIND_TAG: "invocation",
            f"{TAG_PREFIX}command": " ".join(sys.argv),
            f"{TAG_PREFIX}workdir": str(Path.cwd()),
            MLFLOW_SOURCE_NAME: f"imgpipe snakemake {config['experiment']}",
            MLFLOW_SOURCE_TYPE: "LOCAL",
            **shared_tags,
            **owner_tags(),  # this Snakemake process closes it, in onsuccess / onerror
        }),
    )
    client.log_dict(run.info.run_id, redact_secrets(config), "config.resolved.yaml")
    if provenance_folder is not None:
        client.log_artifacts(run.info.run_id, str(provenance_folder), "provenance")
    os.environ[EXPERIMENT_ENV] = experiment
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    os.environ[INVOCATION_TAGS_ENV] = json.dumps(shared_tags)
    if records_root is not None:
        global _record_publisher
        publish_leftovers(records_root, uri)
        _record_publisher = RecordPublisher.create(records_root, experiment_id, run.info.run_id, shared_tags, uri)
        _record_publisher.start()
        os.environ[RECORDS_ENV] = str(_record_publisher.folder)
    log.info("MLflow: experiment '%s' at %s, invocation run %s", experiment, mlflow.get_tracking_uri(),
             run.info.run_id)
    return run.info.run_id


def end_invocation(success: bool) -> None:
    """Publish the data jobs' last records, then mark the invocation's parent run FINISHED or
    FAILED (onsuccess / onerror); after a failure, also the runs its failed jobs could not
    close (see `mark_abandoned_runs`).

    Each step is tried even when the one before failed: a store on a full disk must not leave
    the invocation's run RUNNING (the next invocation would mark it KILLED) because publishing
    a record failed first. A store that cannot be written at all is logged as an error saying
    what to do; after a success, the error is raised too."""
    global _record_publisher
    if _record_publisher is not None:
        try:
            _record_publisher.stop()
        except Exception as error:  # noqa: BLE001 - the records stay for the next invocation
            log.error("MLflow: the job records could not be published (%s); the next invocation publishes them",
                      error_text(error))
        _record_publisher = None
        os.environ.pop(RECORDS_ENV, None)
    run_id = os.environ.get(PARENT_RUN_ENV)
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    status = "FINISHED" if success else "FAILED"
    client = MlflowClient()
    if not success:
        try:
            mark_abandoned_runs(client, client.get_run(run_id).info.experiment_id, failed_invocation=run_id,
                                marked_by=f"the failed snakemake invocation {run_id}")
        except Exception as error:  # noqa: BLE001 - the invocation's own run is still to be closed
            log.error("MLflow: runs its failed jobs left RUNNING could not be marked FAILED (%s); the next "
                      "invocation marks them KILLED", error_text(error))
    try:
        client.set_terminated(run_id, status)
    except Exception as error:
        log.error("MLflow: the invocation's run %s could not be marked %s (%s); if the store's disk is full, free "
                  "space: the next invocation marks the run KILLED", run_id, status, error_text(error))
        if success:
            raise



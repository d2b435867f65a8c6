"""MLflow: one run per invocation with its data jobs nested under it, one top-level run per model.

What `mlflow ui` opens on is the experiment's top-level runs: each model is one row there
(train and evaluate log into the same run), with its test metrics in the chart view (and as
table columns once picked), next to one collapsed row per invocation that holds the data jobs (crawl,
dedupe, preprocess, split, report) with their counts, which it also records as params
(not metrics: in the chart view every metric of a visible run gets a chart, and 30 data
counts would push the models' charts off the page). A model run
names its invocation in a tag instead of being its child: children sit collapsed under
their parent, out of sight and out of the charts.

The store is created once, in the Snakemake process before any job starts, under a file
lock beside a SQLite database (MLflow creating the schema from two processes at once fails
with "duplicate column name"; two invocations started together would). A tracking server
that does not answer fails the invocation, and any job, within seconds with its URI (MLflow's
own retries would block for minutes before saying anything). The invocation's run id, the
experiment and the tags every run carries (git commit, config hash) reach jobs through
the environment, not through params, so moving the tracking store or the checkout never
reruns a job. (MLFLOW_RUN_ID would mean "resume this run" to MLflow, so the parent id
travels under a name of our own.)

Snakemake runs each script from a temporary copy, so MLflow's own source name (the
script's path) and git tags (of the folder that copy sits in, the working directory)
would describe that copy: runs carry our own instead, saying the stage and the model or
class, and the commit of the workflow's own checkout.

A process killed with SIGKILL cannot close its run, so every run records its owner
(host, pid, process start time) and each new invocation marks the runs whose owner is
gone KILLED instead of leaving them RUNNING forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Iterator

from imgpipe.files import OutputWriteError, error_chain, error_text, write_failure, writing

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "IMGPIPE_MLFLOW_PARENT_RUN_ID"
# JSON: the tags every run of the invocation carries (experiment, config hash, git commit).
INVOCATION_TAGS_ENV = "IMGPIPE_MLFLOW_INVOCATION_TAGS"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
TAG_PREFIX = "imgpipe."
HOST_TAG = f"{TAG_PREFIX}host"
PID_TAG = f"{TAG_PREFIX}pid"
PID_STARTED_TAG = f"{TAG_PREFIX}pid_started"
ABANDONED_TAG = f"{TAG_PREFIX}abandoned"
ERROR_TAG = f"{TAG_PREFIX}error"  # a failed job's error (MLflow's tag values hold 5000 characters)
ERROR_TAG_CHARS = 5000
SQLITE_FULL = "database or disk is full"  # SQLite's message for SQLITE_FULL, through SQLAlchemy and MLflow
KIND_TAG = f"{TAG_PREFIX}kind"
STAGE_TAG = f"{TAG_PREFIX}stage"
MODEL_TAG = f"{TAG_PREFIX}model"
CLASS_TAG = f"{TAG_PREFIX}class"
EXPERIMENT_TAG = f"{TAG_PREFIX}experiment"
INVOCATION_TAG = f"{TAG_PREFIX}invocation"
LAST_INVOCATION_TAG = f"{TAG_PREFIX}last_invocation"  # of a run resumed by a later invocation
CONFIG_HASH_TAG = f"{TAG_PREFIX}config_hash"
VERSION_TAG = f"{TAG_PREFIX}version"
GIT_DIRTY_TAG = f"{TAG_PREFIX}git_dirty"
# The stage whose runs are top level: a model's train and evaluate jobs share its run.
MODEL_STAGE = "model"
# MLflow's own tags, shown by its UI (mlflow.utils.mlflow_tags; spelled out here so that
# importing this module does not import mlflow).
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
# An invocation and every job first check that an http(s) tracking server answers within
# this (check_tracking_server); MLflow's own retries, which keep a job alive through a
# server restart, are left as they are.
SERVER_CHECK_TIMEOUT_S = 5


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


def mark_abandoned_runs(client, experiment_id: str, marked_by: str | None = None,
                        failed_invocation: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose owner process has ended; return their ids.

    Their owner was killed (SIGKILL, the OOM killer, a lost terminal) before it could close
    them. Runs without owner tags (not opened by imgpipe) and runs of other hosts (a cluster
    node whose processes we cannot see) are left alone. One query, then one update per run
    marked: this runs at the start of every invocation. `marked_by` describes the caller
    for the tag on each marked run.

    With `failed_invocation` (a run id), only the runs of that invocation's jobs, marked
    FAILED: Snakemake saw each of its jobs end, so a run still open failed with its job, which
    could not close it (the store was on the disk that filled up).
    """
    status = "FAILED" if failed_invocation else "KILLED"
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
            if failed_invocation and failed_invocation not in (tags.get(INVOCATION_TAG), tags.get(LAST_INVOCATION_TAG)):
                continue
            reason = (f"process {owner_pid} on host {this_host} ended without closing this run; "
                      f"marked {status} by {marked_by}")
            client.set_tag(run.info.run_id, ABANDONED_TAG, reason)
            client.set_terminated(run.info.run_id, status)
            log.info("MLflow: run '%s' (%s) was left RUNNING by process %d, which has ended; marked %s",
                     run.info.run_name, run.info.run_id, owner_pid, status)
            abandoned.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            return abandoned


def invocation_tags(config: dict, workflow_folder: Path | str | None) -> dict[str, str]:
    """The tags every run of an invocation carries: where its results came from.

    The git commit is that of the checkout holding `workflow_folder` (the Snakefile's
    folder), not of the working directory, with whether files tracked there had
    uncommitted changes; outside a git checkout, or with no folder given, there is none.
    """
    from imgpipe.provenance import VERSION, config_hash, git_commit

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


def with_context_tags(tags: dict[str, str]) -> dict[str, str]:
    """`tags` with MLflow's own context tags (user, MLFLOW_RUN_CONTEXT) under them, except its
    source and git tags: those would describe the temporary script Snakemake runs."""
    from mlflow.tracking.context.git_context import GitRunContext
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags, ignore=[GitRunContext])


def check_tracking_server(uri: str) -> None:
    """Raise RuntimeError within seconds, naming `uri`, when an http(s) tracking server does not answer.

    Without it MLflow retries an unreachable server for minutes before it says anything.
    Any HTTP answer counts as alive (a 401, a 404 from a proxy: MLflow reports those), and
    so does a TLS handshake this probe does not verify (private CAs and client certificates
    are MLflow's to check, with its own settings); only a connection that cannot be made,
    or a server that does not answer within SERVER_CHECK_TIMEOUT_S, is refused. Other URIs
    (files, databases) pass. Credentials in the URI are used, and masked in the message.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests
    import urllib3

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            requests.get(uri.rstrip("/") + "/health", timeout=SERVER_CHECK_TIMEOUT_S, verify=False)
        return
    except requests.exceptions.SSLError:
        return
    except requests.exceptions.Timeout:
        reason = f"no answer within {SERVER_CHECK_TIMEOUT_S} s"
    except requests.exceptions.RequestException as error:
        reason = error_text(_root_cause(error))
    raise RuntimeError(
        f"MLflow tracking server {_without_credentials(uri)} does not answer ({reason}): "
        f"start it (`mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 --port 5000`) "
        f"or point config key mlflow.tracking_uri / MLFLOW_TRACKING_URI at one that runs"
    )


def _root_cause(error: BaseException) -> BaseException:
    """The socket error under requests' wrappers (ConnectionError > MaxRetryError > NewConnectionError)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "reason", None) or error.__cause__ or error.__context__ or next(
            (arg for arg in error.args if isinstance(arg, BaseException)), None)
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def _without_credentials(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created if it does not exist; another invocation creating it at
    the same moment (on a server or a database the file lock does not cover) is no error."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (relative or absolute); None for others."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while it may be created (other URIs: no lock).

    flock is released by the kernel when the process dies, so a kill -9 leaves no stale lock;
    the empty .lock file stays (it is not a sign of anything).
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The invocation's publisher of its data jobs' records (imgpipe.jobrecords), stopped by end_invocation.
_record_publisher = None


def start_invocation(tracking_uri: str | None, experiment: str, config: dict,
                     workflow_folder: Path | str | None = None, provenance_folder: Path | str | None = None,
                     records_root: Path | str | None = None) -> str:
    """Create the store and experiment if needed, open the invocation's parent run, export both.

    With `records_root`, the data jobs' runs come as records in a folder of this invocation
    under it, which a thread of this process publishes (imgpipe.jobrecords); records earlier
    invocations left there unpublished are published first. Without it, jobs log their runs
    themselves.

    The files in `provenance_folder` (imgpipe.provenance.write_provenance) are logged to the
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
        experiment_id = _experiment_id(client, experiment)
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
        from imgpipe.jobrecords import RECORDS_ENV, RecordPublisher, publish_leftovers

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
        from imgpipe.jobrecords import RECORDS_ENV

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


def store_write_failure(error: BaseException, then: str = "") -> OutputWriteError | None:
    """`error` as a failure to write the SQLite tracking store where it is one (MLflow says
    "database or disk is full" and names neither the file nor what to do); None otherwise."""
    import mlflow

    database = _sqlite_path(mlflow.get_tracking_uri())
    if database is None or isinstance(error, OutputWriteError) or not isinstance(error, Exception):
        return None
    if not any(SQLITE_FULL in str(link) for link in error_chain(error)):
        return None
    return write_failure(error, database, then, code=errno.ENOSPC)


@contextlib.contextmanager
def artifact_writes(then: str = "") -> Iterator[None]:
    """Logging artifacts to the active run: a failure is an OutputWriteError naming the run's
    artifact folder, where that is a local folder (a remote store's errors stay as they are)."""
    import mlflow

    location = urllib.parse.urlparse(mlflow.get_artifact_uri())
    if location.scheme not in ("", "file"):
        yield
        return
    with writing(urllib.parse.unquote(location.path), then):
        yield


@contextlib.contextmanager
def job_run(run_name: str, tags: dict | None = None, resume_run_id: str | None = None, then: str = "") -> Iterator:
    """An MLflow run for one job, or `resume_run_id` resumed.

    A model's run (tag imgpipe.stage 'model') is a top-level run; any other job's run is a
    child of the invocation's run and, when it finishes, records its counts there (see
    `record_counts_on_invocation`). New runs carry the invocation's tags (see `invocation_tags`) and its
    run id (imgpipe.invocation), and a source name that says the stage and the model or class.
    A job that raises leaves its run FAILED, its error in tag imgpipe.error; a store on a full
    disk fails the job with an error that says so and names the database (`then`: what a rerun
    does), and never hides the job's own error when the run cannot be closed. A run to resume that the store no longer has
    (the database was deleted or moved) is replaced by a new one, with a warning. The run
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


def record_counts_on_invocation(counts: dict, parent_id: str, prefix: str, client=None) -> None:
    """Copy a finished data job's counts (its metrics) onto the invocation's run as params
    '<prefix>/<name>' (crawl/cat/images_ok), so one run page says what data the models of that
    invocation saw.

    Params, not metrics: in the chart view every metric of a visible run gets a chart, and
    thirty data counts would push the models' charts off the first screen.
    """
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not counts:
        return
    client = client or MlflowClient()
    params = [Param(f"{prefix}/{key}", f"{value:g}") for key, value in sorted(counts.items())]
    try:
        client.log_batch(parent_id, params=params)
    except MlflowException as error:  # a job retried in the same invocation with other counts
        log.warning("MLflow: the counts of %s could not be recorded on the invocation's run %s: %s",
                    prefix, parent_id, error)


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

    from imgpipe.manifests import read_split_manifest

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
        """What loading the starting weights did (an imgpipe.models.WeightsLoad, or None for
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

"""Data jobs' MLflow runs as files, published by the Snakemake process.

A data job (crawl, dedupe, preprocess, split, report, predict) does a second or less of
work for a handful of counts; importing mlflow and opening and closing a run on the store
cost it about two seconds more. So such a job never imports mlflow: it writes what it
would have logged (params, metrics, tags, artifact paths, start and end time, status) as
one JSON record into its invocation's folder, and the Snakemake process, which has mlflow
loaded already, publishes each record as the job's run under the invocation's run as soon
as it appears (a thread, every RECORD_POLL_S) and at the end of the invocation. The runs
look as if the jobs had logged them: same names, tags, nesting, times.

What a kill leaves: a job writes a RUNNING record when it starts, replaced by its final one
when it ends; a RUNNING record whose process has ended is published as a KILLED run. A
Snakemake process killed before publishing leaves its folder, and the next invocation in
the same working directory publishes it (under the run of the invocation that made it).
Where a job cannot see the folder (a Kubernetes pod without the working directory, a job
started outside an invocation) it publishes its record itself, importing mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from imgpipe.core.files import error_text
from imgpipe.tracking.owners import owner_tags, process_is_running
from imgpipe.tracking.runs import job_experiment_id, job_tags
from imgpipe.tracking.store import (
    check_tracking_server,
    record_counts_on_invocation,
    with_context_tags,
)
from imgpipe.tracking.tags import (
    ABANDONED_TAG,
    ERROR_TAG,
    ERROR_TAG_CHARS,
    HOST_TAG,
    INVOCATION_TAGS_ENV,
    MISSING_ARTIFACTS_TAG,
    PARENT_RUN_ENV,
    PID_STARTED_TAG,
    PID_TAG,
)

log = logging.getLogger(__name__)

# The folder this invocation's jobs write their records to (absolute), exported by the
# Snakemake process; under it, one folder per invocation run.
RECORDS_ENV = "IMGPIPE_MLFLOW_RECORDS"
RECORDS_ROOT = ".snakemake/imgpipe/mlflow-records"
INVOCATION_FILE = "invocation.json"
LOCK_FILE = ".lock"
RECORD_POLL_S = 2.0
# MLflow's log_batch limits per call.
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000


def now_ms() -> int:
    return int(time.time() * 1000)


class JobRecord:
    """What a data job logs, kept until it ends: the subset of mlflow's fluent API the jobs use.

    Values are converted as mlflow converts them (params and tags to str, metrics to float),
    so a value MLflow would refuse fails in the job, not later in the publisher.
    """

    def __init__(self, run_name: str, tags: dict | None = None):
        self.run_name = run_name
        self.tags = {key: str(value) for key, value in (tags or {}).items()}
        self.params: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.status = "RUNNING"
        self.error: str | None = None
        self.start_ms = now_ms()
        self.end_ms: int | None = None
        self.owner = owner_tags()

    def set_tag(self, key: str, value) -> None:
        self.tags[key] = str(value)

    def log_param(self, key: str, value) -> None:
        self.params[key] = str(value)

    def log_params(self, params: dict) -> None:
        for key, value in params.items():
            self.log_param(key, value)

    def log_metric(self, key: str, value) -> None:
        self.metrics[key] = float(value)

    def log_metrics(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Logged by the publisher from where it is now: outputs of the job, which stay put."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self.artifacts.append((str(path.resolve()), artifact_path))

    def end(self, status: str, error: BaseException | None = None) -> None:
        self.status = status
        self.error = error_text(error) if error is not None else None
        self.end_ms = now_ms()

    def as_dict(self) -> dict:
        return {"run_name": self.run_name, "tags": self.tags, "params": self.params, "metrics": self.metrics,
                "artifacts": self.artifacts, "status": self.status, "error": self.error,
                "start_ms": self.start_ms, "end_ms": self.end_ms, "owner": self.owner}


def records_folder() -> Path | None:
    """This invocation's record folder, when a Snakemake process exported one and this job sees it."""
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return None
    if not Path(folder, INVOCATION_FILE).is_file():
        log.info("MLflow: the invocation's record folder %s is not visible here (another machine's disk?); "
                 "this job logs its run itself", folder)
        return None
    return Path(folder)


def write_record(folder: Path, name: str, record: dict) -> None:
    """Atomically: the publisher sees the old record or the new one, never half of one."""
    partial = folder / f"{name}.json.part"
    partial.write_text(json.dumps(record) + "\n")
    os.replace(partial, folder / f"{name}.json")


@contextlib.contextmanager
def data_job_run(run_name: str, tags: dict | None = None) -> Iterator[JobRecord]:
    """A data job's MLflow run, as a record its invocation publishes (see the module's docstring).

    A job that raises leaves its run FAILED, with the error in tag imgpipe.error.
    """
    record = JobRecord(run_name, tags)
    folder = records_folder()
    name = f"{record.start_ms}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if folder is not None:
        write_record(folder, name, record.as_dict())
    try:
        yield record
    except BaseException as error:
        record.end("FAILED", error)
        raise
    else:
        record.end("FINISHED")
    finally:
        _hand_over(record, folder, name)


def _hand_over(record: JobRecord, folder: Path | None, name: str) -> None:
    """The ended record to the invocation's folder, or published by this job where the folder is
    gone (its invocation ended meanwhile) or was never there. A failure here is logged, not
    raised: it must neither fail a job that did its work nor hide the error of one that did not."""
    try:
        if folder is not None:
            try:
                write_record(folder, name, record.as_dict())
                return
            except OSError as error:
                log.warning("MLflow: the record folder %s is gone (%s); this job logs its run itself",
                            folder, error_text(error))
        publish_own_record(record.as_dict())
    except Exception as error:
        log.error("MLflow: the run of this job could not be recorded (%s); its results are not affected",
                  error_text(error))


def publish_own_record(record: dict) -> str:
    """Publish a record from the job that made it, to the invocation its environment names, if any."""
    import mlflow

    check_tracking_server(mlflow.get_tracking_uri())
    return publish_record(record, job_experiment_id(), os.environ.get(PARENT_RUN_ENV),
                          json.loads(os.environ.get(INVOCATION_TAGS_ENV, "{}")))


def publish_record(record: dict, experiment_id: str, invocation_id: str | None, invocation_tags: dict,
                   client=None) -> str:
    """Create the run a record describes, terminated with its status and times; return its id.

    A FINISHED data job's counts also go on the invocation's run (record_counts_on_invocation).
    An artifact whose file has gone since (deleted, or the job's outputs removed after it
    failed) is named in tag imgpipe.missing_artifacts, with a warning.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    owner = record["owner"]
    tags = job_tags(record["run_name"], record["tags"], invocation_id, invocation_tags, owner)
    if record.get("error"):
        tags[ERROR_TAG] = record["error"][:ERROR_TAG_CHARS]
    if record["status"] == "KILLED":
        tags[ABANDONED_TAG] = (f"process {owner.get(PID_TAG)} on host {owner.get(HOST_TAG)} ended without finishing "
                               f"this job; marked KILLED by the snakemake invocation that published its record")
    run_id = client.create_run(experiment_id, run_name=record["run_name"], start_time=record["start_ms"],
                               tags=with_context_tags(tags)).info.run_id
    try:
        _fill_run(client, run_id, record, tags, invocation_id)
    except BaseException:
        try:  # the record stays for another try, which must not find a half-made twin
            client.delete_run(run_id)
        except Exception as error:
            log.warning("MLflow: the partly published run %s could not be removed (%s)", run_id, error_text(error))
        raise
    return run_id


def _fill_run(client, run_id: str, record: dict, tags: dict, invocation_id: str | None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    end_ms = record["end_ms"] or now_ms()
    params = [Param(key, value) for key, value in record["params"].items()]
    metrics = [Metric(key, value, end_ms, 0) for key, value in record["metrics"].items()]
    for start in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + PARAMS_PER_BATCH])
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])
    missing = []
    for path, artifact_path in record["artifacts"]:
        if Path(path).is_file():
            client.log_artifact(run_id, path, artifact_path)
        else:
            missing.append(path)
    if missing:
        log.warning("MLflow: run '%s': %d artifact(s) no longer exist and were not logged: %s",
                    record["run_name"], len(missing), ", ".join(missing))
        client.log_batch(run_id, tags=[RunTag(MISSING_ARTIFACTS_TAG, ", ".join(missing)[:5000])])
    client.set_terminated(run_id, record["status"], end_time=end_ms)
    if record["status"] == "FINISHED" and invocation_id and tags.get("mlflow.parentRunId") == invocation_id:
        record_counts_on_invocation(record["metrics"], invocation_id, prefix=record["run_name"].replace(" ", "/"),
                                    client=client)


def _owner_has_ended(owner: dict) -> bool:
    """Whether the process that wrote a RUNNING record is gone; a process of another host counts as running."""
    if owner.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        return not process_is_running(int(owner[PID_TAG]), owner.get(PID_STARTED_TAG, ""))
    except (KeyError, ValueError):
        return True


class RecordPublisher:
    """Publishes the records of one invocation's folder: as they appear (start), then all (stop).

    Holds a lock on the folder for as long as it lives, so that a later invocation publishes
    the folder's records only once this one's process has ended (the kernel drops the lock).
    """

    def __init__(self, folder: Path, experiment_id: str, invocation_id: str, invocation_tags: dict,
                 lock_handle=None, tracking_uri: str | None = None):
        self.folder = folder
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.invocation_id = invocation_id
        self.invocation_tags = invocation_tags
        self._lock_handle = lock_handle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        self._client = None

    @classmethod
    def create(cls, root: Path | str, experiment_id: str, invocation_id: str, invocation_tags: dict,
               tracking_uri: str) -> RecordPublisher:
        """A new folder for an invocation under `root`, locked by this process."""
        folder = Path(root).resolve() / invocation_id
        folder.mkdir(parents=True, exist_ok=True)
        handle = _try_lock(folder)
        if handle is None:
            raise RuntimeError(f"the record folder {folder} of a new invocation is locked by another process")
        (folder / INVOCATION_FILE).write_text(json.dumps({
            "experiment_id": experiment_id, "invocation_id": invocation_id, "invocation_tags": invocation_tags,
            "tracking_uri": tracking_uri,
        }) + "\n")
        return cls(folder, experiment_id, invocation_id, invocation_tags, handle, tracking_uri)

    def publish_pending(self, final: bool = False) -> int:
        """Publish every ended record, and as KILLED every RUNNING one whose process has ended
        (with `final`, the end of its own invocation, also those of other hosts: Snakemake has
        seen every job end, so one still RUNNING died without a word, a cancelled cluster job);
        each published record's file is removed. Returns how many are left."""
        from mlflow.tracking import MlflowClient

        self._client = self._client or MlflowClient(self.tracking_uri)
        left = 0
        for path in sorted(self.folder.glob("*.json")):
            if path.name == INVOCATION_FILE:
                continue
            try:
                record = json.loads(path.read_text())
                if record["status"] == "RUNNING":
                    owner = record["owner"]
                    ended = _owner_has_ended(owner) if owner.get(HOST_TAG) == socket.gethostname() else final
                    if not ended:
                        left += 1
                        continue
                    # Read again: a job that ended between the two reads has replaced its RUNNING record.
                    record = json.loads(path.read_text())
                if record["status"] == "RUNNING":
                    record["status"] = "KILLED"
                    record["end_ms"] = max(record["start_ms"], int(path.stat().st_mtime * 1000))
                publish_record(record, self.experiment_id, self.invocation_id, self.invocation_tags, self._client)
                path.unlink()
            except Exception as error:  # a store hiccup: the record stays for the next round or invocation
                left += 1
                if path.name not in self._warned:
                    self._warned.add(path.name)
                    log.warning("MLflow: the job record %s could not be published yet (%s)", path, error_text(error))
        return left

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="imgpipe-mlflow-records", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(RECORD_POLL_S):
            try:
                self.publish_pending()
            except Exception as error:  # publishing must go on; what failed is tried again
                log.warning("MLflow: publishing job records failed (%s); trying again", error_text(error))

    def stop(self, final: bool = True) -> int:
        """Publish what is left and release the folder (removed when nothing is left in it);
        return how many records are left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        left = self.publish_pending(final=final)
        if left:
            log.warning("MLflow: %d job record(s) in %s are not published; the next snakemake invocation in this "
                        "folder publishes them", left, self.folder)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None
        return left


def _try_lock(folder: Path):
    """An open handle holding an exclusive lock on the folder's lock file, or None when another process holds it."""
    handle = open(folder / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def publish_leftovers(root: Path | str, tracking_uri: str) -> int:
    """Publish the record folders that invocations which have ended left under `root`, for the
    store at `tracking_uri`; return how many records were published. A folder still locked
    belongs to a running invocation; one for another store waits for an invocation using it;
    a RUNNING record of another host waits for its job (killing snakemake leaves cluster jobs
    running)."""
    root = Path(root)
    if not root.is_dir():
        return 0
    published = 0
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        handle = _try_lock(folder)
        if handle is None:
            continue
        try:
            invocation = json.loads((folder / INVOCATION_FILE).read_text())
        except (OSError, ValueError) as error:
            handle.close()
            log.warning("MLflow: the record folder %s has no readable %s (%s); left as it is",
                        folder, INVOCATION_FILE, error_text(error))
            continue
        if invocation.get("tracking_uri", tracking_uri) != tracking_uri:
            handle.close()
            log.info("MLflow: %s holds job records for the store %s, not this one; left for an invocation using it",
                     folder, invocation["tracking_uri"])
            continue
        records = len([path for path in folder.glob("*.json") if path.name != INVOCATION_FILE])
        publisher = RecordPublisher(folder, invocation["experiment_id"], invocation["invocation_id"],
                                    invocation["invocation_tags"], handle, tracking_uri)
        left = publisher.stop(final=False)
        published += records - left
        if records:
            log.info("MLflow: published %d job record(s) an earlier invocation (run %s) left unpublished",
                     records - left, invocation["invocation_id"])
    return published

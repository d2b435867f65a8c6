"""The MLflow store: created once, checked before use, and its write failures told apart.

The store is created once, in the Snakemake process before any job starts, under a file
lock beside a SQLite database (MLflow creating the schema from two processes at once fails
with "duplicate column name"; two invocations started together would). A tracking server
that does not answer fails the invocation, and any job, within seconds with its URI (MLflow's
own retries would block for minutes before saying anything).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import urllib.parse
import warnings
from pathlib import Path
from typing import Iterator

from imgpipe.core.files import (
    OutputWriteError,
    error_chain,
    error_text,
    write_failure,
    writing,
)

log = logging.getLogger(__name__)


SQLITE_FULL = "database or disk is full"  # SQLite's message for SQLITE_FULL, through SQLAlchemy and MLflow


# An invocation and every job first check that an http(s) tracking server answers within
# this (check_tracking_server); MLflow's own retries, which keep a job alive through a
# server restart, are left as they are.
SERVER_CHECK_TIMEOUT_S = 5


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


def experiment_id_named(client, name: str) -> str:
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

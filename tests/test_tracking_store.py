"""The tracking store under concurrency and when it is out of reach."""

import importlib
import multiprocessing
import os
import re
import socket
import threading

import pytest
from mlflow.tracking import MlflowClient

from imgpipe.tracking.invocation import end_invocation, start_invocation
from imgpipe.tracking.runs import job_run
from imgpipe.tracking.store import check_tracking_server, experiment_id_named
from imgpipe.tracking.tags import INVOCATION_TAGS_ENV

CONFIG = {"experiment": "race", "models": {"cnn": {"lr": 0.1}}}


def _start_and_end(uri: str, workdir: str, barrier, results) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(workdir)
    importlib.import_module("mlflow")  # before the barrier, so that the processes start together
    barrier.wait()
    try:
        run_id = start_invocation(None, "race", CONFIG)
        end_invocation(success=True)
        results.put(("ok", run_id))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        results.put(("failed", f"{type(error).__name__}: {error}"))


def test_invocations_started_at_once_on_a_fresh_sqlite_store_all_start(tmp_path):
    """Three `snakemake` invocations started together on a store that does not exist yet:
    MLflow creating the schema from each of them at once fails ("duplicate column name")."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    processes = []
    for k in range(3):
        (tmp_path / f"work{k}").mkdir()
        processes.append(context.Process(target=_start_and_end, args=(uri, str(tmp_path / f"work{k}"), barrier, results)))
        processes[-1].start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join()

    assert [status for status, _ in outcomes] == ["ok"] * 3, outcomes
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(run_id for _, run_id in outcomes)


def _closed_port_uri(credentials: str = "") -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://{credentials}127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", INVOCATION_TAGS_ENV, "IMGPIPE_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_unreachable_tracking_server_fails_the_invocation_with_what_to_do(clean_env):
    uri = _closed_port_uri()
    with pytest.raises(RuntimeError) as error:
        start_invocation(uri, "race", CONFIG)

    message = str(error.value)
    assert uri in message and "mlflow.tracking_uri" in message and "mlflow server" in message


def test_a_server_that_accepts_but_never_answers_is_unreachable_too(clean_env):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are accepted by the kernel, and nothing ever answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        expected = f"MLflow tracking server {uri} does not answer (no answer within 5 s)"
        with pytest.raises(RuntimeError, match=re.escape(expected)):
            check_tracking_server(uri)


def test_credentials_in_the_uri_are_masked_in_the_message(clean_env):
    uri = _closed_port_uri("alice:s3cret@")
    with pytest.raises(RuntimeError) as error:
        check_tracking_server(uri)

    assert "s3cret" not in str(error.value) and "http://***@127.0.0.1:" in str(error.value)


@pytest.mark.parametrize("answer", [b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 404 Not Found"])
def test_any_http_answer_counts_as_a_server(clean_env, answer):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def reply():
            connection, _ = server.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(answer + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        thread = threading.Thread(target=reply)
        thread.start()
        check_tracking_server(f"http://127.0.0.1:{server.getsockname()[1]}")  # no error: MLflow reports it
        thread.join()


def test_a_job_whose_tracking_server_is_gone_fails_with_the_uri(clean_env):
    uri = _closed_port_uri()
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError, match=f"MLflow tracking server {uri} does not answer"):
        with job_run("crawl cat", tags={"imgpipe.stage": "crawl"}):
            pass


def test_an_experiment_another_invocation_created_meanwhile_is_used(mlflow_uri):
    """On a server or a database (no file lock), two invocations may both find no experiment
    and both create it: the second must use the first's, not die with RESOURCE_ALREADY_EXISTS."""
    client = MlflowClient()
    created_meanwhile = client.create_experiment("race")
    lookups = iter([None])  # the first lookup ran before the other invocation created it
    found = client.get_experiment_by_name
    client.get_experiment_by_name = lambda name: next(lookups, None) or found(name)

    assert experiment_id_named(client, "race") == created_meanwhile

"""The tracking store under concurrency and when it is out of reach."""

import importlib
import multiprocessing
import os
import socket

import pytest
from mlflow.tracking import MlflowClient

from imgpipe.tracking import FAIL_FAST_HTTP, INVOCATION_TAGS_ENV, end_invocation, job_run, start_invocation

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


def _closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*FAIL_FAST_HTTP, "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", INVOCATION_TAGS_ENV,
                 "IMGPIPE_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_unreachable_tracking_server_fails_the_invocation_with_what_to_do(clean_env):
    uri = _closed_port_uri()
    with pytest.raises(RuntimeError) as error:
        start_invocation(uri, "race", CONFIG)

    message = str(error.value)
    assert uri in message and "mlflow.tracking_uri" in message and "mlflow server" in message
    # jobs get MLflow's retries cut down too, unless the user set them
    assert {name: os.environ[name] for name in FAIL_FAST_HTTP} == FAIL_FAST_HTTP


def test_a_user_setting_of_mlflow_retries_is_kept(clean_env):
    clean_env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    with pytest.raises(RuntimeError):
        start_invocation(_closed_port_uri(), "race", CONFIG)

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_a_job_whose_tracking_server_is_gone_fails_with_the_uri(clean_env):
    uri = _closed_port_uri()
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError, match=f"MLflow tracking server {uri} does not answer"):
        with job_run("crawl cat", tags={"imgpipe.stage": "crawl"}):
            pass

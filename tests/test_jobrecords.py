"""Data jobs' runs as records published by the invocation's process (imgpipe.tracking.records)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from imgpipe.tracking.invocation import end_invocation, start_invocation
from imgpipe.tracking.records import RECORDS_ENV, data_job_run, publish_leftovers

CONFIG = {"experiment": "pets", "models": {"cnn": {"lr": 0.1}}}


def runs_by_name(experiment: str = "pets") -> dict:
    client = MlflowClient()
    return {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])}


def record_files(folder: str) -> list[Path]:
    return sorted(path for path in Path(folder).glob("*.json") if path.name != "invocation.json")


def test_a_data_job_writes_a_record_that_the_invocation_publishes_as_its_child_run(mlflow_uri, tmp_path):
    root = tmp_path / "records"
    parent_id = start_invocation(None, "pets", CONFIG, records_root=root)
    folder = os.environ[RECORDS_ENV]
    assert Path(folder) == (root / parent_id).resolve()
    manifest = tmp_path / "cat.csv"
    manifest.write_text("file\na.png\n")
    before = int(time.time() * 1000)
    with data_job_run("crawl cat", tags={"imgpipe.stage": "crawl", "imgpipe.class": "cat"}) as run:
        run.log_params({"target": None, "limit.min_size": 32})
        run.log_metrics({"images_ok": 12, "images_failed": 1})
        run.set_tag("imgpipe.crawl_outcome", "exhausted")
        run.log_artifact(manifest)
        time.sleep(0.05)
    # The record is a file until the publisher's thread or the end of the invocation publishes it.
    assert len(record_files(folder)) <= 1
    end_invocation(success=True)

    assert not Path(folder).exists(), "the invocation's record folder is removed once all is published"
    crawl = runs_by_name()["crawl cat"]
    assert crawl.info.status == "FINISHED"
    assert crawl.data.tags["mlflow.parentRunId"] == parent_id
    assert crawl.data.tags["imgpipe.invocation"] == parent_id
    assert crawl.data.tags["imgpipe.crawl_outcome"] == "exhausted"
    assert crawl.data.tags["mlflow.source.name"] == "imgpipe crawl cat"
    assert crawl.data.tags["imgpipe.pid"] == str(os.getpid())
    assert crawl.data.metrics == {"images_ok": 12, "images_failed": 1}
    assert crawl.data.params == {"target": "None", "limit.min_size": "32"}
    # The run's times are the job's, not the publisher's.
    assert before <= crawl.info.start_time and crawl.info.end_time - crawl.info.start_time >= 50
    artifacts = [entry.path for entry in MlflowClient().list_artifacts(crawl.info.run_id)]
    assert artifacts == ["cat.csv"]
    invocation = MlflowClient().get_run(parent_id)
    assert invocation.data.params["crawl/cat/images_ok"] == "12"
    assert invocation.info.status == "FINISHED"


def test_the_publisher_does_not_wait_for_the_end_of_the_invocation(mlflow_uri, tmp_path):
    start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
        run.log_metric("n_test", 3)
    deadline = time.time() + 30
    while "split" not in runs_by_name() and time.time() < deadline:
        time.sleep(0.2)
    assert runs_by_name()["split"].info.status == "FINISHED"
    assert not record_files(os.environ[RECORDS_ENV])
    end_invocation(success=True)


def test_a_failed_data_job_is_a_failed_run_with_its_error_and_no_counts_on_the_invocation(mlflow_uri, tmp_path):
    parent_id = start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    with pytest.raises(OSError):
        with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
            run.log_metric("n_test", 3)
            raise OSError("disk full")
    end_invocation(success=False)
    split = runs_by_name()["split"]
    assert split.info.status == "FAILED"
    assert split.data.tags["imgpipe.error"] == "OSError: disk full"
    assert not [key for key in MlflowClient().get_run(parent_id).data.params if key.startswith("split/")]


def test_an_artifact_gone_before_publishing_is_named_on_the_run(mlflow_uri, tmp_path, caplog):
    start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    summary = tmp_path / "summary.json"
    summary.write_text("{}")
    with data_job_run("dedupe", tags={"imgpipe.stage": "dedupe"}) as run:
        run.log_artifact(summary)
    summary.unlink()
    end_invocation(success=True)
    dedupe = runs_by_name()["dedupe"]
    assert dedupe.data.tags["imgpipe.missing_artifacts"] == str(summary.resolve())
    assert "no longer exist" in caplog.text
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
            run.log_artifact(tmp_path / "nothing.csv")


JOB = textwrap.dedent("""
    import os, signal, sys
    from imgpipe.tracking.records import data_job_run
    with data_job_run(sys.argv[1], tags={"imgpipe.stage": "crawl", "imgpipe.class": "cat"}) as run:
        run.log_metric("images_ok", 5)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_job_killed_with_sigkill_is_published_killed(mlflow_uri, tmp_path):
    parent_id = start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    job = subprocess.run([sys.executable, "-c", JOB, "crawl cat"], capture_output=True, text=True)
    assert job.returncode == -signal.SIGKILL, job.stderr
    end_invocation(success=False)
    crawl = runs_by_name()["crawl cat"]
    assert crawl.info.status == "KILLED"
    assert crawl.data.tags["mlflow.parentRunId"] == parent_id
    assert "ended without finishing this job" in crawl.data.tags["imgpipe.abandoned"]
    assert crawl.data.metrics == {}, "what the killed job had not finished is not reported as its result"


INVOCATION_KILLED = textwrap.dedent("""
    import os, signal, sys
    from imgpipe.tracking.invocation import start_invocation
    from imgpipe.tracking.records import data_job_run
    parent = start_invocation(None, "pets", {"experiment": "pets"}, records_root=sys.argv[1])
    print(parent, flush=True)
    with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
        run.log_metric("n_test", 7)
    os.kill(os.getpid(), signal.SIGKILL)  # before the publisher's thread wakes up
""")


def test_records_an_invocation_killed_before_publishing_left_are_published_by_the_next(mlflow_uri, tmp_path):
    root = tmp_path / "records"
    killed = subprocess.run([sys.executable, "-c", INVOCATION_KILLED, str(root)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    killed_parent = killed.stdout.split()[0]
    assert len(record_files(root / killed_parent)) == 1
    assert "split" not in runs_by_name()

    start_invocation(None, "pets", CONFIG, records_root=root)
    split = runs_by_name()["split"]
    assert split.info.status == "FINISHED" and split.data.metrics == {"n_test": 7}
    assert split.data.tags["mlflow.parentRunId"] == killed_parent
    assert MlflowClient().get_run(killed_parent).data.params["split/n_test"] == "7"
    assert not (root / killed_parent).exists()
    end_invocation(success=True)
    assert sorted(path.name for path in root.iterdir()) == []


def test_a_folder_locked_by_a_running_invocation_is_not_published_by_another(mlflow_uri, tmp_path):
    root = tmp_path / "records"
    start_invocation(None, "pets", CONFIG, records_root=root)
    with data_job_run("split", tags={"imgpipe.stage": "split"}):
        pass
    # (the thread may publish it meanwhile; what matters is that the other invocation does not)
    assert publish_leftovers(root, os.environ["MLFLOW_TRACKING_URI"]) == 0
    end_invocation(success=True)
    assert len([run for run in runs_by_name().values() if run.info.run_name == "split"]) == 1


def test_a_job_that_cannot_see_the_folder_logs_its_run_itself(mlflow_uri, tmp_path, monkeypatch):
    parent_id = start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    monkeypatch.setenv(RECORDS_ENV, str(tmp_path / "on-another-machine"))
    with data_job_run("preprocess cat", tags={"imgpipe.stage": "preprocess", "imgpipe.class": "cat"}) as run:
        run.log_metric("images_ok", 4)
    preprocess = runs_by_name()["preprocess cat"]  # already there, before the invocation ends
    assert preprocess.info.status == "FINISHED"
    assert preprocess.data.tags["mlflow.parentRunId"] == parent_id
    assert MlflowClient().get_run(parent_id).data.params["preprocess/cat/images_ok"] == "4"
    end_invocation(success=True)


def test_a_record_is_never_half_written(mlflow_uri, tmp_path):
    start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    folder = Path(os.environ[RECORDS_ENV])
    with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
        running = record_files(folder)
        assert len(running) == 1 and json.loads(running[0].read_text())["status"] == "RUNNING"
        run.log_metric("n_test", 1)
    assert not list(folder.glob("*.part"))
    end_invocation(success=True)


def leftover_folder(root: Path, tracking_uri: str, records: list[dict]) -> Path:
    """A record folder as an invocation killed before publishing leaves it."""
    folder = root / "dead-invocation"
    folder.mkdir(parents=True)
    (folder / "invocation.json").write_text(json.dumps({
        "experiment_id": "0", "invocation_id": "dead-invocation", "invocation_tags": {}, "tracking_uri": tracking_uri}))
    for number, record in enumerate(records):
        (folder / f"{number}.json").write_text(json.dumps(record))
    return folder


def running_record(host: str, pid: int) -> dict:
    return {"run_name": "crawl cat", "tags": {"imgpipe.stage": "crawl"}, "params": {}, "metrics": {}, "artifacts": [],
            "status": "RUNNING", "error": None, "start_ms": 1000, "end_ms": None,
            "owner": {"imgpipe.host": host, "imgpipe.pid": str(pid), "imgpipe.pid_started": ""}}


def test_leftovers_wait_for_their_own_store_and_for_jobs_still_running_elsewhere(mlflow_uri, tmp_path):
    root = tmp_path / "records"
    other_store = leftover_folder(root / "a", "sqlite:////elsewhere/mlflow.db", [running_record("node7", 1)])
    assert publish_leftovers(root / "a", mlflow_uri) == 0 and other_store.exists()
    on_a_node = leftover_folder(root / "b", mlflow_uri, [running_record("node7", 1)])
    assert publish_leftovers(root / "b", mlflow_uri) == 0
    assert len(record_files(on_a_node)) == 1, "a cluster job may still be running: its record waits"


def test_a_killed_jobs_run_ends_when_its_record_was_last_written(mlflow_uri, tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = leftover_folder(tmp_path / "records", mlflow_uri, [running_record(socket.gethostname(),
                                                                               int(dead.stdout))])
    os.utime(folder / "0.json", (5, 5))
    assert publish_leftovers(tmp_path / "records", mlflow_uri) == 1
    run = MlflowClient().search_runs(["0"])[0]
    assert run.info.status == "KILLED" and run.info.end_time == 5000


def test_a_job_whose_record_folder_is_gone_logs_its_run_itself(mlflow_uri, tmp_path, caplog):
    start_invocation(None, "pets", CONFIG, records_root=tmp_path / "records")
    folder = Path(os.environ[RECORDS_ENV])
    with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
        run.log_metric("n_test", 2)
        for path in folder.iterdir():  # the invocation ended (and cleaned up) while this job ran
            path.unlink()
        folder.rmdir()
    assert "the record folder" in caplog.text
    assert runs_by_name()["split"].data.metrics == {"n_test": 2}
    end_invocation(success=True)

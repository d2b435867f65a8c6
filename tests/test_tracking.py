import mlflow
import pytest
from mlflow.tracking import MlflowClient

from imgpipe.tracking import (PARENT_RUN_ENV, end_invocation, flatten, job_run, read_run_reference,
                              start_invocation, write_run_reference)


def test_flatten_nested_settings():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": []}) == {"a.b": 1, "a.c.d": "x", "e": []}


def test_invocation_parent_and_job_children(mlflow_uri, tmp_path):
    parent_id = start_invocation(None, "pets", {"experiment": "pets", "models": {"cnn": {"lr": 0.1}}})
    with job_run("crawl cat", tags={"imgpipe.stage": "crawl"}) as run:
        mlflow.log_metric("images_ok", 12)
        write_run_reference(run, tmp_path / "run.json")
    with pytest.raises(RuntimeError):
        with job_run("train cnn"):
            raise RuntimeError("out of memory")
    end_invocation(success=True)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("pets")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs["crawl cat"].data.tags["mlflow.parentRunId"] == parent_id
    assert runs["crawl cat"].data.metrics["images_ok"] == 12
    assert runs["train cnn"].info.status == "FAILED"
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert read_run_reference(tmp_path / "run.json") == runs["crawl cat"].info.run_id
    artifacts = [a.path for a in client.list_artifacts(parent_id)]
    assert "config.resolved.yaml" in artifacts


def test_evaluate_resumes_the_model_run_and_survives_a_lost_store(mlflow_uri, monkeypatch):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    with job_run("cnn") as first:
        mlflow.log_metric("best_val_accuracy", 0.9)
    with job_run("cnn", resume_run_id=first.info.run_id) as resumed:
        mlflow.log_metric("test_accuracy", 0.8)
    assert resumed.info.run_id == first.info.run_id
    metrics = MlflowClient().get_run(first.info.run_id).data.metrics
    assert metrics == {"best_val_accuracy": 0.9, "test_accuracy": 0.8}
    with job_run("cnn", resume_run_id="0" * 32) as replacement:
        pass
    assert replacement.info.run_id != first.info.run_id
    assert read_run_reference("/nonexistent/run.json") is None


def test_a_failed_invocation_marks_its_parent_run_and_secrets_stay_out(mlflow_uri):
    config = {"experiment": "web", "classes": {"a": {"sources": [{"engine": "flickr", "api_key": "s3cret"}]}}}
    parent_id = start_invocation(None, "web", config)
    end_invocation(success=False)
    client = MlflowClient()
    assert client.get_run(parent_id).info.status == "FAILED"
    logged = client.download_artifacts(parent_id, "config.resolved.yaml")
    text = open(logged).read()
    assert "s3cret" not in text and "<redacted>" in text
    assert config["classes"]["a"]["sources"][0]["api_key"] == "s3cret"  # the config itself is untouched

import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
from typing import Iterator

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from imgpipe.tracking.invocation import end_invocation, start_invocation
from imgpipe.tracking.owners import mark_abandoned_runs, owner_tags, process_is_running, process_start_time
from imgpipe.tracking.provenance import VERSION, config_hash, write_provenance
from imgpipe.tracking.runs import job_run, log_split_dataset, read_run_reference, write_run_reference
from imgpipe.tracking.tags import INVOCATION_TAGS_ENV, PARENT_RUN_ENV, flatten


@pytest.fixture(autouse=True)
def no_invocation_tags():
    """start_invocation exports its tags for the jobs it starts, not for the next test's runs."""
    os.environ.pop(INVOCATION_TAGS_ENV, None)
    yield
    os.environ.pop(INVOCATION_TAGS_ENV, None)


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
    with pytest.raises(ValueError, match="nonexistent/run.json.*forcerun train"):
        read_run_reference("/nonexistent/run.json")


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


# ---- runs left RUNNING by killed processes -------------------------------------------------

# A pipeline process: opens the invocation's run and a job's run, reports both ids, then
# works until it is killed.
KILLED_PIPELINE = """
import os, time
from imgpipe.tracking.invocation import start_invocation
from imgpipe.tracking.tags import PARENT_RUN_ENV
from imgpipe.tracking.runs import job_run
start_invocation(None, "pets", {"experiment": "pets"})
with job_run("train cnn", tags={"imgpipe.stage": "model"}) as run:
    print(os.environ[PARENT_RUN_ENV], run.info.run_id, flush=True)
    time.sleep(600)
"""


def read_line_within(process: subprocess.Popen, seconds: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    return process.stdout.readline() if ready else ""


@pytest.fixture
def ended_process() -> tuple[int, str]:
    """(pid, start time) of a process that has been killed with SIGKILL and reaped."""
    process = subprocess.Popen(["sleep", "600"])
    started = process_start_time(process.pid)
    process.kill()
    process.wait()
    return process.pid, started


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


def create_owned_run(client: MlflowClient, experiment_id: str, name: str, owner: dict) -> str:
    return client.create_run(experiment_id, run_name=name, tags=owner).info.run_id


def test_a_killed_pipeline_leaves_runs_the_next_invocation_marks_killed(mlflow_uri, caplog):
    pipeline = subprocess.Popen([sys.executable, "-c", KILLED_PIPELINE], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        line = read_line_within(pipeline, 120)
        assert line, pipeline.stderr.read() if pipeline.poll() is not None else "no run ids within 120 s"
        killed_parent_id, killed_job_id = line.split()
    finally:
        pipeline.kill()  # SIGKILL: nothing in it gets to close its runs
        pipeline.wait()
    client = MlflowClient()
    assert client.get_run(killed_parent_id).info.status == "RUNNING"
    assert client.get_run(killed_job_id).info.status == "RUNNING"
    assert client.get_run(killed_job_id).data.tags["imgpipe.pid"] == str(pipeline.pid)

    with caplog.at_level(logging.INFO, logger="imgpipe.tracking"):
        new_parent_id = start_invocation(None, "pets", {"experiment": "pets"})

    for run_id in (killed_parent_id, killed_job_id):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.info.end_time is not None
        assert f"process {pipeline.pid} " in run.data.tags["imgpipe.abandoned"]
    assert "'train cnn'" in caplog.text and "'snakemake pets'" in caplog.text
    assert "marked 2 run(s)" in caplog.text
    new_parent = client.get_run(new_parent_id)
    assert new_parent.info.status == "RUNNING"
    assert new_parent.data.tags["imgpipe.pid"] == str(os.getpid())
    assert new_parent.data.tags["imgpipe.pid_started"] == process_start_time(os.getpid())
    assert "imgpipe.abandoned" not in new_parent.data.tags
    end_invocation(success=True)
    assert client.get_run(new_parent_id).info.status == "FINISHED"


def test_only_runs_of_ended_owners_on_this_host_are_marked(mlflow_uri, ended_process, live_process):
    client = MlflowClient()
    experiment_id = client.create_experiment("pets")
    ended_pid, ended_started = ended_process
    ended = create_owned_run(client, experiment_id, "ended owner", owner_tags(ended_pid) | {
        "imgpipe.pid_started": ended_started})
    ended_without_start_time = create_owned_run(  # as recorded where there is no /proc
        client, experiment_id, "ended owner, no start time", owner_tags(ended_pid) | {"imgpipe.pid_started": ""})
    left_alone = {
        "this process": create_owned_run(client, experiment_id, "this process", owner_tags()),
        "live child": create_owned_run(client, experiment_id, "live child", owner_tags(live_process.pid)),
        "live, no start time": create_owned_run(client, experiment_id, "live, no start time",
                                                owner_tags() | {"imgpipe.pid_started": ""}),
        "other host": create_owned_run(client, experiment_id, "other host",
                                       owner_tags(ended_pid) | {"imgpipe.host": "node-17.cluster"}),
        "not ours": client.create_run(experiment_id, run_name="not ours").info.run_id,
        "garbled pid": create_owned_run(client, experiment_id, "garbled pid",
                                        owner_tags() | {"imgpipe.pid": "n/a"}),
    }
    finished = create_owned_run(client, experiment_id, "finished", owner_tags(ended_pid))
    client.set_terminated(finished, "FINISHED")
    with job_run("in this process") as own_job:
        marked = mark_abandoned_runs(client, experiment_id)
    assert sorted(marked) == sorted([ended, ended_without_start_time])
    for run_id in marked:
        assert client.get_run(run_id).info.status == "KILLED"
    for name, run_id in left_alone.items():
        run = client.get_run(run_id)
        assert (run.info.status, "imgpipe.abandoned" in run.data.tags) == ("RUNNING", False), name
    assert client.get_run(finished).info.status == "FINISHED"
    assert client.get_run(own_job.info.run_id).info.status == "FINISHED"
    assert mark_abandoned_runs(client, experiment_id) == []  # nothing twice


def test_a_failed_model_job_leaves_its_error_on_its_run(mlflow_uri):
    with pytest.raises(ValueError):
        with job_run("cnn", tags={"imgpipe.stage": "model"}) as run:
            raise ValueError("no space for the checkpoint")
    run = MlflowClient().get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["imgpipe.error"] == "ValueError: no space for the checkpoint"


def test_a_failed_invocation_marks_failed_the_runs_its_failed_jobs_left_open(mlflow_uri, ended_process):
    # A train job on a full disk cannot close its run (the store is on that disk too); Snakemake
    # saw the job fail, so its invocation, ending, closes the run FAILED, not the next one KILLED.
    parent_id = start_invocation(None, "pets", {"experiment": "pets"})
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    ended_pid, ended_started = ended_process
    owner = owner_tags(ended_pid) | {"imgpipe.pid_started": ended_started}
    this_invocation = create_owned_run(client, experiment_id, "cnn", owner | {"imgpipe.invocation": parent_id})
    resumed_by_it = create_owned_run(client, experiment_id, "resnet", owner | {
        "imgpipe.invocation": "an earlier one", "imgpipe.last_invocation": parent_id})
    another_invocation = create_owned_run(client, experiment_id, "vit", owner | {"imgpipe.invocation": "another"})
    end_invocation(success=False)
    assert client.get_run(parent_id).info.status == "FAILED"
    for run_id in (this_invocation, resumed_by_it):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["imgpipe.abandoned"].startswith(f"process {ended_pid} ")
    assert client.get_run(another_invocation).info.status == "RUNNING"  # the next invocation marks it KILLED


def test_a_reused_pid_is_not_mistaken_for_the_owner(mlflow_uri):
    client = MlflowClient()
    experiment_id = client.create_experiment("pets")
    # The owner had this process's pid but started at another time: another process, ended.
    earlier_owner = owner_tags() | {"imgpipe.pid_started": str(int(process_start_time(os.getpid())) - 1)}
    run_id = create_owned_run(client, experiment_id, "earlier owner", earlier_owner)
    assert mark_abandoned_runs(client, experiment_id) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_run_marked_killed_can_be_resumed_by_a_later_process(mlflow_uri, ended_process, monkeypatch):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    client = MlflowClient()
    experiment_id = client.create_experiment("pets")
    ended_pid, ended_started = ended_process
    run_id = create_owned_run(client, experiment_id, "cnn", owner_tags(ended_pid) | {
        "imgpipe.pid_started": ended_started})
    client.log_metric(run_id, "best_val_accuracy", 0.9)
    assert mark_abandoned_runs(client, experiment_id) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"

    with job_run("cnn", resume_run_id=run_id) as resumed:
        assert client.get_run(run_id).info.status == "RUNNING"
        assert mark_abandoned_runs(client, experiment_id) == []  # now owned by this live process
        mlflow.log_metric("test_accuracy", 0.8)
    assert resumed.info.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"best_val_accuracy": 0.9, "test_accuracy": 0.8}
    assert run.data.tags["imgpipe.pid"] == str(os.getpid())
    assert run.data.tags["imgpipe.pid_started"] == process_start_time(os.getpid())
    assert "imgpipe.abandoned" not in run.data.tags


def test_process_start_time_reads_past_a_command_name_with_spaces_and_parentheses(tmp_path, live_process):
    odd_name = tmp_path / "a) b (c"
    odd_name.symlink_to(shutil.which("sleep"))
    process = subprocess.Popen([str(odd_name), "600"])
    try:
        # Started after this test's sleep: a later start time in ticks, and it is alive.
        assert int(process_start_time(process.pid)) >= int(process_start_time(live_process.pid))
        assert process_is_running(process.pid, process_start_time(process.pid))
    finally:
        process.kill()
        process.wait()
    assert not process_is_running(process.pid, "")


def test_a_zombie_owner_counts_as_ended():
    process = subprocess.Popen(["sleep", "600"])
    started = process_start_time(process.pid)
    try:
        assert process_is_running(process.pid, started)
        process.send_signal(9)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped: a zombie
        assert not process_is_running(process.pid, started)
    finally:
        process.kill()
        process.wait()


# ---- what `mlflow ui` shows: model rows, data runs under the invocation, provenance -----------

def make_git_checkout(folder, dirty: bool) -> str:
    """A git checkout at `folder` with one commit (and, if `dirty`, an uncommitted change); its sha."""
    folder.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(folder), "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    (folder / "Snakefile").write_text("rule all:\n")
    subprocess.run([*git, "add", "Snakefile"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workflow"], check=True)
    if dirty:
        (folder / "Snakefile").write_text("rule all:\n    input: []\n")
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def write_split_manifest(path) -> None:
    path.write_text("path,label,split\nimages/cat/a.png,cat,train\nimages/dog/b.png,dog,val\n"
                    "images/cat/c.png,cat,test\n")


def test_model_runs_are_top_level_rows_and_data_runs_sit_under_the_invocation(mlflow_uri, tmp_path):
    config = {"experiment": "pets", "models": {"cnn": {"lr": 0.1}}}
    commit = make_git_checkout(tmp_path / "workflow", dirty=True)
    parent_id = start_invocation(None, "pets", config, workflow_folder=tmp_path / "workflow")
    manifest = tmp_path / "manifest.csv"
    write_split_manifest(manifest)
    with job_run("crawl cat", tags={"imgpipe.stage": "crawl", "imgpipe.class": "cat"}):
        mlflow.log_metrics({"images_ok": 12, "images_failed": 1})
    with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"}) as train:
        log_split_dataset(manifest, "training")
        mlflow.log_metric("best_val_accuracy", 0.9)
    with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"},
                 resume_run_id=train.info.run_id) as evaluate:
        log_split_dataset(manifest, "evaluation")
        mlflow.log_metric("test_accuracy", 0.8)
    end_invocation(success=True)

    client = MlflowClient()
    assert evaluate.info.run_id == train.info.run_id
    model = client.get_run(train.info.run_id)
    assert model.info.run_name == "cnn" and model.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in model.data.tags
    assert model.data.metrics == {"best_val_accuracy": 0.9, "test_accuracy": 0.8}
    provenance = {"imgpipe.experiment": "pets", "imgpipe.config_hash": config_hash(config),
                  "imgpipe.version": VERSION, "mlflow.source.git.commit": commit, "imgpipe.git_dirty": "true"}
    assert model.data.tags.items() >= {
        "imgpipe.invocation": parent_id, "imgpipe.model": "cnn", "imgpipe.stage": "model",
        "mlflow.source.name": "imgpipe model cnn", "mlflow.source.type": "LOCAL", **provenance}.items()
    # MLflow's own git tags would describe the folder of the running script (here pytest's), not the workflow.
    assert not {"mlflow.source.git.branch", "mlflow.source.git.repoURL"} & set(model.data.tags)

    crawl = next(run for run in client.search_runs([model.info.experiment_id]) if run.info.run_name == "crawl cat")
    assert crawl.data.tags.items() >= {"mlflow.parentRunId": parent_id, "imgpipe.invocation": parent_id,
                                       "mlflow.source.name": "imgpipe crawl cat", **provenance}.items()
    invocation = client.get_run(parent_id)
    assert invocation.data.tags.items() >= {"mlflow.source.name": "imgpipe snakemake pets", **provenance}.items()
    # The data job's counts are on the invocation's run as params: as metrics they would add charts above
    # the models'.
    assert invocation.data.metrics == {}
    assert crawl.data.metrics == {"images_ok": 12, "images_failed": 1}
    assert {k: v for k, v in invocation.data.params.items() if k.startswith("crawl/")} == {
        "crawl/cat/images_ok": "12", "crawl/cat/images_failed": "1"}

    (dataset_input,) = model.inputs.dataset_inputs  # the evaluate job's logging of the same split adds nothing
    dataset = dataset_input.dataset
    assert dataset.name == "pets split"
    assert dataset.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    assert str(manifest) in dataset.source
    assert json.loads(dataset.profile)["num_rows"] == 3
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"


def test_a_changed_split_is_a_new_dataset_version(mlflow_uri, tmp_path):
    manifest = tmp_path / "manifest.csv"
    write_split_manifest(manifest)
    with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"}) as first:
        log_split_dataset(manifest, "training")
    manifest.write_text(manifest.read_text().replace("cat,test", "cat,val"))
    with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"}) as second:
        log_split_dataset(manifest, "training", name="pets split")
    client = MlflowClient()
    (before,) = client.get_run(first.info.run_id).inputs.dataset_inputs
    (after,) = client.get_run(second.info.run_id).inputs.dataset_inputs
    assert before.dataset.name == "split"  # a run outside an invocation has no experiment tag
    assert after.dataset.name == "pets split"
    assert before.dataset.digest != after.dataset.digest


def test_a_split_manifest_without_its_columns_is_refused(mlflow_uri, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\na.png,cat\n")
    with pytest.raises(ValueError, match="manifest.csv lacks columns split"):
        with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"}):
            log_split_dataset(manifest, "training")


def test_outside_a_git_checkout_runs_carry_no_commit(mlflow_uri, tmp_path, caplog):
    # The test runs from a git checkout (pytest's own files are in one): that commit must not leak in.
    (tmp_path / "workflow").mkdir()
    with caplog.at_level(logging.INFO, logger="imgpipe.tracking"):
        parent_id = start_invocation(None, "pets", {"experiment": "pets"}, workflow_folder=tmp_path / "workflow")
    assert "is not in a git checkout" in caplog.text
    with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"}) as run:
        pass
    end_invocation(success=True)
    client = MlflowClient()
    for run_id in (parent_id, run.info.run_id):
        tags = client.get_run(run_id).data.tags
        assert not [key for key in tags if key.startswith("mlflow.source.git")], run_id
        assert "imgpipe.git_dirty" not in tags and tags["imgpipe.config_hash"]
    assert client.get_run(run.info.run_id).data.tags["imgpipe.invocation"] == parent_id


def test_provenance_is_written_and_logged_on_the_invocation(mlflow_uri, tmp_path):
    config = {"experiment": "pets", "classes": {"cat": {"sources": [{"engine": "flickr", "api_key": "s3cret"}]}}}
    workflow = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
    folder = write_provenance(tmp_path / "results" / "provenance", config, workflow)
    parent_id = start_invocation(None, "pets", config, workflow_folder=workflow, provenance_folder=folder)
    end_invocation(success=True)

    environment = json.loads((folder / "environment.json").read_text())
    assert environment["imgpipe_version"] == VERSION and environment["config_hash"] == config_hash(config)
    commit = subprocess.run(["git", "-C", workflow, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert environment["git"]["commit"] == commit.strip()
    packages = (folder / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("mlflow==") for line in packages) and any(line.startswith("torch==") for line in packages)
    resolved = (folder / "config.resolved.yaml").read_text()
    assert "s3cret" not in resolved and "<redacted>" in resolved
    logged = [a.path for a in MlflowClient().list_artifacts(parent_id, "provenance")]
    assert logged == ["provenance/config.resolved.yaml", "provenance/environment.json", "provenance/requirements.txt"]


LOG_DATASET_AT = """
import sys, time
from imgpipe.tracking.runs import job_run, log_split_dataset
manifest, start_at, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with job_run(name, tags={"imgpipe.stage": "model", "imgpipe.model": name}):
    time.sleep(max(0.0, start_at - time.time()))  # every process logs at the same moment
    log_split_dataset(manifest, context="training")
"""


def test_models_logging_the_same_new_split_at_once_all_get_it(mlflow_uri, tmp_path):
    """Models train side by side, so their jobs log the same new split together: none may fail."""
    import time

    start_invocation(None, "pets", {"experiment": "pets"})
    names = []
    for round_ in range(4):
        manifest = tmp_path / f"manifest{round_}.csv"  # a new digest each round: a new dataset row to insert
        manifest.write_text(f"path,label,split\na{round_}.png,cat,train\nb.png,dog,test\n")
        start_at = time.time() + 6.0  # after the imports of every process
        jobs = [subprocess.Popen([sys.executable, "-c", LOG_DATASET_AT, str(manifest), str(start_at),
                                  f"m{round_}_{i}"], env=os.environ.copy(), stderr=subprocess.PIPE, text=True)
                for i in range(3)]
        for job in jobs:
            _, stderr = job.communicate(timeout=120)
            assert job.returncode == 0, stderr[-3000:]
        names += [f"m{round_}_{i}" for i in range(3)]
    client = MlflowClient()
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name("pets").experiment_id])}
    for name in names:
        assert [d.dataset.name for d in runs[name].inputs.dataset_inputs] == ["pets split"], name


def test_a_failed_data_job_records_no_counts_on_the_invocation(mlflow_uri):
    parent_id = start_invocation(None, "pets", {"experiment": "pets"})
    with pytest.raises(OSError):
        with job_run("split", tags={"imgpipe.stage": "split"}) as split:
            mlflow.log_metric("n_test", 3)
            raise OSError("disk full")
    client = MlflowClient()
    assert client.get_run(split.info.run_id).info.status == "FAILED"
    assert not [key for key in client.get_run(parent_id).data.params if key.startswith("split/")]

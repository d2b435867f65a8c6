"""The real `snakemake` executable on tiny experiments in a temporary folder.

Each run uses the default MLflow store of its working directory (sqlite:///mlflow.db,
what a plain `mlflow ui` there shows), and the tests query that store.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import REPO, write_shape_images
from crawl_server import LocalServer, Response, truncated_jpeg
from mlflow.tracking import MlflowClient
from PIL import Image

pytestmark = pytest.mark.e2e
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["IMGPIPE_OFFLINE"] = "1"
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=1", *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Rule -> job count of a dry run (the 'Job stats' table)."""
    output = snakemake(workdir, "-n").stdout
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)
            if rule != "total"}


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture
def workdir(tmp_path, mlflow_template_db):
    shutil.copy(mlflow_template_db, tmp_path / "mlflow.db")
    return tmp_path


def store(workdir: Path) -> MlflowClient:
    mlflow.set_tracking_uri(None)
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def runs_by_name(client: MlflowClient, experiment: str) -> dict:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return {run.info.run_name: run for run in client.search_runs([experiment_id])}


@pytest.fixture
def folder_project(workdir):
    data = workdir / "data"
    write_shape_images(data / "bright", "bright", 30, seed=1)
    write_shape_images(data / "dark", "dark", 30, seed=2)
    (data / "bright" / "nested").mkdir()
    shutil.copy(data / "bright" / "bright_000.png", data / "bright" / "nested" / "copy.png")  # exact duplicate
    shutil.copy(data / "dark" / "dark_000.png", data / "bright" / "nested" / "stray.png")  # in two classes
    (data / "bright" / "notes.txt").write_text("not an image")
    (data / "dark" / "broken.png").write_bytes((data / "dark" / "dark_001.png").read_bytes()[:60])
    write_config(workdir, {
        "experiment": "shapes",
        "classes": {"bright": {"sources": [{"folder": "data/bright"}]},
                    "dark": {"sources": [{"folder": "data/dark"}]}},
        "images": {"size": 32, "color": "grayscale", "resize": "pad"},
        "dedupe": {"near_distance": 0},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3},
        "models": {
            "cnn": {"arch": "simple_cnn", "epochs": 3, "lr": 0.01, "batch_size": 16},
            "resnet": {"arch": "resnet18", "epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.01},
        },
    })
    return workdir


def test_folder_experiment_end_to_end(folder_project):
    workdir = folder_project
    snakemake(workdir)
    results = workdir / "results" / "shapes"

    fates = pd.read_csv(results / "dedupe" / "manifest.csv", keep_default_na=False)
    reasons = fates.set_index(fates["file"].map(lambda f: Path(f).name))["reason"]
    assert set(fates["reason"]) >= {"corrupt", "exact_duplicate", "cross_class_exact"}
    assert (fates["reason"] == "cross_class_exact").sum() == 2  # dropped from both classes
    assert (fates["reason"] == "corrupt").sum() == 2  # notes.txt and broken.png, recorded with a reason
    crawl = pd.concat(pd.read_csv(results / "raw" / f"{c}.csv", keep_default_na=False) for c in ("bright", "dark"))
    assert crawl.loc[crawl["status"] == "corrupt", "reason"].str.len().min() > 0
    assert len(reasons) == len(crawl)

    split = pd.read_csv(results / "split" / "manifest.csv")
    assert list(split.columns) == ["path", "label", "split"]
    n_kept = (fates["status"] == "kept").sum()
    assert len(split) == n_kept and set(split["split"]) == {"train", "val", "test"}
    with Image.open(workdir / split.loc[0, "path"]) as image:
        assert image.size == (32, 32) and image.mode == "L"

    for model in ("cnn", "resnet"):
        metrics = json.loads((results / "eval" / model / "metrics.json").read_text())
        assert {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "n_test", "per_class"} <= set(metrics)
        assert metrics["n_test"] == (split["split"] == "test").sum()
        assert (results / "models" / model / "model.pt").stat().st_size > 0
        assert (results / "eval" / model / "roc.png").stat().st_size > 1000
    report = (results / "report" / "report.md").read_text()
    assert "cnn" in report and "resnet" in report and "Best model" in report
    assert "data:image/png;base64" in (results / "report" / "report.html").read_text()
    for log in ("crawl/bright.log", "dedupe.log", "split.log", "train/cnn.log", "evaluate/resnet.log", "report.log"):
        assert (workdir / "logs" / "shapes" / log).stat().st_size > 0

    # MLflow: the default store of the working directory holds one parent run with every job.
    client = store(workdir)
    runs = runs_by_name(client, "shapes")
    parent = runs["snakemake shapes"]
    assert parent.info.status == "FINISHED"
    # what the invocation ran with: in the results folder and on its run
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert json.loads((results / "provenance" / "environment.json").read_text())["git"]["commit"] == head.strip()
    assert "bright" in yaml.safe_load((results / "provenance" / "config.resolved.yaml").read_text())["classes"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "provenance")} == {
        "provenance/config.resolved.yaml", "provenance/environment.json", "provenance/requirements.txt"}
    expected = {"crawl bright", "crawl dark", "dedupe", "preprocess bright", "preprocess dark", "split", "cnn",
                "resnet", "report"}
    assert expected <= set(runs)
    models = {"cnn", "resnet"}
    # Data jobs nest under the invocation; each model is a top-level row that points to it.
    assert all(runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id for name in expected - models)
    assert all("mlflow.parentRunId" not in runs[name].data.tags and
               runs[name].data.tags["imgpipe.invocation"] == parent.info.run_id for name in models)
    assert runs["dedupe"].data.metrics["dropped_cross_class_exact"] == 2
    assert runs["split"].data.metrics["n_test"] == (split["split"] == "test").sum()
    cnn = runs["cnn"]
    assert cnn.data.params["lr"] == "0.01" and cnn.data.params["arch"] == "simple_cnn"
    assert len(client.get_metric_history(cnn.info.run_id, "val_accuracy")) == 3
    assert cnn.data.metrics["test/accuracy"] == pytest.approx(
        json.loads((results / "eval" / "cnn" / "metrics.json").read_text())["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(cnn.info.run_id)}
    assert {"model.pt", "history.csv", "evaluation"} <= artifacts
    assert {a.path for a in client.list_artifacts(cnn.info.run_id, "evaluation")} >= {
        "evaluation/metrics.json", "evaluation/roc.png", "evaluation/confusion_matrix.png"}
    logged_models = client.search_logged_models([cnn.info.experiment_id])
    assert {model.source_run_id for model in logged_models} >= {cnn.info.run_id, runs["resnet"].info.run_id}

    # Snakemake's own report of the report()-marked outputs.
    snakemake(workdir, "--report", str(workdir / "snakemake-report.html"))
    assert "learning_curves.png" in (workdir / "snakemake-report.html").read_text()

    # Reruns: nothing to do; one model's setting reruns that model only; image size reruns preprocessing on.
    assert planned_jobs(workdir) == {}
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["models"]["cnn"]["lr"] = 0.02
    write_config(workdir, config)
    assert planned_jobs(workdir) == {"train": 1, "evaluate": 1, "report": 1, "all": 1}
    dry_run = snakemake(workdir, "-n").stdout
    assert "wildcards: model=cnn" in dry_run and "model=resnet" not in dry_run
    config["images"]["size"] = 36
    write_config(workdir, config)
    assert planned_jobs(workdir) == {"preprocess": 2, "split": 1, "train": 2, "evaluate": 2, "report": 1, "all": 1}

    # Back to the settings that ran: nothing to do. A touched image (same content) reruns nothing;
    # a folder that gains a file reruns that class's crawl.
    config["images"]["size"] = 32
    config["models"]["cnn"]["lr"] = 0.01
    write_config(workdir, config)
    assert planned_jobs(workdir) == {}
    os.utime(workdir / "data" / "dark" / "dark_002.png", (time.time() + 60, time.time() + 60))
    assert planned_jobs(workdir) == {}

    # The contact sheets are linked from the report.
    assert '<a href="../review/bright.html">bright</a>' in (results / "report" / "report.html").read_text()
    assert "bright: " in (results / "review" / "bright.html").read_text()

    # An exclusion list: a new entry reruns dedupe and what follows, not the crawl; a comment
    # edit only redraws the contact sheets (and the report that links them); a touch nothing.
    kept_file = fates.loc[fates["status"] == "kept", "file"].iloc[0]
    (workdir / "exclude.txt").write_text(f"{kept_file}  # blurry\n")
    config["dedupe"]["exclude"] = "exclude.txt"
    write_config(workdir, config)
    planned = planned_jobs(workdir)
    assert "crawl" not in planned and planned["dedupe"] == 1 and planned["train"] == 2
    snakemake(workdir)
    fates = pd.read_csv(results / "dedupe" / "manifest.csv", keep_default_na=False)
    excluded = fates[fates["file"] == kept_file]  # with any copy of the same bytes
    assert (excluded["reason"] == "excluded").all()
    assert (excluded["detail"] == f"excluded by hand: {kept_file}").all()
    sheet = (results / "review" / f"{excluded['class'].iloc[0]}.html").read_text()
    assert "excluded by hand: blurry" in sheet
    (workdir / "exclude.txt").write_text(f"{kept_file}  # blurry, and not a disc at all\n")
    assert planned_jobs(workdir) == {"review": 1, "report": 1, "all": 1}
    os.utime(workdir / "exclude.txt", (time.time() + 60, time.time() + 60))
    assert planned_jobs(workdir) == {"review": 1, "report": 1, "all": 1}

    write_shape_images(workdir / "data" / "dark" / "more", "dark", 1, seed=9)
    assert planned_jobs(workdir)["crawl"] == 1


def test_urls_experiment_downloads_through_icrawler(workdir):
    routes, lists = {}, {}
    for kind in ("bright", "dark"):
        paths = write_shape_images(workdir / "served" / kind, kind, 12, seed=5)
        lines = []
        for path in paths:
            routes[f"/{kind}/{path.name}"] = Response(path.read_bytes(), "image/png")
            lines.append(f"/{kind}/{path.name}")
        lists[kind] = lines
    routes["/bright/truncated.jpg"] = Response(truncated_jpeg())
    # a near duplicate: the first bright image, downscaled and re-encoded as JPEG
    variant = io.BytesIO()
    with Image.open(workdir / "served" / "bright" / "bright_000.png") as image:
        image.resize((36, 36)).save(variant, "JPEG", quality=70)
    routes["/bright/variant.jpg"] = Response(variant.getvalue())
    with LocalServer(routes) as server:
        for kind, lines in lists.items():
            extra = ["/bright/variant.jpg", "/bright/truncated.jpg", "/gone.jpg"] if kind == "bright" else []
            (workdir / f"{kind}.txt").write_text(
                "# served by the test\n" + "\n".join(server.url(line) for line in lines + extra) + "\n")
        write_config(workdir, {
            "experiment": "web",
            "classes": {"bright": {"sources": [{"urls": "bright.txt"}]},
                        "dark": {"sources": [{"urls": "dark.txt"}]}},
            "images": {"size": 32},
            "crawl": {"allow_private_hosts": ["127.0.0.1"]},  # the test's server
            "dedupe": {"near_distance": 10, "near_action": "group"},
            "models": {"cnn": {"arch": "simple_cnn", "epochs": 1}},
        })
        snakemake(workdir)
        assert any(request.startswith("/dark/") for request in server.requests)

    raw = pd.read_csv(workdir / "results/web/raw/bright.csv", keep_default_na=False)
    status = raw.set_index("origin")["status"]
    assert status[server.url("/bright/truncated.jpg")] == "corrupt"
    assert status[server.url("/gone.jpg")] == "failed"
    assert (raw["status"] == "ok").sum() == 13
    assert raw.loc[raw["status"] == "failed", "reason"].str.contains("404").all()

    # near duplicates were kept as a group, and every group sits inside one split
    fates = pd.read_csv(workdir / "results/web/dedupe/manifest.csv", keep_default_na=False)
    variant_row = fates[fates["file"] == raw.set_index("origin").loc[server.url("/bright/variant.jpg"), "file"]]
    assert variant_row["status"].item() == "kept"
    assert variant_row["group"].item() == raw.set_index("origin").loc[server.url("/bright/bright_000.png"), "file"]
    images = pd.concat(pd.read_csv(workdir / f"results/web/images/{kind}.csv") for kind in ("bright", "dark"))
    placed = pd.read_csv(workdir / "results/web/split/manifest.csv").merge(images, on="path")
    assert placed.groupby("group")["split"].nunique().max() == 1
    assert placed.groupby("group").size().max() >= 2
    assert json.loads((workdir / "results/web/eval/cnn/metrics.json").read_text())["n_test"] > 0

    runs = runs_by_name(store(workdir), "web")
    crawl_metrics = runs["crawl bright"].data.metrics
    assert {key: crawl_metrics[key] for key in ("images_ok", "images_corrupt", "images_failed", "images_rejected",
                                                "images_new_unique")} == {
        "images_ok": 13, "images_corrupt": 1, "images_failed": 1, "images_rejected": 0, "images_new_unique": 13}
    assert runs["crawl bright"].data.tags["imgpipe.crawl_outcome"] == "13 new images (no target)"
    summary = json.loads((workdir / "results/web/raw/bright.json").read_text())
    assert summary["statuses"]["ok"] == 13 and summary["queries"][0]["urls_seen"] == 15
    assert runs["snakemake web"].info.status == "FINISHED"

    # Reruns follow content, not clocks: a touched URL list reruns nothing, an edited one its class.
    assert planned_jobs(workdir) == {}
    os.utime(workdir / "bright.txt", (time.time() + 60, time.time() + 60))
    assert planned_jobs(workdir) == {}
    with open(workdir / "bright.txt", "a") as handle:
        handle.write("# a comment, but the file changed\n")
    assert planned_jobs(workdir)["crawl"] == 1


def test_config_mistakes_stop_before_any_job(workdir):
    write_config(workdir, {
        "experiment": "bad",
        "classes": {"a": {"sources": [{"folder": "nowhere"}]}, "b": {"sources": [{"digits": 1}]}},
        "models": {"cnn": {"arch": "simple_cnn"}},
    })
    result = snakemake(workdir, check=False)
    assert result.returncode != 0
    assert "classes.a.sources[0].folder" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_one_failing_model_does_not_take_the_others_down(workdir):
    write_shape_images(workdir / "data" / "bright", "bright", 12, seed=1)
    write_shape_images(workdir / "data" / "dark", "dark", 12, seed=2)
    (workdir / "junk.pt").write_bytes(b"this is not a checkpoint")
    write_config(workdir, {
        "experiment": "partial",
        "classes": {"bright": {"sources": [{"folder": "data/bright"}]},
                    "dark": {"sources": [{"folder": "data/dark"}]}},
        "images": {"size": 32},
        "dedupe": {"near_distance": 0},
        "models": {"cnn": {"arch": "simple_cnn", "epochs": 1},
                   "broken": {"arch": "simple_cnn", "epochs": 1, "weights": "junk.pt"},
                   "diverging": {"arch": "simple_cnn", "epochs": 3, "optimizer": "sgd", "lr": 1e12}},
    })
    result = snakemake(workdir, check=False)
    assert result.returncode != 0
    assert "junk.pt' is not a PyTorch checkpoint" in (workdir / "logs/partial/train/broken.log").read_text()
    assert re.search(r"diverging: the loss became (nan|inf) at epoch \d; training stopped. Lower "
                     r"models.diverging.lr", (workdir / "logs/partial/train/diverging.log").read_text())
    assert json.loads((workdir / "results/partial/eval/cnn/metrics.json").read_text())["n_test"] > 0
    # The report is still written: the good model compared, the failed ones listed with their logs' ends.
    report = (workdir / "results/partial/report/report.md").read_text()
    failed = report.split("## Failed models", 1)[1].split("\n## ", 1)[0]
    assert "- broken: training did not finish (no model.pt)" in failed
    assert "junk.pt' is not a PyTorch checkpoint" in failed and "the loss became" in failed
    summary = json.loads((workdir / "results/partial/report/summary.json").read_text())
    assert summary["ranking"] == ["cnn"] and set(summary["failed_models"]) == {"broken", "diverging"}
    assert f"Verdict: {summary['verdict']}" in result.stderr
    assert "2 model(s) failed: broken, diverging" in summary["verdict"]

    runs = runs_by_name(store(workdir), "partial")
    assert runs["broken"].info.status == runs["diverging"].info.status == "FAILED"
    assert runs["cnn"].info.status == "FINISHED" and "test/accuracy" in runs["cnn"].data.metrics
    assert runs["snakemake partial"].info.status == "FAILED"


def test_a_crawl_killed_with_its_snakemake_resumes_without_downloading_twice(workdir):
    """kill -9 of the whole process group mid-crawl: Snakemake deletes the crawl's outputs as
    incomplete, but the crawl store is not an output, so the rerun requests no image again."""
    from crawl_server import distinct_jpeg

    bodies = {f"/{kind}/{number}.jpg": distinct_jpeg(number + 100 * (kind == "b")) for kind in ("a", "b")
              for number in range(6)}
    routes = {path: Response(body) for path, body in bodies.items()}
    routes["/a/4.jpg"] = Response(bodies["/a/4.jpg"], drip_s=0.5)  # killed while this one drips
    with LocalServer(routes) as server:
        for kind in ("a", "b"):
            (workdir / f"{kind}.txt").write_text(
                "\n".join(server.url(path) for path in bodies if path.startswith(f"/{kind}/")) + "\n")
        write_config(workdir, {
            "experiment": "killed",
            "classes": {kind: {"sources": [{"urls": f"{kind}.txt", "threads": 1}]} for kind in ("a", "b")},
            "crawl": {"allow_private_hosts": ["127.0.0.1"]},  # the test's server
            "models": {"cnn": {"arch": "simple_cnn", "epochs": 1}},
        })
        command = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
                   str(workdir / "config.yaml"), "--cores", "1", "results/killed/raw/a.csv"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        process = subprocess.Popen(command, cwd=workdir, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while "/a/4.jpg" not in server.requests:
            assert process.poll() is None and time.monotonic() < deadline, "the crawl never reached /a/4.jpg"
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert "/a/4.jpg" not in server.served and not (workdir / "results/killed/raw/a.csv").exists()

        server.routes["/a/4.jpg"] = Response(bodies["/a/4.jpg"])
        snakemake(workdir, "--unlock")
        # (a flag first: targets right after --resources would be read as resources)
        snakemake(workdir, "--keep-going", "results/killed/raw/a.csv", "results/killed/raw/b.csv")

    assert sorted(server.served) == sorted(bodies), "every image served exactly once, across both runs"
    raw = pd.read_csv(workdir / "results/killed/raw/a.csv", keep_default_na=False)
    assert (raw["status"] == "ok").all() and len(raw) == 6
    assert [Path(file).name for file in raw["file"]] == [sha[:16] + ".jpg" for sha in raw["sha256"]]
    store = workdir / "results/killed/crawl-store/a/files"
    assert sorted(path.name for path in store.iterdir()) == [f"{n:06d}.jpg" for n in range(6)]

"""A disk that fills up or turns read-only fails the job that writes to it, never an input.

The disks are real: a small tmpfs mounted for the test (conftest.SmallDisk), filled to the
last byte or remounted read-only, so every error here is the one the kernel gives.
"""

from __future__ import annotations

import errno
import logging
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import model_settings, write_shape_images
from crawl_server import LocalServer, Response, distinct_jpeg
from mlflow.tracking import MlflowClient
from test_review import raw_rows

from imgpipe.core.files import OutputWriteError, write_failure, writing
from imgpipe.data.crawl import crawl_class
from imgpipe.data.crawlstore import JOURNAL, ClassStore, CrawlLimits
from imgpipe.data.dedupe import decide_fates
from imgpipe.data.preprocess import preprocess_class
from imgpipe.data.review import write_contact_sheet
from imgpipe.evaluation.evaluate import write_evaluation_outputs
from imgpipe.evaluation.plots import plot_unavailable
from imgpipe.models.checkpoints import save_atomically
from imgpipe.serving.predict import Predictions, write_predictions
from imgpipe.tracking.runs import job_run
from imgpipe.training.engine import TrainingJob, train_model

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}


def kept_fates(files, class_name="bright") -> pd.DataFrame:
    """A dedupe manifest's rows for `files`, all kept."""
    return pd.DataFrame({"file": [str(path) for path in files], "class": class_name, "status": "kept", "reason": "",
                         "duplicate_of": "", "group": [str(path) for path in files],
                         "origin": [str(path) for path in files]})


def test_the_error_names_the_cause_the_path_the_free_space_and_what_to_do(small_disk):
    small_disk.fill()
    target = small_disk.path / "out" / "a.txt"
    with pytest.raises(OutputWriteError) as raised:
        with writing(target, "the job starts where it stopped"):
            target.parent.mkdir(exist_ok=True)
            target.write_text("x" * 10_000)
    message = str(raised.value)
    assert f"no space left on device writing {target}" in message
    assert f"0 bytes free on {small_disk.path}" in message
    assert message.endswith("free space there, then rerun; the job starts where it stopped")
    assert raised.value.errno == 28 and isinstance(raised.value.__cause__, OSError)


def test_a_read_only_disk_is_named_as_such(small_disk, tmp_path):
    small_disk.make_read_only()
    metrics = small_disk.path / "metrics.json"
    with pytest.raises(OutputWriteError, match=f"read-only file system writing {metrics} .*make it writable"):
        write_evaluation_outputs({"accuracy": 1.0}, [metrics], tmp_path / "speed.json", 1.0)


def test_preprocess_onto_a_full_disk_fails_the_job_and_blames_no_image(small_disk, tmp_path):
    images = write_shape_images(tmp_path / "raw", "bright", 3, size=48)
    small_disk.fill()
    out_dir = small_disk.path / "images" / "bright"
    with pytest.raises(OutputWriteError, match=f"no space left on device writing {out_dir}/bright_000.png"):
        preprocess_class(kept_fates(images), "bright", out_dir, 32, "grayscale", "pad")
    assert not list(out_dir.glob("*.png")) or all(path.stat().st_size == 0 for path in out_dir.glob("*.png"))

    (small_disk.path / "filler").unlink()  # the disk frees up again: the rerun keeps every image
    rows = preprocess_class(kept_fates(images), "bright", out_dir, 32, "grayscale", "pad")
    assert list(rows["status"]) == ["ok"] * 3


def test_a_corrupt_input_is_still_the_image_s_own_failure(tmp_path):
    images = write_shape_images(tmp_path / "raw", "bright", 3, size=48)
    images[1].write_bytes(images[1].read_bytes()[:80])  # truncated: Pillow raises OSError, as a full disk does
    rows = preprocess_class(kept_fates(images), "bright", tmp_path / "images", 32, "grayscale", "pad")
    assert list(rows["status"]) == ["ok", "failed", "ok"]
    assert "OSError" in rows.loc[1, "reason"] or "truncated" in rows.loc[1, "reason"]


def test_a_crawl_store_that_cannot_be_written_fails_the_job_instead_of_recording_failed_urls(small_disk, tmp_path):
    bodies = {f"/img{number}.jpg": distinct_jpeg(number) for number in range(6)}
    url_file = tmp_path / "urls.txt"
    store_dir = small_disk.path / "store"
    ClassStore(store_dir).close()  # an earlier run's store, on the disk that is about to fill up
    with LocalServer({path: Response(body) for path, body in bodies.items()}) as server:
        url_file.write_text("".join(server.url(path) + "\n" for path in bodies))
        small_disk.fill()
        with pytest.raises(OutputWriteError, match=f"no space left on device writing {store_dir}/files/.*crawl "
                                                   f"resumes from what the store has"):
            crawl_class("tank", [{"urls": str(url_file), "threads": 2}], tmp_path / "raw", store_dir,
                        limits=CrawlLimits(timeout_s=5, allow_private_hosts=("127.0.0.1",)))
        assert (store_dir / JOURNAL).read_text() == ""  # no URL is on record as failed
        assert not list((store_dir / "files").iterdir())  # nor half a body left taking space

        (small_disk.path / "filler").unlink()
        manifest, _ = crawl_class("tank", [{"urls": str(url_file), "threads": 2}], tmp_path / "raw-again", store_dir,
                                  limits=CrawlLimits(timeout_s=5, allow_private_hosts=("127.0.0.1",)))
    assert list(manifest["status"]) == ["ok"] * len(bodies)


def test_training_onto_a_full_disk_names_the_cause_the_checkpoint_and_that_a_rerun_resumes(
        small_disk, shapes_manifest, tmp_path):
    work_dir = small_disk.path / "resume"
    job = TrainingJob("cnn", model_settings(epochs=1), IMAGE, shapes_manifest, work_dir, tmp_path / "model.pt",
                      torch.device("cpu"))
    work_dir.mkdir()
    small_disk.fill()
    with pytest.raises(OutputWriteError) as raised:
        train_model(job)
    message = str(raised.value)
    # torch's own words were "unexpected pos 29760 vs 29712"
    assert f"no space left on device writing {work_dir}/best-epoch0001.pt" in message
    assert f"training resumes from the last epoch saved in {work_dir}" in message
    assert not list(work_dir.iterdir())  # the half-written checkpoint does not stay to take space


def test_a_full_disk_under_the_mlflow_store_does_not_hide_the_job_s_error(small_disk, mlflow_uri, mlflow_template_db,
                                                                          monkeypatch, caplog):
    database = small_disk.path / "mlflow.db"
    shutil.copy(mlflow_template_db, database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    checkpoint = small_disk.path / "model.pt"
    with caplog.at_level(logging.ERROR, logger="imgpipe.tracking"):
        with pytest.raises(OutputWriteError, match=f"no space left on device writing {checkpoint}"):
            with job_run("cnn", tags={"imgpipe.stage": "model", "imgpipe.model": "cnn"}) as run:
                small_disk.fill()
                save_atomically({"weights": torch.zeros(50_000)}, checkpoint)
    assert "the run could not be marked FAILED" in caplog.text

    (small_disk.path / "filler").unlink()
    assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"  # closed by the failed invocation


def test_mlflow_s_own_disk_full_error_names_the_store(small_disk, mlflow_uri, mlflow_template_db, monkeypatch):
    database = small_disk.path / "mlflow.db"
    shutil.copy(mlflow_template_db, database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with pytest.raises(OutputWriteError, match=f"no space left on device writing {database} .*database or disk is "
                                               f"full.*: free space there, then rerun; training resumes"):
        with job_run("cnn", tags={"imgpipe.stage": "model"}, then="training resumes from the last epoch"):
            small_disk.fill()
            mlflow.log_metric("val_accuracy", 0.5, step=1)


def test_a_plot_onto_a_full_disk_fails(small_disk):
    small_disk.fill()
    with pytest.raises(OutputWriteError, match="no space left on device writing .*roc.png"):
        plot_unavailable(small_disk.path / "eval" / "roc.png", "cnn: ROC (test)", "no test image")


def test_a_contact_sheet_onto_a_read_only_disk_fails_while_an_undecodable_tile_does_not(small_disk, tmp_path):
    fates = decide_fates(raw_rows(tmp_path), {"sha-a": 1, "sha-b": 2**40, "sha-d": 2**50 + 7}, near_distance=0)
    (tmp_path / "cat_b.jpg").write_bytes(b"not a jpeg")  # a blank tile: the input's problem, not the job's
    write_contact_sheet(fates, "cat", tmp_path / "cat.html", tmp_path / "cat.png")
    small_disk.make_read_only()
    with pytest.raises(OutputWriteError, match=f"read-only file system writing {small_disk.path}/cat.html"):
        write_contact_sheet(fates, "cat", small_disk.path / "cat.html", small_disk.path / "cat.png")


def test_predictions_onto_a_full_disk_fail_and_leave_no_partial_file(small_disk):
    predictions = Predictions(["bright", "dark"], ["a.png"], np.array([[0.9, 0.1]]),
                              [{"path": "cut.jpg", "reason": "truncated or corrupt image data"}])
    small_disk.fill()
    out = small_disk.path / "predictions.csv"
    with pytest.raises(OutputWriteError, match=f"no space left on device writing {out}"):
        write_predictions(None, predictions, 2, out)  # (a CSV needs no model header)
    assert not list(small_disk.path.glob("*predictions*"))


def test_an_error_without_an_errno_on_a_disk_with_room_is_named_but_not_called_full(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(OutputWriteError) as raised:
        with writing(target):
            raise TypeError("cannot pickle 'generator' object")
    assert str(raised.value).startswith(f"failed writing {target} (TypeError: cannot pickle 'generator' object; ")
    assert raised.value.errno is None


def test_a_write_failing_while_another_error_is_handled_names_the_write_s_own_cause(tmp_path):
    # the crawl records a refused URL inside its except block: the disk, not the refusal, is why that failed
    try:
        try:
            raise ValueError("refused: 127.0.0.1 is a loopback address")
        except ValueError:
            raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as error:
        message = str(write_failure(error, tmp_path / "journal.jsonl"))
    assert "(OSError: [Errno 28] No space left on device" in message and "refused" not in message

"""Data-parallel training (models with gpus > 1) on the CPU: gloo, two real processes."""

import pandas as pd
import pytest
import torch
from conftest import model_settings

from imgpipe.models.checkpoints import read_torch_file
from imgpipe.training.distributed import train_data_parallel
from imgpipe.training.engine import TrainingJob, train_model
from imgpipe.training.processgroup import ProcessGroup

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}


def test_each_process_gets_every_nth_batch_and_as_many_as_the_others():
    batches = list(range(7))
    assert ProcessGroup(0, 2).shard(batches) == [0, 2, 4]
    assert ProcessGroup(1, 2).shard(batches) == [1, 3, 5]  # batch 6 would leave process 0 waiting alone
    assert ProcessGroup(2, 3).shard(batches) == [2, 5]
    assert ProcessGroup().shard(batches) == batches
    assert [ProcessGroup(0, n).steps(7) for n in (1, 2, 3)] == [7, 3, 2]


def make_job(tmp_path, manifest, name, **overrides) -> TrainingJob:
    folder = tmp_path / name
    return TrainingJob(name, model_settings(**overrides), IMAGE, manifest, folder / "resume", folder / "model.pt",
                       torch.device("cpu"), threads=2)


def test_two_gloo_processes_train_what_one_process_trains_on_their_combined_batch(shapes_manifest, tmp_path):
    """The mean of two processes' gradients over 8 images each is the gradient over those 16:
    with a network without BatchNorm or dropout (simple_cnn) and no augmentation, two processes
    at batch 8 take the same steps as one at batch 16 (48 training images: 3 steps an epoch)."""
    assert len(pd.read_csv(shapes_manifest).query("split == 'train'")) % 16 == 0
    settings = dict(arch="simple_cnn", epochs=2, lr=0.01, optimizer="adam", seed=5)
    epochs_logged = []
    parallel = make_job(tmp_path, shapes_manifest, "parallel", batch_size=8, gpus=2, **settings)
    history, summary = train_data_parallel(parallel, 2, tmp_path / "parallel.log", on_epoch=epochs_logged.append)
    single_history, _ = train_model(make_job(tmp_path, shapes_manifest, "single", batch_size=16, gpus=1, **settings))

    assert summary["data_parallel_processes"] == 2
    assert epochs_logged == [], "callbacks run in process 0, a process of their own"
    parallel_weights = read_torch_file(parallel.checkpoint_path)["state_dict"]
    single_weights = read_torch_file(tmp_path / "single" / "model.pt")["state_dict"]
    assert parallel_weights.keys() == single_weights.keys()
    for key in parallel_weights:
        torch.testing.assert_close(parallel_weights[key], single_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    pd.testing.assert_series_equal(history["val_accuracy"], single_history["val_accuracy"])
    assert history["train_loss"].tolist() == pytest.approx(single_history["train_loss"].tolist(), rel=1e-4)
    log = (tmp_path / "parallel.log").read_text()
    assert "[rank 0]" in log and "weights are identical in the 2 processes" in log


def test_a_failing_worker_fails_the_training_with_its_error(tmp_path):
    broken = make_job(tmp_path, tmp_path / "missing.csv", "broken", arch="simple_cnn", gpus=2)
    with pytest.raises(Exception) as raised:
        train_data_parallel(broken, 2, tmp_path / "broken.log")
    assert "missing.csv" in str(raised.value) + (tmp_path / "broken.log").read_text()


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time; from imgpipe.training.distributed import die_with_parent; die_with_parent(); "
    "print('armed', flush=True); time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_process_that_set_die_with_parent_ends_when_its_parent_is_killed():
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    # The child shares the parent's stdout: it says when it has set the signal (importing torch
    # first can take seconds on a busy machine).
    assert parent.stdout.readline().strip() == "armed"
    os.kill(child_pid, 0)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        if open(f"/proc/{child_pid}/stat").read().split(") ")[1].startswith("Z"):
            return  # a zombie: ended, waiting for init to reap it
        time.sleep(0.1)
    os.kill(child_pid, signal.SIGKILL)
    raise AssertionError("the child outlived its killed parent")

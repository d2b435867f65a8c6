"""GPU claims between real processes (real flock), device discovery without torch, pick_device."""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imgpipe.training import devices
from imgpipe.training.devices import (
    GPU_LOCK_DIR_ENV,
    GPUS_ENV,
    claim_gpu,
    lock_file_name,
    model_uses_gpu,
    pick_device,
    visible_gpus,
)

UUID_0 = "GPU-8f3a1b2c-1111-2222-3333-444455556666"
UUID_1 = "GPU-0d9e8f7a-aaaa-bbbb-cccc-ddddeeeeffff"

# Claims a device, says which on stdout, then holds it until its stdin closes.
HOLDER_SCRIPT = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from imgpipe.training.devices import claim_gpu
claim = claim_gpu(json.loads(sys.argv[1]), sys.argv[2], poll_seconds=0.05, timeout=20)
print(json.dumps({"device": claim.device_id, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "pid": os.getpid()}), flush=True)
sys.stdin.readline()
"""


@pytest.fixture(autouse=True)
def no_declared_devices(monkeypatch):
    """Tests start from a machine state they declare themselves, and leave none behind: a
    claim sets CUDA_VISIBLE_DEVICES in this process, which later tests' subprocesses inherit."""
    for name in (GPUS_ENV, GPU_LOCK_DIR_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, "recorded so that monkeypatch restores the original state")
        monkeypatch.delenv(name)


@pytest.fixture
def lock_dir(tmp_path) -> Path:
    return tmp_path / "locks"


@pytest.fixture
def processes():
    """Start holder processes; whatever a test leaves running is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(gpus: list[str], lock_dir: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, json.dumps(gpus), str(lock_dir)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()


def read_line(stream, timeout: float) -> str | None:
    """The next line of a child's pipe, or None if none comes within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    return stream.readline()


def holder_report(process: subprocess.Popen, timeout: float = 15) -> dict:
    line = read_line(process.stdout, timeout)
    if not line:
        process.kill()
        raise AssertionError(f"holder {process.pid} claimed nothing; stderr:\n{process.stderr.read()}")
    return json.loads(line)


def let_go(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.wait(timeout=10) == 0


# --- visible_gpus -----------------------------------------------------------------------------


@pytest.mark.parametrize("environ, expected", [
    ({GPUS_ENV: "2", "CUDA_VISIBLE_DEVICES": "0,1"}, ["2"]),
    ({GPUS_ENV: "0, 1", "CUDA_VISIBLE_DEVICES": "-1"}, ["0", "1"]),
    ({GPUS_ENV: "", "CUDA_VISIBLE_DEVICES": "0,1"}, []),
    ({GPUS_ENV: "none", "CUDA_VISIBLE_DEVICES": "0,1"}, []),
    ({GPUS_ENV: "None"}, []),
    ({"CUDA_VISIBLE_DEVICES": "1,3"}, ["1", "3"]),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
    ({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, ["0"]),  # CUDA hides everything after an invalid id
    ({"CUDA_VISIBLE_DEVICES": f"{UUID_0},{UUID_1}"}, [UUID_0, UUID_1]),
])
def test_visible_gpus_from_environment(environ, expected, tmp_path):
    fake_machine_with_two_gpus = tmp_path
    for address in ("0000:01:00.0", "0000:02:00.0"):
        (fake_machine_with_two_gpus / "proc/driver/nvidia/gpus" / address).mkdir(parents=True)

    assert visible_gpus(environ, root=fake_machine_with_two_gpus) == expected


def test_visible_gpus_scans_the_driver_when_nothing_is_declared(tmp_path):
    proc_machine, dev_machine, bare_machine = tmp_path / "proc", tmp_path / "dev", tmp_path / "bare"
    for address in ("0000:01:00.0", "0000:41:00.0", "0000:81:00.0"):
        (proc_machine / "proc/driver/nvidia/gpus" / address).mkdir(parents=True)
    (dev_machine / "dev").mkdir(parents=True)
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset", "null"):
        (dev_machine / "dev" / name).touch()
    bare_machine.mkdir()

    assert visible_gpus({}, root=proc_machine) == ["0", "1", "2"]
    assert visible_gpus({}, root=dev_machine) == ["0", "1"]
    assert visible_gpus({}, root=bare_machine) == []


def test_visible_gpus_on_this_machine_matches_an_independent_scan():
    proc_gpus = Path("/proc/driver/nvidia/gpus")
    count = len([entry for entry in proc_gpus.iterdir() if entry.is_dir()]) if proc_gpus.is_dir() else 0
    if not count:
        count = len([entry for entry in Path("/dev").iterdir() if re.fullmatch(r"nvidia\d+", entry.name)])

    assert visible_gpus() == [str(index) for index in range(count)]  # [] on a machine without NVIDIA GPUs


def test_importing_devices_does_not_import_torch():
    # The Snakefile imports this module at DAG build, where torch's seconds of import are not allowed.
    probe = "import sys, imgpipe.training.devices; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- model_uses_gpu ---------------------------------------------------------------------------


@pytest.mark.parametrize("setting, gpus, expected", [
    ("cuda", ["0"], True),
    ("cuda", [], True),
    ("cpu", ["0"], False),
    ("cpu", [], False),
    ("mps", ["0"], False),
    ("mps", [], False),
    ("auto", ["0", "1"], True),
    ("auto", [], False),
])
def test_model_uses_gpu(setting, gpus, expected):
    assert model_uses_gpu(setting, gpus) is expected


def test_model_uses_gpu_rejects_unknown_settings():
    with pytest.raises(ValueError, match="tpu"):
        model_uses_gpu("tpu", ["0"])


# --- claim_gpu in one process -----------------------------------------------------------------


def test_claims_in_one_process_get_different_devices_and_a_third_times_out(lock_dir):
    first = claim_gpu(["0", "1"], lock_dir)
    second = claim_gpu(["0", "1"], lock_dir)
    try:
        assert {first.device_id, second.device_id} == {"0", "1"}
        started = time.monotonic()
        with pytest.raises(TimeoutError) as raised:
            claim_gpu(["0", "1"], lock_dir, timeout=0.5, poll_seconds=0.1)
        waited = time.monotonic() - started
        assert 0.5 <= waited < 5
        message = str(raised.value)
        assert f"GPU 0 by pid {os.getpid()}" in message
        assert f"GPU 1 by pid {os.getpid()}" in message

        first.release()
        with claim_gpu(["0", "1"], lock_dir, timeout=0) as third:
            assert third.device_id == first.device_id
    finally:
        first.release()
        second.release()


def test_claim_sets_cuda_visible_devices_for_this_process_and_its_children(lock_dir, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUID_0},{UUID_1}")
    claim = claim_gpu(lock_dir=lock_dir)  # the devices come from CUDA_VISIBLE_DEVICES
    try:
        assert claim.device_id == UUID_0
        assert os.environ["CUDA_VISIBLE_DEVICES"] == UUID_0
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == UUID_0
    finally:
        claim.release()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == f"{UUID_0},{UUID_1}"  # released: back as it was


def test_claim_without_set_environment_leaves_cuda_visible_devices_alone(lock_dir):
    with claim_gpu(["3"], lock_dir, set_environment=False) as claim:
        assert claim.device_id == "3"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_claiming_with_no_visible_gpu_says_how_to_declare_one(lock_dir, monkeypatch):
    monkeypatch.setenv(GPUS_ENV, "none")
    with pytest.raises(RuntimeError, match="no GPU is visible") as raised:
        claim_gpu(lock_dir=lock_dir)
    assert GPUS_ENV in str(raised.value) and "CUDA_VISIBLE_DEVICES" in str(raised.value)
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        claim_gpu([], lock_dir)


def test_lock_files_of_uuid_devices_are_safe_file_names(lock_dir):
    assert lock_file_name("0") == "gpu-0.lock"
    assert lock_file_name(UUID_0) == f"gpu-{UUID_0}.lock"
    assert lock_file_name("MIG-GPU-8f3a/1/0") == "gpu-MIG-GPU-8f3a_1_0.lock"
    assert lock_file_name("../../etc/passwd") == "gpu-.._.._etc_passwd.lock"
    with claim_gpu(["MIG-GPU-8f3a/1/0"], lock_dir) as claim:
        assert claim.lock_path == lock_dir / "gpu-MIG-GPU-8f3a_1_0.lock"
        assert claim.device_id == "MIG-GPU-8f3a/1/0"


def test_lock_file_tells_people_who_holds_the_device(lock_dir):
    with claim_gpu(["0"], lock_dir) as claim:
        note = claim.lock_path.read_text()
        assert f"pid: {os.getpid()}\n" in note
        assert "device: 0\n" in note and "host: " in note and "since: " in note and "argv: " in note


def test_default_lock_folder_is_per_user_in_the_temp_folder_unless_declared(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with claim_gpu(["0"]) as claim:
        expected = tmp_path / f"imgpipe-gpu-locks-{os.getuid()}"
        assert claim.lock_path.parent == expected
        assert stat.S_IMODE(expected.stat().st_mode) == 0o700
        # Another workflow elsewhere on this machine finds the same lock.
        monkeypatch.chdir(tmp_path)
        with pytest.raises(TimeoutError):
            claim_gpu(["0"], timeout=0)

    monkeypatch.setenv(GPU_LOCK_DIR_ENV, str(tmp_path / "declared"))
    with claim_gpu(["0"]) as claim:
        assert claim.lock_path == tmp_path / "declared" / "gpu-0.lock"


# --- claim_gpu between processes --------------------------------------------------------------


def test_concurrent_jobs_get_distinct_devices_and_a_third_waits_for_one_to_finish(lock_dir, processes):
    first, second = processes(["0", "1"], lock_dir), processes(["0", "1"], lock_dir)
    first_report, second_report = holder_report(first), holder_report(second)
    assert first_report["device"] != second_report["device"]
    assert {first_report["visible"], second_report["visible"]} == {"0", "1"}

    # Both holders are named, by pid, to whoever finds no free device.
    with pytest.raises(TimeoutError) as raised:
        claim_gpu(["0", "1"], lock_dir, timeout=0.2, poll_seconds=0.05)
    assert f"GPU {first_report['device']} by pid {first.pid}" in str(raised.value)
    assert f"GPU {second_report['device']} by pid {second.pid}" in str(raised.value)

    third = processes(["0", "1"], lock_dir)
    waiting_log = ""
    while "waiting for a free GPU" not in waiting_log:
        waiting_log = read_line(third.stderr, 15)
        assert waiting_log, "the third job never said it was waiting"
    assert f"pid {first.pid}" in waiting_log and f"pid {second.pid}" in waiting_log
    assert read_line(third.stdout, 0.5) is None, "the third job got a device while both were held"

    let_go(first)
    third_report = holder_report(third, timeout=10)
    assert third_report["device"] == first_report["device"]
    assert third_report["visible"] == first_report["device"]
    assert second.poll() is None  # the other holder kept its device all along
    let_go(second)
    let_go(third)


def test_a_job_killed_with_sigkill_frees_its_device_at_once(lock_dir, processes):
    holder = processes(["0"], lock_dir)
    assert holder_report(holder)["device"] == "0"
    with pytest.raises(TimeoutError, match=f"pid {holder.pid}"):
        claim_gpu(["0"], lock_dir, timeout=0)

    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL

    with claim_gpu(["0"], lock_dir, timeout=0) as claim:  # no waiting, no stale-lock cleanup
        assert claim.device_id == "0"
        assert f"pid: {os.getpid()}\n" in claim.lock_path.read_text()


# --- pick_device ------------------------------------------------------------------------------


def test_pick_device_cpu_and_unclaimed_auto_are_the_cpu():
    import torch

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cpu", gpu_claimed=True) == torch.device("cpu")
    auto_unclaimed = pick_device("auto", gpu_claimed=False)
    assert auto_unclaimed.type != "cuda"
    if not torch.backends.mps.is_available():
        assert auto_unclaimed == torch.device("cpu")


def test_pick_device_auto_never_takes_cuda_for_a_job_that_claimed_no_gpu(monkeypatch):
    import torch

    # As on a machine whose GPU was not found at DAG build: torch sees one, the job holds none.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    assert pick_device("auto", gpu_claimed=True).type == "cuda"
    assert pick_device("auto", gpu_claimed=False).type != "cuda"


def test_pick_device_refuses_an_absent_cuda_with_advice():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="device") as raised:
        pick_device("cuda")
    assert "device: auto" in str(raised.value) and "models.<name>.device" in str(raised.value)


def test_pick_device_auto_with_a_claim_but_no_cuda_warns_and_uses_the_cpu(lock_dir, caplog):
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU torch can use")
    with claim_gpu(["0"], lock_dir):  # a GPU declared (as by IMGPIPE_GPUS) on a machine without one
        with caplog.at_level(logging.WARNING, logger=devices.__name__):
            device = pick_device("auto", gpu_claimed=True)
    assert device == torch.device("cpu")
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no CUDA device" in warnings[0].getMessage() and "cpu" in warnings[0].getMessage()


def test_pick_device_auto_without_a_claim_decision_does_not_warn(caplog):
    import torch

    with caplog.at_level(logging.WARNING, logger=devices.__name__):
        device = pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    assert not caplog.records


def test_a_model_job_makes_idle_threads_sleep_unless_the_user_chose_otherwise():
    from imgpipe.training.devices import prepare_model_job

    environ = {}
    assert prepare_model_job(0, environ) is None and environ["OMP_WAIT_POLICY"] == "PASSIVE"
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    prepare_model_job(0, chosen)
    assert chosen["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_slurm_job_claims_the_gpu_slurm_gave_it_whatever_imgpipe_gpus_says(tmp_path, monkeypatch):
    from imgpipe.training.devices import prepare_model_job, slurm_job_gpus

    # sbatch copies the submit side's environment: IMGPIPE_GPUS from a login node rides along
    monkeypatch.setenv(GPUS_ENV, "0,1,2,3")
    monkeypatch.setenv(GPU_LOCK_DIR_ENV, str(tmp_path / "locks"))
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_GPUS": "2", "CUDA_VISIBLE_DEVICES": "2", GPUS_ENV: "0,1,2,3",
             GPU_LOCK_DIR_ENV: str(tmp_path / "locks")}
    assert slurm_job_gpus(slurm) == ["2"]
    assert slurm_job_gpus({"SLURM_JOB_ID": "77", "CUDA_VISIBLE_DEVICES": "0"}) is None  # given no GPU
    assert slurm_job_gpus({"CUDA_VISIBLE_DEVICES": "0"}) is None  # not in Slurm
    claim = prepare_model_job(1, slurm)
    try:
        # the job's own device, locked in a folder of the job alone (two jobs on one node may
        # both be handed a device Slurm numbers 0)
        assert claim.device_id == "2" and claim.lock_path == tmp_path / "locks" / "slurm-job-77" / "gpu-2.lock"
    finally:
        claim.release()


def test_several_devices_are_claimed_all_at_once_or_none(tmp_path):
    from imgpipe.training.devices import claim_gpus

    held = claim_gpu(["0", "1"], tmp_path, set_environment=False)
    assert held.device_id == "0"
    with pytest.raises(TimeoutError, match="no 2 free GPUs at once"):
        claim_gpus(2, ["0", "1"], tmp_path, timeout=0.3, poll_seconds=0.1)
    # device 1 was free, taken during each try and given back: not held while waiting
    claim_gpu(["1"], tmp_path, timeout=0, set_environment=False).release()
    held.release()
    group = claim_gpus(2, ["0", "1"], tmp_path, timeout=1)
    try:
        assert group.device_id == "0,1" and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    finally:
        group.release()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "0,1"
    with pytest.raises(RuntimeError, match="needs 3 GPUs but 2 are visible"):
        claim_gpus(3, ["0", "1"], tmp_path, timeout=0)

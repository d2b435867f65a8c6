"""Which device a job trains on, and one GPU per job when several jobs share a machine.

Snakemake bounds concurrent GPU jobs with `--resources gpu=N` but never says WHICH GPU a
job should use (snakemake/snakemake#281), so each job holding gpu=1 claims a free device
itself: an exclusive flock on a per-device lock file in a folder shared by every job of
the user on this machine, then CUDA_VISIBLE_DEVICES set to that device before CUDA starts.

Imported at DAG build, inside the Snakefile: nothing here may import torch at module level
(it costs seconds); only `pick_device` does, when a job calls it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from imgpipe.core.files import error_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

GPUS_ENV = "IMGPIPE_GPUS"
GPU_LOCK_DIR_ENV = "IMGPIPE_GPU_LOCK_DIR"

DEVICE_SETTINGS = ("auto", "cpu", "cuda", "mps")
NO_GPU_WORDS = ("", "none", "-1")
WAITING_LOG_SECONDS = 60.0
DECLARE_GPUS_ADVICE = (f"declare the devices with {GPUS_ENV}=0,1 (or CUDA_VISIBLE_DEVICES=0,1), "
                       f"or set the model's device to cpu")


def visible_gpus(environ: Mapping[str, str] | None = None, root: Path | str = "/") -> list[str]:
    """Device ids a job on this machine may use, without importing torch.

    IMGPIPE_GPUS if set, else CUDA_VISIBLE_DEVICES if set (empty or '-1': none; ids and
    GPU-UUIDs kept as written), else the NVIDIA devices the driver lists under
    <root>/proc/driver/nvidia/gpus (or, failing that, the <root>/dev/nvidia<N> device
    files), as '0'..'n-1'. `root` exists so tests can point the scan at a fake tree.
    """
    environ = os.environ if environ is None else environ
    if GPUS_ENV in environ:
        return _parse_device_list(environ[GPUS_ENV])
    if "CUDA_VISIBLE_DEVICES" in environ:
        return _parse_device_list(environ["CUDA_VISIBLE_DEVICES"])
    return [str(index) for index in range(count_nvidia_devices(root))]


def _parse_device_list(text: str) -> list[str]:
    if text.strip().lower() in NO_GPU_WORDS:
        return []
    ids = []
    for item in text.split(","):
        item = item.strip()
        # CUDA ignores every device listed after an invalid one, so a '-1' in the
        # middle hides the rest from torch too.
        if item.lower() in NO_GPU_WORDS or re.fullmatch(r"-\d+", item):
            break
        ids.append(item)
    return ids


def count_nvidia_devices(root: Path | str = "/") -> int:
    """How many NVIDIA GPUs the driver shows on this machine (0 without the driver)."""
    root = Path(root)
    try:
        # One folder per GPU, named by its PCI address.
        count = sum(1 for entry in (root / "proc/driver/nvidia/gpus").iterdir() if entry.is_dir())
        if count:
            return count
    except OSError:
        pass
    try:
        # /dev/nvidiactl, /dev/nvidia-uvm and friends are not GPUs; /dev/nvidia<N> are.
        return sum(1 for entry in (root / "dev").iterdir() if re.fullmatch(r"nvidia\d+", entry.name))
    except OSError:
        return 0


# Set in a Slurm job (its batch script or its step) that was given GPUs.
SLURM_GPU_ENV = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")


def slurm_job_gpus(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """In a Slurm job that was given GPUs: its devices as its processes number them
    (CUDA_VISIBLE_DEVICES, which Slurm sets); None outside one.

    Slurm has already made these devices the job's own. IMGPIPE_GPUS, which sbatch copies
    from the submit side's environment with the rest of it, must not replace them.
    """
    environ = os.environ if environ is None else environ
    if not environ.get("SLURM_JOB_ID") or not any(environ.get(name) for name in SLURM_GPU_ENV):
        return None
    return _parse_device_list(environ.get("CUDA_VISIBLE_DEVICES", "")) or None


def model_uses_gpu(device_setting: str, gpus: list[str]) -> bool:
    """At DAG build: does a model with this `device` setting hold the gpu resource?

    cuda always does and cpu never does. mps does not either: there is one MPS device
    and no ids to hand out. auto does exactly when a GPU was found, so on a machine
    without one models train side by side on the CPU cores.
    """
    if device_setting not in DEVICE_SETTINGS:
        raise ValueError(f"unknown device setting {device_setting!r}; expected one of {', '.join(DEVICE_SETTINGS)}")
    if device_setting == "auto":
        return bool(gpus)
    return device_setting == "cuda"


class GpuClaim:
    """One device, held by an exclusive flock for as long as the claim is not released.

    The kernel drops the lock when the process ends, however it ends (SIGKILL, OOM
    killer), so a crashed job never leaves its device locked. Forked children share the
    lock file's descriptor, and the device stays claimed until they have exited too.
    """

    def __init__(self, device_id: str, lock_path: Path, descriptor: int, previous_visible: str | None,
                 set_environment: bool):
        self.device_id = device_id
        self.lock_path = lock_path
        self._descriptor: int | None = descriptor
        self._previous_visible = previous_visible
        self._set_environment = set_environment

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        """Free the device now (idempotent); CUDA_VISIBLE_DEVICES goes back to what it was."""
        if self._descriptor is None:
            return
        try:
            # The file stays (deleting a lock file races with the next claimer's open);
            # empty, it no longer names a holder that is gone.
            os.ftruncate(self._descriptor, 0)
        except OSError:
            pass
        os.close(self._descriptor)  # closing the last descriptor drops the flock
        self._descriptor = None
        if self._set_environment:
            _restore_visible_devices(self.device_id, self._previous_visible)
        log.info("released GPU %s", self.device_id)

    def __enter__(self) -> GpuClaim:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"GpuClaim(device_id={self.device_id!r}, lock_path={str(self.lock_path)!r}, {state})"


class GpuClaimGroup:
    """Several devices claimed for one job (a model trained data-parallel on `gpus` > 1 devices)."""

    def __init__(self, claims: list[GpuClaim], previous_visible: str | None):
        self.claims = claims
        self.device_id = ",".join(claim.device_id for claim in claims)  # as CUDA_VISIBLE_DEVICES lists them
        self._previous_visible = previous_visible

    @property
    def held(self) -> bool:
        return any(claim.held for claim in self.claims)

    def release(self) -> None:
        for claim in self.claims:
            claim.release()
        _restore_visible_devices(self.device_id, self._previous_visible)

    def __enter__(self) -> GpuClaimGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _restore_visible_devices(claimed: str, previous: str | None) -> None:
    """CUDA_VISIBLE_DEVICES back to `previous`, unless something other than the claim set it since."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") != claimed:
        return
    if previous is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = previous


def claim_gpus(count: int, gpus: list[str] | None = None, lock_dir: Path | str | None = None, *,
               timeout: float | None = None, poll_seconds: float = 1.0,
               log: logging.Logger | logging.LoggerAdapter = log) -> GpuClaim | GpuClaimGroup:
    """`count` free devices (see claim_gpu), all at once; CUDA_VISIBLE_DEVICES lists them."""
    if count == 1:
        return claim_gpu(gpus, lock_dir, timeout=timeout, poll_seconds=poll_seconds, log=log)
    previous_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    claimed = _claim_devices(count, gpus, lock_dir, timeout, poll_seconds, log)
    group = GpuClaimGroup([GpuClaim(device_id, lock_path, descriptor, previous_visible, False)
                           for device_id, lock_path, descriptor in claimed], previous_visible)
    os.environ["CUDA_VISIBLE_DEVICES"] = group.device_id
    return group


def default_lock_dir() -> Path:
    """$IMGPIPE_GPU_LOCK_DIR, else a per-user folder in the system temp folder.

    One folder for every job of this user on this machine, wherever each snakemake runs,
    so two workflows in different working folders do not share a GPU either.
    """
    if os.environ.get(GPU_LOCK_DIR_ENV):
        return Path(os.environ[GPU_LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"imgpipe-gpu-locks-{os.getuid()}"


def _prepare_lock_dir(lock_dir: Path, private: bool) -> None:
    lock_dir.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    if private and lock_dir.stat().st_uid != os.getuid():
        # In a shared temp folder anybody can create this name first; their folder must
        # not decide which GPU we get.
        raise RuntimeError(f"GPU lock folder {lock_dir} belongs to another user; set {GPU_LOCK_DIR_ENV} "
                           f"to a folder of your own")


def lock_file_name(device_id: str) -> str:
    """'gpu-<id>.lock', the id made safe for a file name (GPU-UUIDs, MIG-ids and all)."""
    return f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', device_id)}.lock"


def claim_gpu(gpus: list[str] | None = None, lock_dir: Path | str | None = None, *, timeout: float | None = None,
              poll_seconds: float = 1.0, set_environment: bool = True,
              log: logging.Logger | logging.LoggerAdapter = log) -> GpuClaim:
    """Claim the first free device of `gpus` (default: `visible_gpus()`) for this process.

    A device is free when nobody holds the exclusive flock on <lock_dir>/gpu-<id>.lock.
    The holder's pid, host, start time and command line go into the file for people who
    look. Unless `set_environment` is False, CUDA_VISIBLE_DEVICES becomes the claimed id,
    so call this before anything initialises CUDA. When every device is taken, waits,
    logging the holders about once a minute; TimeoutError after `timeout` seconds if given.
    """
    previous_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    [(device_id, lock_path, descriptor)] = _claim_devices(1, gpus, lock_dir, timeout, poll_seconds, log)
    if set_environment:
        os.environ["CUDA_VISIBLE_DEVICES"] = device_id
    return GpuClaim(device_id, lock_path, descriptor, previous_visible, set_environment)


def _claim_devices(count: int, gpus: list[str] | None, lock_dir: Path | str | None, timeout: float | None,
                   poll_seconds: float, log) -> list[tuple[str, Path, int]]:
    """`count` free devices, all at once or none: (id, lock file, descriptor holding its lock) each.

    Holding some while waiting for the rest could wait forever (two jobs each holding one of
    two devices), so a try that finds too few free releases them and waits for a later one.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    if not gpus:
        raise RuntimeError(f"this job needs a GPU (it holds the gpu resource) but no GPU is visible: "
                           f"{DECLARE_GPUS_ADVICE}")
    if count > len(gpus):
        raise RuntimeError(f"this job needs {count} GPUs but {len(gpus)} are visible ({', '.join(gpus)}): "
                           f"lower the model's gpus, or run it where there are {count}")
    private = lock_dir is None and not os.environ.get(GPU_LOCK_DIR_ENV)
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _prepare_lock_dir(lock_dir, private)

    started = time.monotonic()
    last_report = None
    while True:
        holders, claimed = {}, []
        for device_id in gpus:
            lock_path = lock_dir / lock_file_name(device_id)
            descriptor = _try_lock(lock_path)
            if descriptor is None:
                holders[device_id] = _describe_holder(lock_path)
                continue
            claimed.append((device_id, lock_path, descriptor))
            if len(claimed) == count:
                waited = time.monotonic() - started
                for claimed_id, claimed_path, claimed_descriptor in claimed:
                    _write_holder(claimed_descriptor, claimed_id)
                    log.info("claimed GPU %s (lock %s)%s", claimed_id, claimed_path,
                             f" after waiting {waited:.0f} s" if waited >= 1 else "")
                return claimed
        for _, _, descriptor in claimed:  # too few free: none held while waiting
            os.close(descriptor)
        waited = time.monotonic() - started
        held_by = "; ".join(f"GPU {device_id} by {holder}" for device_id, holder in holders.items())
        wanted = "a free GPU" if count == 1 else f"{count} free GPUs at once"
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"no {wanted.removeprefix('a ')} after {waited:.1f} s: claimed are {held_by}; "
                               f"locks in {lock_dir}")
        if last_report is None or time.monotonic() - last_report >= WAITING_LOG_SECONDS:
            log.info("waiting for %s (%.0f s so far): %s", wanted, waited, held_by)
            last_report = time.monotonic()
        pause = poll_seconds if timeout is None else min(poll_seconds, max(timeout - waited, 0.0))
        time.sleep(max(pause, 0.01))


def _try_lock(lock_path: Path) -> int | None:
    """An open descriptor holding the exclusive flock on `lock_path`, or None if it is held."""
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        # Another user's lock file in a shared lock folder: flock needs no write access.
        descriptor = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _write_holder(descriptor: int, device_id: str) -> None:
    text = (f"pid: {os.getpid()}\nhost: {socket.gethostname()}\ndevice: {device_id}\n"
            f"since: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            f"argv: {shlex.join(sys.argv)}\n")
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, text.encode(), 0)
    except OSError as error:
        # The lock is what matters; the note is for people.
        log.debug("could not write the holder into the GPU lock file: %s", error_text(error))


def _describe_holder(lock_path: Path) -> str:
    """'pid 123 on host (since …)', from what the holder wrote; 'an unknown process' if nothing yet."""
    try:
        fields = dict(line.split(": ", 1) for line in lock_path.read_text().splitlines() if ": " in line)
    except OSError:
        fields = {}
    if "pid" not in fields:
        # The holder may be between taking the lock and writing its note.
        return "an unknown process"
    description = f"pid {fields['pid']}"
    if fields.get("host"):
        description += f" on {fields['host']}"
    if fields.get("since"):
        description += f" since {fields['since']}"
    if fields["pid"] == str(os.getpid()):
        description += " (this very process: release() its earlier claim)"
    return description


def pick_device(requested: str, gpu_claimed: bool | None = None) -> torch.device:
    """The torch device for a model's `device` setting ('auto', 'cpu', 'cuda' or 'mps').

    auto: cuda, then mps, then cpu. With `gpu_claimed` False (the job holds no gpu
    resource, because none was found at DAG build) auto never picks CUDA, so a job that
    claimed no device never competes for one. With a claim but no CUDA in torch (a GPU
    declared by IMGPIPE_GPUS on a machine without one) auto warns and goes on without
    CUDA. An explicit device that is absent is an error.
    """
    import torch

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        if gpu_claimed is False:
            available["cuda"] = False
        elif gpu_claimed and not available["cuda"]:
            fallback = "mps" if available["mps"] else "cpu"
            log.warning("this job claimed a GPU (CUDA_VISIBLE_DEVICES=%s) but torch sees no CUDA device "
                        "(was the GPU declared with %s on a machine without one?); training on %s instead",
                        os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), GPUS_ENV, fallback)
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if requested not in available:
        raise RuntimeError(f"unknown device '{requested}' (models.<name>.device); "
                           f"expected one of {', '.join(DEVICE_SETTINGS)}")
    if not available[requested]:
        raise RuntimeError(f"device '{requested}' was requested (models.<name>.device) but is not available on "
                           f"this machine; use device: auto")
    return torch.device(requested)


OMP_WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def prepare_model_job(holds_gpu: int, environ: dict | None = None) -> GpuClaim | GpuClaimGroup | None:
    """What a train or evaluate job does before it imports torch; returns its GPU claim, if any.

    - Idle torch (OpenMP) threads sleep instead of spinning, unless the user set
      OMP_WAIT_POLICY: without a GPU, models train side by side on the same cores, and
      spinning threads steal them from each other (measured here: ResNet-18 on 2 threads
      beside a 1-thread CNN ran at 38 images/s spinning, 61 sleeping; alone, 108-117
      either way).
    - A job holding the gpu resource claims as many free devices as it holds (a model
      trained on `gpus` > 1) and sets CUDA_VISIBLE_DEVICES to them, which must happen
      before CUDA is initialised. In a Slurm job given GPUs the
      device is one of those (`slurm_job_gpus`), whatever IMGPIPE_GPUS says.
    """
    environ = os.environ if environ is None else environ
    environ.setdefault(OMP_WAIT_POLICY_ENV, "PASSIVE")
    if not holds_gpu:
        return None
    slurm_gpus = slurm_job_gpus(environ)
    if slurm_gpus is not None:
        # One of the devices Slurm gave this job, locked in a folder of this job alone: a
        # folder shared by the user's jobs would make two jobs on one node wait for each
        # other where Slurm numbers each job's devices from 0 (when it confines them by cgroup).
        job_folder = f"slurm-job-{environ['SLURM_JOB_ID']}"
        declared = environ.get(GPU_LOCK_DIR_ENV)
        lock_dir = (Path(declared) / job_folder if declared
                    else Path(tempfile.gettempdir()) / f"imgpipe-gpu-locks-{os.getuid()}-{job_folder}")
        _prepare_lock_dir(lock_dir, private=not declared)  # in the shared temp folder: ours alone
        return claim_gpus(holds_gpu, slurm_gpus, lock_dir)
    return claim_gpus(holds_gpu)

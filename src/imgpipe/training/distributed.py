"""Data-parallel training of one model over several processes, for a model with `gpus` > 1.

The train job starts `gpus` worker processes with torchrun's own launcher
(torch.distributed.elastic, what `torchrun --standalone` runs), one per device: NCCL on GPUs,
each process on its own claimed device; gloo on the CPU (a machine without GPUs, and the
tests). Every process holds the whole model and the same data; each epoch's batch order is the
same everywhere (same seed) and process r trains on batches r, r + N, r + 2N, ... After each
backward the gradients are averaged across the processes (one all_reduce of all of them), so
every process takes the same optimizer step, as DistributedDataParallel does; done by hand
because a frozen backbone's head trains on cached features outside the model's forward, where
DDP's hooks would not see it. BatchNorm statistics follow process 0's (broadcast after each
epoch's training, as DDP broadcasts them), so validation, on every process over the whole
split, gives the same row everywhere and every process takes the same early-stopping decision.
Process 0 alone writes the resume state, the checkpoint and the MLflow metrics.

One step then consumes N batches of `batch_size`: the effective batch is N x batch_size
(scale lr accordingly); the last few batches of an epoch that cannot give every process one
are left out of that epoch (each epoch's order is new, so no image is left out for good).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from imgpipe.training import resume
from imgpipe.training.engine import train_model
from imgpipe.training.processgroup import ProcessGroup, backend_for

log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class WorkerTask:
    """What each worker process needs (pickled to it): the job, where to log, what to call back."""

    job: object  # imgpipe.training.engine.TrainingJob
    log_path: str | None
    result_path: str
    on_epoch: Callable[[dict], None] | None = None
    on_start: Callable | None = None


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies. The train job's torchrun and torchrun's
    workers set it, so killing the job (kill -9, a scheduler's SIGKILL) ends its training too:
    nothing goes on training on devices whose locks died with the job."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: a killed job's workers end when torchrun notices
    if os.getppid() == 1:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def train_worker(task: WorkerTask) -> None:
    """One worker process (rank from torchrun's environment); rank 0 writes (history, summary) to task.result_path."""
    import torch.distributed as dist

    die_with_parent()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    _log_to_job_file(task.log_path, rank)
    try:
        job = task.job
        device = job.device
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        job = dataclasses.replace(job, device=device, threads=max(1, job.threads // world_size))
        dist.init_process_group(backend_for(device))
        try:
            group = ProcessGroup(rank, world_size)
            state = resume.load_resume_state(job.work_dir, job.fingerprint())
            main = group.is_main
            result = train_model(job, on_epoch=task.on_epoch if main else None, resume_state=state,
                                 on_start=task.on_start if main else None, group=group)
            if main:
                partial = Path(task.result_path + ".part")
                partial.write_bytes(pickle.dumps(result))
                os.replace(partial, task.result_path)
        finally:
            dist.destroy_process_group()
    except BaseException:
        log.exception("data-parallel training failed in process %d of %d", rank, world_size)
        raise


def train_data_parallel(job, world_size: int, log_path: Path | str | None = None,
                        on_epoch: Callable[[dict], None] | None = None, on_start: Callable | None = None):
    """Train `job` in `world_size` processes on this machine (`torchrun --standalone`); return
    process 0's (history, summary).

    The callbacks run in process 0 and must be picklable (imgpipe.tracking.runs.RunLogger's methods).
    The workers are started by the torchrun command, not forked or spawned from this process:
    a spawned child would run the job's script again (it is the main module). A worker that
    fails fails the whole training, with its traceback in the job's log.
    """
    folder = Path(job.work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    task_path, result_path = folder / "data-parallel-task.pkl", folder / "data-parallel-result.pkl"
    result_path.unlink(missing_ok=True)
    task_path.write_bytes(pickle.dumps(WorkerTask(job, str(log_path) if log_path else None, str(result_path),
                                                  on_epoch, on_start)))
    log.info("%s: data-parallel training in %d processes (%s), %d thread(s) each", job.model_name, world_size,
             backend_for(job.device), max(1, job.threads // world_size))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "--max-restarts=0", "--monitor-interval=0.2", "-m", __name__, str(task_path)]
    completed = subprocess.run(command, preexec_fn=die_with_parent)
    task_path.unlink(missing_ok=True)
    if completed.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"data-parallel training of model '{job.model_name}' failed (torchrun exited with "
                           f"{completed.returncode}); the failing process's traceback is in "
                           f"{log_path or 'the output above'}")
    result = pickle.loads(result_path.read_bytes())
    result_path.unlink()
    return result


def _log_to_job_file(log_path: str | None, rank: int) -> None:
    """A worker's log lines go to the job's log (appended), marked with its rank; ranks > 0 say only warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="a"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s")


if __name__ == "__main__":  # a worker, started by torchrun with the task's file
    # Through the imported module, so that its classes are the ones the engine and the task know.
    from imgpipe.training import distributed

    distributed.train_worker(pickle.loads(Path(sys.argv[1]).read_bytes()))


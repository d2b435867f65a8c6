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
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes training one model (a single process by default)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: list) -> list:
        """This process's batches of an epoch: every world_size-th, as many for every process."""
        if not self.active:
            return batches
        usable = len(batches) // self.world_size * self.world_size
        return batches[self.rank:usable:self.world_size]

    def steps(self, batches: int) -> int:
        """Optimizer steps per epoch of `batches` batches (what shard leaves each process)."""
        return batches // self.world_size if self.active else batches

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Every process's gradients replaced by their mean over the processes (one all_reduce)."""
        if not self.active:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Process 0's buffers (BatchNorm running statistics) everywhere."""
        if not self.active:
            return
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer, 0)

    def check_identical(self, module: torch.nn.Module) -> None:
        """Raise unless every process ends with the same weights, bit for bit (what averaging
        the gradients guarantees: a difference is a bug, not noise)."""
        if not self.active:
            return
        import hashlib

        import torch.distributed as dist

        digest = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests = [None] * self.world_size
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel training: the {self.world_size} processes ended with different "
                               f"weights ({', '.join(d[:12] for d in digests)}); this is a bug in imgpipe")
        log.info("data-parallel training: the weights are identical in the %d processes", self.world_size)

    def from_main(self, values: list[float], device: torch.device) -> list[float]:
        """Process 0's values, in every process: one decision or figure for all, where each
        process's own might differ in the last bit (and a differing decision would leave the
        others waiting in a collective it never enters)."""
        if not self.active:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, 0)
        return tensor.tolist()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Each value summed over the processes."""
        if not self.active:
            return values
        import torch.distributed as dist

        # gloo reduces float64 on CPU; NCCL wants the tensor on this process's device
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


SINGLE = ProcessGroup()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


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

    from imgpipe.training import resume
    from imgpipe.training.engine import train_model

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

"""The processes one model trains in, as the training loop sees them: its rank, how many there
are, and the collective steps (gradient averaging, BatchNorm broadcast, agreeing on a
decision). One process (SINGLE) makes every step a no-op. See imgpipe.training.distributed
for how several are started."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch

log = logging.getLogger(__name__)


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


"""Host-to-device copies that never make the host wait for a GPU.

A copy from ordinary (pageable) host memory to a CUDA device synchronises with the device;
from pinned memory it is queued like a kernel. The loop and the augmentation copy every
batch's indices, images and random parameters through here.
"""

from __future__ import annotations

import torch


class PinnedStaging:
    """Host-to-device copies that do not stall a CUDA stream.

    A copy from ordinary (pageable) host memory makes the host wait for the device; from
    pinned memory it is queued like a kernel. Two pinned buffers take turns, and a buffer
    is refilled only once the copy that last read it has finished.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.copies_done: list = [None, None]
        self.turn = 0

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next pinned buffer, at least `shape[0]` rows of `shape[1:]`, free to overwrite."""
        if self.copies_done[self.turn] is not None:
            self.copies_done[self.turn].synchronize()
        current = self.buffers[self.turn]
        if current is None or current.dtype != dtype or current.shape[1:] != shape[1:] or len(current) < shape[0]:
            self.buffers[self.turn] = torch.empty(shape, dtype=dtype).pin_memory()
        return self.buffers[self.turn][: shape[0]]

    def send(self, staged: torch.Tensor) -> torch.Tensor:
        """Queue the copy of `staged` (a view of the current buffer) and hand the turn over."""
        moved = staged.to(self.device, non_blocking=True)
        self.copies_done[self.turn] = torch.cuda.Event()
        self.copies_done[self.turn].record()
        self.turn = 1 - self.turn
        return moved


def to_device(tensor: torch.Tensor, device: torch.device, staging: PinnedStaging | None = None) -> torch.Tensor:
    """`tensor` on `device`; through `staging` (asynchronous) on CUDA."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda" and staging is not None:
        buffer = staging.buffer(tuple(tensor.shape), tensor.dtype)
        buffer.copy_(tensor)
        return staging.send(buffer)
    return tensor.to(device)

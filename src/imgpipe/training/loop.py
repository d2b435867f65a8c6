"""The training loop: one epoch over preloaded tensors, as close to the compute bound as we can.

Each split is decoded once into a uint8 tensor (`imgpipe.datasets`); a batch is gathered
by index, moved to the device, augmented and normalised there. Losses and correct counts
are summed on the device and read once per epoch, so a GPU is never made to wait for
the host between batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from imgpipe.training.augment import BatchAugment


def batch_indices(n_items: int, batch_size: int, generator: torch.Generator | None = None,
                  sample_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Index tensors of one epoch: in order without a generator (evaluation); shuffled with one;
    drawn with replacement in proportion to `sample_weights` when given (balanced sampler).

    When training, a last batch of one image joins the batch before it: BatchNorm cannot
    normalise a single sample whose feature map has shrunk to 1x1.
    """
    if generator is None:
        order = torch.arange(n_items)
    elif sample_weights is not None:
        order = torch.multinomial(sample_weights, n_items, replacement=True, generator=generator)
    else:
        order = torch.randperm(n_items, generator=generator)
    chunks = list(order.split(batch_size))
    if generator is not None and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def batches_per_epoch(n_items: int, batch_size: int) -> int:
    full, rest = divmod(n_items, batch_size)
    count = full + (rest > 0)
    return count - 1 if rest == 1 and count > 1 else count


class Feeder:
    """Batches of one split's tensor on the training device.

    On a GPU the whole split moves there when it takes under a quarter of the free memory;
    otherwise it stays in pinned host memory and batches are copied asynchronously through
    two pinned buffers. On the CPU a batch is plain indexing.
    """

    def __init__(self, data: torch.Tensor, device: torch.device, max_batch: int):
        self.device = device
        self.data = data
        self.buffers: list[torch.Tensor] = []
        self.events: list = []
        self.turn = 0
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if data.numel() * data.element_size() < free / 4:
                self.data = data.to(device)
            else:
                self.data = data.pin_memory()
                self.buffers = [torch.empty((max_batch, *data.shape[1:]), dtype=data.dtype).pin_memory()
                                for _ in range(2)]
                self.events = [None, None]
        elif device.type != "cpu":
            self.data = data.to(device)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.data.device == self.device:
            return self.data[index.to(self.device)] if self.device.type != "cpu" else self.data[index]
        buffer, event = self.buffers[self.turn], self.events[self.turn]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer must be done before we overwrite it
        staged = torch.index_select(self.data, 0, index, out=buffer[: len(index)])
        batch = staged.to(self.device, non_blocking=True)
        self.events[self.turn] = torch.cuda.Event()
        self.events[self.turn].record()
        self.turn = 1 - self.turn
        return batch


@dataclass
class Precision:
    """Autocast and gradient scaling for one device: bf16 needs no scaler, fp16 does."""

    device_type: str
    dtype: torch.dtype | None  # None: full fp32

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def choose_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA devices that support it, fp16 (scaled) on older ones, fp32 elsewhere."""
    if setting == "auto":
        if device.type != "cuda":
            return Precision(device.type, None)
        return Precision("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Precision(device.type, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting])


class Normalizer:
    """[0, 1] float batch -> normalised, with mean/std held on the device once."""

    def __init__(self, normalization: dict[str, list[float]], device: torch.device, channels_last: bool = False):
        self.mean = torch.tensor(normalization["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(normalization["std"], device=device).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = (batch - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch


@dataclass
class EpochTotals:
    loss: float
    accuracy: float


def train_epoch(forward: Callable[[torch.Tensor], torch.Tensor], feeder: Feeder, labels: torch.Tensor,
                indices: list[torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor], criterion: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                precision: Precision) -> EpochTotals:
    """One pass of optimizer steps. `prepare` turns a fed batch into the forward's input
    (augment + normalise images; nothing for cached features)."""
    device = feeder.device
    labels = labels.to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for index in indices:
        inputs = prepare(feeder(index))
        targets = labels[index.to(device)] if device.type != "cpu" else labels[index]
        with precision.autocast():
            logits = forward(inputs)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(index)
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += len(index)
    return EpochTotals(loss_sum.item() / seen, correct.item() / seen)


@torch.no_grad()
def evaluate_epoch(forward: Callable[[torch.Tensor], torch.Tensor], feeder: Feeder, labels: torch.Tensor,
                   batch_size: int, prepare: Callable[[torch.Tensor], torch.Tensor],
                   precision: Precision) -> EpochTotals:
    """Plain (unweighted, unsmoothed) cross entropy and accuracy over a split, in order."""
    device = feeder.device
    labels = labels.to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for index in batch_indices(len(labels), batch_size):
        targets = labels[index.to(device)] if device.type != "cpu" else labels[index]
        with precision.autocast():
            logits = forward(prepare(feeder(index))).float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(dim=1) == targets).sum()
    return EpochTotals(loss_sum.item() / len(labels), correct.item() / len(labels))


def image_preparation(augment: BatchAugment | None, normalizer: Normalizer,
                      generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch -> (augmented) normalised float batch."""
    if augment is not None and augment.active:
        return lambda batch: normalizer(augment(batch, generator))
    return lambda batch: normalizer(batch.float().div_(255))

"""The training loop: one epoch over preloaded tensors, as close to the compute bound as we can.

Each split is decoded once into a uint8 tensor (`imgpipe.training.datasets`); a batch is gathered
by index, moved to the device, augmented and normalised there. On a GPU nothing in an
epoch makes the host wait for the device: the epoch's batch order is copied there once,
host-to-device copies go through pinned buffers, and losses and correct counts are summed
on the device and read once per epoch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from imgpipe.models.localize import box_iou, split_outputs
from imgpipe.training.augment import BatchAugment
from imgpipe.training.datasets import Normalizer
from imgpipe.training.transfer import PinnedStaging, to_device


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

    Resident: the whole split lives on the device (the CPU; a GPU when it takes under a
    quarter of the free memory; MPS) and a batch is a gather there. Otherwise the split
    stays in pinned host memory and each batch is gathered into a pinned buffer and copied
    asynchronously.
    """

    def __init__(self, data: torch.Tensor, device: torch.device):
        self.device = device
        self.resident = True
        self.staging: PinnedStaging | None = None
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if data.numel() * data.element_size() < free / 4:
                data = data.to(device)
            else:
                data = data.pin_memory()
                self.resident = False
                self.staging = PinnedStaging(device)
        elif device.type != "cpu":
            data = data.to(device)
        self.data = data

    def __call__(self, host_index: torch.Tensor, device_index: torch.Tensor) -> torch.Tensor:
        """The batch of rows `host_index` (a CPU tensor; `device_index` is the same on the device)."""
        if self.resident:
            return self.data[device_index]
        buffer = self.staging.buffer((len(host_index), *self.data.shape[1:]), self.data.dtype)
        torch.index_select(self.data, 0, host_index, out=buffer)
        return self.staging.send(buffer)


def epoch_order(indices: list[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(host index, device index) per batch; the whole order is copied to the device once."""
    if device.type == "cpu":
        return [(index, index) for index in indices]
    order = torch.cat(indices)
    on_device = to_device(order, device, PinnedStaging(device) if device.type == "cuda" else None)
    return list(zip(indices, on_device.split([len(index) for index in indices])))


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


@dataclass
class EpochTotals:
    loss: float
    accuracy: float
    count: int = 0  # images
    iou_sum: float = 0.0  # localising models: the IoU of each image with a box, summed ...
    box_count: int = 0  # ... over this many images

    @property
    def miou(self) -> float:
        return self.iou_sum / self.box_count if self.box_count else float("nan")


@dataclass
class BoxTargets:
    """A split's boxes for a localising model, whose output is `num_classes` logits then the box."""

    boxes: torch.Tensor  # N x 4, shares of the image
    has_box: torch.Tensor  # N, bool
    num_classes: int

    @property
    def count(self) -> int:
        return int(self.has_box.sum())

    def on(self, device: torch.device) -> BoxTargets:
        return BoxTargets(self.boxes.to(device), self.has_box.to(device), self.num_classes)


def _box_ious(outputs: torch.Tensor, boxes: BoxTargets,
              device_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, the IoU of each predicted box with its target, 0 where the image has none)."""
    logits, predicted = split_outputs(outputs, boxes.num_classes)
    has = boxes.has_box[device_index]
    return logits, box_iou(predicted.float(), boxes.boxes[device_index]) * has


def train_epoch(forward: Callable[[torch.Tensor], torch.Tensor], feeder: Feeder, labels: torch.Tensor,
                indices: list[torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor], criterion: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                precision: Precision, after_backward: Callable[[], None] | None = None,
                boxes: BoxTargets | None = None) -> EpochTotals:
    """One pass of optimizer steps. `prepare` turns a fed batch into the forward's input
    (augment + normalise images; nothing for cached features); `after_backward` runs between
    each backward and its step (data-parallel training averages the gradients there). With
    `boxes` (a localising model) the criterion also gets each batch's boxes and which rows have
    one, and the IoU of the predicted boxes is summed."""
    device = feeder.device
    labels = labels.to(device)
    boxes = boxes.on(device) if boxes is not None else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    iou_sum = torch.zeros((), device=device)
    box_count = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for host_index, device_index in epoch_order(indices, device):
        inputs = prepare(feeder(host_index, device_index))
        targets = labels[device_index]
        with precision.autocast():
            outputs = forward(inputs)
            if boxes is None:
                logits = outputs
                loss = criterion(logits.float(), targets)
            else:
                loss = criterion(outputs.float(), targets, boxes.boxes[device_index], boxes.has_box[device_index])
                logits, ious = _box_ious(outputs.detach(), boxes, device_index)
                iou_sum += ious.sum()
                box_count += boxes.has_box[device_index].sum()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(host_index)
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += len(host_index)
    return EpochTotals(loss_sum.item() / seen, correct.item() / seen, seen, iou_sum.item(), int(box_count.item()))


@torch.no_grad()
def evaluate_epoch(forward: Callable[[torch.Tensor], torch.Tensor], feeder: Feeder, labels: torch.Tensor,
                   batch_size: int, prepare: Callable[[torch.Tensor], torch.Tensor],
                   precision: Precision, boxes: BoxTargets | None = None) -> EpochTotals:
    """Plain (unweighted, unsmoothed) cross entropy and accuracy over a split, in order (and,
    with `boxes`, the IoU of a localising model's boxes, summed)."""
    device = feeder.device
    labels = labels.to(device)
    boxes = boxes.on(device) if boxes is not None else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    iou_sum = torch.zeros((), device=device)
    for host_index, device_index in epoch_order(batch_indices(len(labels), batch_size), device):
        targets = labels[device_index]
        with precision.autocast():
            logits = forward(prepare(feeder(host_index, device_index))).float()
        if boxes is not None:
            logits, ious = _box_ious(logits, boxes, device_index)
            iou_sum += ious.sum()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(dim=1) == targets).sum()
    box_count = int(boxes.has_box.sum().item()) if boxes is not None else 0
    return EpochTotals(loss_sum.item() / len(labels), correct.item() / len(labels), len(labels), iou_sum.item(),
                       box_count)


def image_preparation(augment: BatchAugment | None, normalizer: Normalizer,
                      generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch -> (augmented) normalised float batch."""
    if augment is not None and augment.active:
        return lambda batch: normalizer(augment(batch, generator))
    return normalizer

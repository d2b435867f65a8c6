"""Localisation: a box head beside a classifier's head, its losses and IoU on tensors.

A localising model is any classifier imgpipe builds with its head replaced by
`ClassAndBoxHead`: the classification head as it was, and beside it, on the same features, a
box head shaped like it whose last layer gives 4 numbers instead of one per class: the box's
centre and size, each squashed to 0..1, given as corners (x0, y0, x1, y1 as shares of the
image's width and height; a box reaching over an edge may go a little past 0 or 1). The network's output is
one tensor: the class logits, then the box (so the training loop, mixed precision and
data-parallel training treat it like any output).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imgpipe.models.heads import head_name

BOX_OUTPUTS = 4
BOX_LOSSES = ("smooth_l1", "giou")


def _box_layer_like(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, BOX_OUTPUTS)
    return nn.Conv2d(layer.in_channels, BOX_OUTPUTS, layer.kernel_size, layer.stride, layer.padding)


def box_head_like(class_head: nn.Module, num_classes: int) -> nn.Module:
    """A copy of the classification head whose last layer giving `num_classes` outputs (a Linear,
    or a 1x1 Conv2d as SqueezeNet's) gives 4, freshly initialised."""
    if isinstance(class_head, (nn.Linear, nn.Conv2d)):
        return _box_layer_like(class_head)
    box_head = copy.deepcopy(class_head)
    last = None
    for name, module in box_head.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes or (
                isinstance(module, nn.Conv2d) and module.out_channels == num_classes):
            last = name
    if last is None:
        raise ValueError(f"the head {type(class_head).__name__} has no final Linear or Conv2d layer with "
                         f"{num_classes} outputs to turn into a box head")
    parent_name, _, child_name = last.rpartition(".")
    parent = box_head.get_submodule(parent_name) if parent_name else box_head
    setattr(parent, child_name, _box_layer_like(getattr(parent, child_name)))
    if isinstance(parent, nn.Sequential):
        # SqueezeNet's class conv is followed by a ReLU: on the box outputs it would clip every
        # value below 0, leaving the sigmoid's centre and size at 0.5 or more
        names = [name for name, _ in parent.named_children()]
        for name in names[names.index(child_name) + 1:]:
            if isinstance(getattr(parent, name), (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish)):
                setattr(parent, name, nn.Identity())
    for module in box_head.modules():  # the rest of the copy starts afresh too, not as the class head's twin
        if module is not box_head and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return box_head


class ClassAndBoxHead(nn.Module):
    """The classification head and a box head on the same input: (N, C) logits then (N, 4) boxes."""

    def __init__(self, class_head: nn.Module, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.classes = class_head
        self.box = box_head_like(class_head, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The box as its centre and size (each squashed to 0..1), turned into corners: always a
        # proper box, so IoU and GIoU have a gradient from the first step (independent corners
        # start half of the time inverted, with no area to learn from).
        centre_x, centre_y, width, height = torch.sigmoid(self.box(features).flatten(1)).unbind(1)
        box = torch.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2], 1)
        return torch.cat([self.classes(features).flatten(1), box], dim=1)


def add_box_head(model: nn.Module, num_classes: int) -> nn.Module:
    """`model` with its classification head replaced by a ClassAndBoxHead (in place; returned)."""
    name = head_name(model)
    setattr(model, name, ClassAndBoxHead(getattr(model, name), num_classes))
    return model


def split_outputs(outputs: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, boxes) of a localising model's output."""
    return outputs[:, :num_classes], outputs[:, num_classes:num_classes + BOX_OUTPUTS]


def _corners(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]


def box_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box with its target, (N,); a predicted box with x1 < x0 has no area."""
    px0, py0, px1, py1 = _corners(predicted)
    tx0, ty0, tx1, ty1 = _corners(target)
    inter = (torch.minimum(px1, tx1) - torch.maximum(px0, tx0)).clamp(min=0) * \
        (torch.minimum(py1, ty1) - torch.maximum(py0, ty0)).clamp(min=0)
    union = (px1 - px0).clamp(min=0) * (py1 - py0).clamp(min=0) + (tx1 - tx0) * (ty1 - ty0) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def giou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al. 2019): IoU minus the share of the enclosing box that
    neither covers, (N,); -1..1, and it still has a gradient when the boxes do not overlap."""
    px0, py0, px1, py1 = _corners(predicted)
    tx0, ty0, tx1, ty1 = _corners(target)
    inter = (torch.minimum(px1, tx1) - torch.maximum(px0, tx0)).clamp(min=0) * \
        (torch.minimum(py1, ty1) - torch.maximum(py0, ty0)).clamp(min=0)
    union = (px1 - px0).clamp(min=0) * (py1 - py0).clamp(min=0) + (tx1 - tx0) * (ty1 - ty0) - inter
    enclosing_width = torch.maximum(px1, tx1) - torch.minimum(px0, tx0)
    enclosing = enclosing_width * (torch.maximum(py1, ty1) - torch.minimum(py0, ty0))
    union, enclosing = union.clamp(min=1e-12), enclosing.clamp(min=1e-12)
    return inter / union - (enclosing - union) / enclosing


class LocalizationLoss(nn.Module):
    """Cross entropy on the class logits + `box_weight` x the box loss (smooth L1 on the corners,
    or 1 - GIoU), the box loss over the images that have a box."""

    def __init__(self, classification: nn.Module, num_classes: int, box_loss: str = "smooth_l1",
                 box_weight: float = 1.0):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"unknown box loss '{box_loss}' ({', '.join(BOX_LOSSES)})")
        self.classification = classification
        self.num_classes = num_classes
        self.box_loss = box_loss
        self.box_weight = box_weight

    def forward(self, outputs: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor,
                has_box: torch.Tensor) -> torch.Tensor:
        logits, predicted = split_outputs(outputs, self.num_classes)
        loss = self.classification(logits, labels)
        # A mean over the images with a box, by mask: a batch without any still gives the box
        # head a (zero) gradient, as data-parallel training needs every process to have the same.
        mask = has_box.to(predicted.dtype)
        if self.box_loss == "giou":
            per_image = 1 - giou(predicted, boxes)
        else:
            per_image = nn.functional.smooth_l1_loss(predicted, boxes, beta=0.05, reduction="none").mean(dim=1)
        box = (per_image * mask).sum() / mask.sum().clamp(min=1)
        return loss + self.box_weight * box

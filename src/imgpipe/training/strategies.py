"""Training strategies: which parameters train in which epochs, at which learning rate.

- finetune: every layer, every epoch.
- feature_extract: the backbone frozen for good. Frozen means `requires_grad=False` and
  eval mode (BatchNorm keeps its statistics, dropout is off), not only the first.
- staged (fastai's `fine_tune`): `head_epochs` like feature_extract, then every layer,
  the backbone at `backbone_lr_factor` x lr.

The head is the model's classification module (`imgpipe.models.networks.head_name`); the backbone
is everything else. A frozen backbone's output is the head's input, which `HeadInput`
captures without running the head, so it can be computed once and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imgpipe.models.heads import head_name


@dataclass(frozen=True)
class Phase:
    """A run of epochs with one frozen/unfrozen state; `first_epoch` counts from 1."""

    first_epoch: int
    epochs: int
    backbone_frozen: bool

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


def plan_phases(settings: dict) -> list[Phase]:
    epochs, strategy = settings["epochs"], settings["strategy"]
    if strategy == "finetune":
        return [Phase(1, epochs, False)]
    if strategy == "feature_extract":
        return [Phase(1, epochs, True)]
    if strategy == "staged":
        head_epochs = settings["head_epochs"]
        return [Phase(1, head_epochs, True), Phase(head_epochs + 1, epochs - head_epochs, False)]
    raise ValueError(f"unknown strategy '{strategy}' (finetune, feature_extract, staged)")


def phase_of(phases: list[Phase], epoch: int) -> Phase:
    return next(phase for phase in phases if phase.first_epoch <= epoch <= phase.last_epoch)


class ModelParts:
    """A model seen as backbone + head, with the switches the strategies need."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.head_name = head_name(model)
        self.head: nn.Module = getattr(model, self.head_name)
        head_ids = {id(p) for p in self.head.parameters()}
        self.backbone_parameters = [p for p in model.parameters() if id(p) not in head_ids]
        self.head_parameters = list(self.head.parameters())

    def freeze_backbone(self, frozen: bool) -> None:
        for parameter in self.backbone_parameters:
            parameter.requires_grad_(not frozen)

    def set_training_mode(self, backbone_frozen: bool) -> None:
        """Train mode, except a frozen backbone stays in eval mode (BatchNorm statistics fixed)."""
        if backbone_frozen:
            self.model.eval()
            self.head.train()
        else:
            self.model.train()


DEFAULT_BACKBONE_LR_FACTOR = {"staged": 0.1, "finetune": 1.0}


def needs_parts(settings: dict) -> bool:
    """Whether training treats backbone and head differently (else one group of everything)."""
    return settings["strategy"] != "finetune" or settings["backbone_lr_factor"] is not None


def parameter_groups(parts: ModelParts, settings: dict) -> list[dict]:
    """Optimizer groups: the head at lr; the backbone at lr x backbone_lr_factor (finetune,
    staged) or not at all (feature_extract: it never trains)."""
    lr, strategy = settings["lr"], settings["strategy"]
    head = {"params": parts.head_parameters, "lr": lr, "name": "head"}
    if strategy == "feature_extract":
        return [head]
    factor = settings["backbone_lr_factor"]
    factor = DEFAULT_BACKBONE_LR_FACTOR[strategy] if factor is None else factor
    return [{"params": parts.backbone_parameters, "lr": lr * factor, "name": "backbone"}, head]


class _HeadInputReached(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


class HeadInput:
    """Runs a model up to its head and returns what the head would receive.

    A forward pre-hook on the head raises with its input, so nothing after the backbone
    runs; the model's own forward (pooling, flattening) is used as it is.
    """

    def __init__(self, parts: ModelParts):
        self.parts = parts

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        def capture(_module, inputs):
            raise _HeadInputReached(inputs[0])

        handle = self.parts.head.register_forward_pre_hook(capture)
        try:
            self.parts.model(images)
        except _HeadInputReached as reached:
            return reached.value
        finally:
            handle.remove()
        raise RuntimeError(f"the head '{self.parts.head_name}' of {type(self.parts.model).__name__} was never "
                           f"called in its forward pass")


def head_logits(parts: ModelParts, features: torch.Tensor) -> torch.Tensor:
    """The head on backbone features; flattened, as models whose head keeps a 1x1 map do."""
    return parts.head(features).flatten(1)

"""Learning-rate schedules, updated every batch, restarted at every strategy phase.

A schedule is a multiplier of each parameter group's base lr as a function of the global
step, given to `LambdaLR`, whose state (the step count) goes into the resume checkpoint:
a resumed run continues the curve exactly where it stopped.

Within a phase of S steps with W warm-up steps, at step t of the phase:
  warm-up (t < W):  (t + 1) / (W + 1)
  none:             1
  cosine:           (1 + cos(pi * (t - W) / (S - W))) / 2
  step:             step_gamma ** (epochs since warm-up // step_epochs)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from imgpipe.training.strategies import Phase


def lr_multiplier(settings: dict, phases: list[Phase], steps_per_epoch: int) -> Callable[[int], float]:
    scheduler = settings["scheduler"]
    if scheduler not in ("none", "cosine", "step"):
        raise ValueError(f"unknown scheduler '{scheduler}' (none, cosine, step)")
    bounds = [((phase.first_epoch - 1) * steps_per_epoch, phase.epochs * steps_per_epoch) for phase in phases]

    def multiplier(step: int) -> float:
        start, length = next(((s, n) for s, n in reversed(bounds) if step >= s), bounds[0])
        within = step - start
        warmup = min(settings["warmup_epochs"] * steps_per_epoch, length - 1)
        if within < warmup:
            return (within + 1) / (warmup + 1)
        after = within - warmup
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(after, length - warmup) / (length - warmup)))
        if scheduler == "step":
            return settings["step_gamma"] ** ((after // steps_per_epoch) // settings["step_epochs"])
        return 1.0

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, settings: dict, phases: list[Phase],
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(settings, phases, steps_per_epoch))


def make_optimizer(groups: list[dict], settings: dict) -> torch.optim.Optimizer:
    name = settings["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=settings["lr"], momentum=settings["momentum"],
                               weight_decay=settings["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=settings["lr"], weight_decay=settings["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=settings["lr"], weight_decay=settings["weight_decay"])
    raise ValueError(f"unknown optimizer '{name}' (sgd, adam, adamw)")

"""Where a network keeps its class head: the attribute torchvision's families (and SimpleCNN) name it by."""

from __future__ import annotations

from torch import nn

HEAD_NAMES = ("head", "fc", "classifier", "heads")


def head_name(model: nn.Module) -> str:
    """The attribute holding the model's classification head (what feature_extract trains)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"cannot tell the head of {type(model).__name__} (none of {', '.join(HEAD_NAMES)}); "
                     f"use strategy: finetune")

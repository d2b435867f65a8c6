"""Model construction: the seed-000 CNN and any torchvision classifier, sized for our data.

Heads are sized for the number of classes and the first convolution for the number of
input channels. A torchvision backbone can be truncated (seed 000: ResNet-18 without its
last stage, global pooling, an own dense head). Every model has one named head module,
so strategies can freeze "everything but the head". Starting weights (ImageNet or a
checkpoint) are loaded tensor by tensor by name and shape; what was and was not loaded
is reported, and loading nothing is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imgpipe.core.files import error_text
from imgpipe.models.checkpoints import (
    CheckpointError,
    checkpoint_task,
    read_checkpoint_state,
    read_model_checkpoint,
)
from imgpipe.models.heads import head_name
from imgpipe.models.localize import add_box_head

log = logging.getLogger(__name__)

OFFLINE_ENV = "IMGPIPE_OFFLINE"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


class SimpleCNN(nn.Module):
    """The seed-000 CNN: four 3x3 convolutions to a 64-d embedding, then a linear head.

    The second pooling rounds up (ceil_mode) and the embedding is a global average, so
    the network works at any input size >= 32 (the seed's floor pooling needs >= 36);
    at the seed's 40x40 the embedding is pooled from a 2x2 map instead of a 1x1 one.
    """

    embedding_size = 64

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(8, 16, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, ceil_mode=True),
            nn.Conv2d(16, 32, kernel_size=3),
            nn.ReLU(),
            nn.Conv2d(32, self.embedding_size, kernel_size=3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(self.embedding_size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one taking `in_channels` (torchvision models expect 3)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None,
                        child.padding_mode,
                    ))
                return
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} channel(s)")


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for `arch`, from the torch hub cache or downloaded.

    Offline (or with IMGPIPE_OFFLINE=1) and not cached, fails with the file name and the
    cache folder to put it in.
    """
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / Path(weights.url).name
    advice = (
        f"ImageNet weights for '{arch}' are not in the torch hub cache ({cached}). "
        f"Download {weights.url} on a machine with internet and put it in {cache_dir}/ "
        f"(TORCH_HOME moves that folder), or use weights: none."
    )
    if not cached.exists() and os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        raise WeightsUnavailableError(f"{advice} ({OFFLINE_ENV} is set, so no download was tried)")
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, timeouts, HTTP errors: all mean "not available here"
        raise WeightsUnavailableError(f"{advice} Download failed: {error_text(error)}") from error


def _build_options(arch: str, image_size: int | None) -> dict:
    """Constructor options some torchvision models need to be plain classifiers of our images."""
    if arch in ("googlenet", "inception_v3"):
        # Their auxiliary heads make training return a tuple instead of logits.
        return {"aux_logits": False, "init_weights": True}
    if arch.startswith("vit_") and image_size:
        return {"image_size": image_size}  # ViTs are built for one input size
    return {}


class TruncatedBackbone(nn.Module):
    """The front of a torchvision backbone, global average pooling and an own dense head.

    The kept modules keep their torchvision names (conv1, layer1, features, ...), so
    ImageNet weights and checkpoints of the full model load into them by name.
    """

    def __init__(self, kept: list[tuple[str, nn.Module]], feature_size: int, num_classes: int,
                 hidden: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        self.kept_names = [name for name, _ in kept]
        for name, module in kept:
            self.add_module(name, module)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        layers: list[nn.Module] = []
        width = feature_size
        for size in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, size), nn.ReLU()]
            width = size
        layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.head = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for name in self.kept_names:
            images = getattr(self, name)(images)
        return self.head(self.global_pool(images))


def truncation_points(model: nn.Module) -> list[str]:
    """Where a backbone can be cut: its top-level modules after the first, and positions inside
    top-level Sequentials ('features.6')."""
    points = []
    for position, (name, child) in enumerate(model.named_children()):
        if position > 0:
            points.append(name)
        if isinstance(child, nn.Sequential):
            points += [f"{name}.{index}" for index in range(1, len(child))]
    return points


def truncate_backbone(model: nn.Module, cut: str, in_channels: int, image_size: int, num_classes: int,
                      hidden: Sequence[int] = (), dropout: float = 0.0) -> TruncatedBackbone:
    """Keep the modules of `model` before `cut` (in definition order, which is forward order
    for the convolutional torchvision backbones) and put pooling and a dense head after them."""
    points = truncation_points(model)
    if cut not in points:
        raise ValueError(f"truncate: '{cut}' is not a module {type(model).__name__} can be cut at; "
                         f"one of: {', '.join(points)}")
    top, _, inner = cut.partition(".")
    kept = []
    for name, child in model.named_children():
        if name == top:
            if inner:
                kept.append((name, child[: int(inner)]))
            break
        kept.append((name, child))
    probe = nn.Sequential(*(module for _, module in kept)).eval()
    with torch.no_grad():
        shape = probe(torch.zeros(1, in_channels, image_size, image_size)).shape
    if len(shape) != 4:
        raise ValueError(f"truncate: '{cut}' leaves {type(model).__name__} producing {tuple(shape)}, not a "
                         f"feature map to pool; cut at a convolutional stage")
    return TruncatedBackbone(kept, shape[1], num_classes, hidden, dropout)


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int | None = None,
                truncate: str | None = None, head_hidden: Sequence[int] = (), head_dropout: float = 0.0,
                task: str = "classify") -> nn.Module:
    """A freshly initialised classifier for `num_classes` classes and `in_channels`-channel input.

    image_size: the input size, for architectures built for one size (ViT) and for sizing the
    head of a truncated backbone. Starting weights are loaded afterwards (`load_start_weights`).
    task 'localize' adds a box head beside the classification head (imgpipe.models.localize).
    """
    model = _build_classifier(arch, num_classes, in_channels, image_size, truncate, head_hidden, head_dropout)
    if task == "localize":
        add_box_head(model, num_classes)
    elif task != "classify":
        raise ValueError(f"unknown task '{task}' (classify, localize)")
    return model


def _build_classifier(arch: str, num_classes: int, in_channels: int, image_size: int | None, truncate: str | None,
                      head_hidden: Sequence[int], head_dropout: float) -> nn.Module:
    if arch == "simple_cnn":
        return SimpleCNN(in_channels, num_classes)
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown architecture '{arch}': not a torchvision classification model")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                         **_build_options(arch, image_size))
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    if truncate:
        if not image_size:
            raise ValueError("truncate needs the image size to size the dense head")
        model = truncate_backbone(model, truncate, in_channels, image_size, num_classes, head_hidden, head_dropout)
    return model


@dataclass
class WeightsLoad:
    """What loading starting weights did: recorded with the run, warned about when partial."""

    origin: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # the model's tensors left at their initialisation
    unused: list[str] = field(default_factory=list)  # the source's tensors that fit nowhere

    @property
    def complete(self) -> bool:
        return not self.fresh

    def describe(self) -> str:
        total = len(self.loaded) + len(self.fresh)
        text = f"loaded {len(self.loaded)} of the model's {total} tensors from {self.origin}"
        if self.fresh:
            text += f"; freshly initialised: {_listing(self.fresh)}"
        if self.unused:
            text += f"; unused from the source: {_listing(self.unused)}"
        return text

    def as_dict(self) -> dict:
        return {"origin": self.origin, "loaded": self.loaded, "fresh": self.fresh, "unused": self.unused}


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _matched_class_heads(state_dict: dict, own: dict, model: nn.Module) -> dict:
    """A classifier's head tensors named as a localising model's class head (`<head>.classes.`),
    and the other way round, so init_from carries the class head over between the two."""
    try:
        prefix = f"{head_name(model)}."
    except ValueError:
        return state_dict
    matched = {}
    for name, tensor in state_dict.items():
        if name not in own and name.startswith(prefix):
            rest = name[len(prefix):]
            name = next((candidate for candidate in (f"{prefix}classes.{rest}", prefix + rest.removeprefix("classes."))
                         if candidate in own), name)
        matched[name] = tensor
    return matched


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> WeightsLoad:
    """Copy every tensor whose name and shape fit; RGB first-conv kernels are summed for 1 channel.

    Loading nothing of the backbone is an error (the source was made for another
    architecture); a partial load (a new head, another class count) is logged as a warning
    with what did not fit.
    """
    own = model.state_dict()
    state_dict = _matched_class_heads(state_dict, own, model)
    usable = {}
    for name, tensor in state_dict.items():
        if name not in own:
            continue
        target_shape = own[name].shape
        if tensor.shape != target_shape and tensor.dim() == 4 and tensor.shape[1] == 3 and target_shape[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)  # grayscale = R+G+B response of each filter
        if tensor.shape == target_shape:
            usable[name] = tensor
    report = WeightsLoad(origin, loaded=list(usable), fresh=[name for name in own if name not in usable],
                         unused=[name for name in state_dict if name not in usable])
    try:
        head_prefix = f"{head_name(model)}."
    except ValueError:  # no named head: every tensor counts
        head_prefix = None
    # A head alone (names like head.bias fit many models) is no transfer: the backbone would
    # start from random weights.
    backbone_loaded = [name for name in usable if head_prefix is None or not name.startswith(head_prefix)]
    if not backbone_loaded:
        what = "none of its" if not usable else f"only head tensors ({_listing(list(usable), 3)}) of its"
        raise ValueError(f"{origin}: {what} {len(state_dict)} tensors fit this {type(model).__name__} "
                         f"(e.g. it has {_listing(list(state_dict), 3)}; the model wants {_listing(list(own), 3)}): "
                         f"it was made for another architecture")
    model.load_state_dict(usable, strict=False)
    if report.complete:
        log.info("%s", report.describe())
    else:
        log.warning("%s", report.describe())
    return report


def load_start_weights(model: nn.Module, arch: str, weights: str) -> WeightsLoad | None:
    """Load `weights` ('none', 'imagenet' or a checkpoint path) into a freshly built model."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return load_matching_weights(model, imagenet_state_dict(arch), f"ImageNet weights of {arch}")
    return load_matching_weights(model, read_checkpoint_state(weights), f"checkpoint '{weights}'")


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def load_trained_model(checkpoint_path: Path | str, device: torch.device | str = "cpu"):
    """(model in eval mode, checkpoint dict) from an imgpipe model checkpoint."""
    checkpoint = read_model_checkpoint(checkpoint_path)
    spec = {**{"truncate": None, "head_hidden": [], "head_dropout": 0.0}, **checkpoint.get("build", {})}
    model = build_model(checkpoint["arch"], len(checkpoint["classes"]), checkpoint["in_channels"],
                        image_size=checkpoint["image"]["size"], truncate=spec["truncate"],
                        head_hidden=spec["head_hidden"], head_dropout=spec["head_dropout"],
                        task=checkpoint_task(checkpoint))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint '{checkpoint_path}' does not fit the {checkpoint['arch']} it names: "
                              f"{error}") from error
    return model.to(device).eval(), checkpoint

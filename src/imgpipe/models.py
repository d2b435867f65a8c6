"""Model construction: the seed-000 CNN and any torchvision classifier, sized for our data.

Heads are sized for the number of classes and the first convolution for the number of
input channels; starting weights (ImageNet or a checkpoint) are loaded tensor by tensor,
so whatever does not fit (the old head) stays freshly initialised and is logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from imgpipe.files import error_text

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


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> list[str]:
    """Copy every tensor whose name and shape fit; RGB first-conv kernels are summed for 1 channel.

    Returns the model's parameter names left at their fresh initialisation.
    """
    own = model.state_dict()
    usable = {}
    for name, tensor in state_dict.items():
        if name not in own:
            continue
        target_shape = own[name].shape
        if tensor.shape != target_shape and tensor.dim() == 4 and tensor.shape[1] == 3 and target_shape[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)  # grayscale = R+G+B response of each filter
        if tensor.shape == target_shape:
            usable[name] = tensor
    model.load_state_dict(usable, strict=False)
    fresh = [name for name in own if name not in usable]
    log.info("loaded %d/%d tensors from %s; freshly initialised: %s", len(usable), len(own), origin,
             ", ".join(fresh) if fresh else "none")
    return fresh


def read_checkpoint_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The state_dict in an imgpipe checkpoint or a plain state_dict file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ValueError(f"cannot read checkpoint '{path}': {error_text(error)}") from error
    if isinstance(payload, dict) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"checkpoint '{path}' holds no state_dict (tensor name -> tensor)")
    return payload


def _build_options(arch: str, image_size: int | None) -> dict:
    """Constructor options some torchvision models need to be plain classifiers of our images."""
    if arch in ("googlenet", "inception_v3"):
        # Their auxiliary heads make training return a tuple instead of logits.
        return {"aux_logits": False, "init_weights": True}
    if arch.startswith("vit_") and image_size:
        return {"image_size": image_size}  # ViTs are built for one input size
    return {}


def build_model(arch: str, num_classes: int, in_channels: int, weights: str = "none",
                image_size: int | None = None) -> nn.Module:
    """A classifier for `num_classes` classes and `in_channels`-channel input.

    weights: 'none', 'imagenet', or the path of a checkpoint to start from.
    image_size: the input size, for architectures built for one size (ViT).
    """
    if arch == "simple_cnn":
        model = SimpleCNN(in_channels, num_classes)
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown architecture '{arch}': not a torchvision classification model")
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                             **_build_options(arch, image_size))
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
    if weights == "imagenet":
        load_matching_weights(model, imagenet_state_dict(arch), f"ImageNet weights of {arch}")
    elif weights != "none":
        load_matching_weights(model, read_checkpoint_state(weights), str(weights))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())

"""The split manifest as tensors: each split decoded once into one uint8 tensor.

Decoding small PNGs costs about as much as training the small CNN on them, so images
are decoded once per job, kept as uint8 (100k 40x40 images = 160 MB) and normalised per
batch on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from imgpipe.data.boxes import BOX_COLUMNS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SplitTensors:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    paths: list[str]
    # float32, N x 4 (x0, y0, x1, y1 as shares of the image), where the manifest has boxes
    boxes: torch.Tensor | None = None
    has_box: torch.Tensor | None = None  # bool, N: which rows have a usable box (box_status ok)

    def subset(self, keep: torch.Tensor) -> SplitTensors:
        """The rows where `keep` (a bool tensor) is True."""
        rows = keep.nonzero().flatten().tolist()
        return SplitTensors(self.images[keep], self.labels[keep], [self.paths[row] for row in rows],
                            None if self.boxes is None else self.boxes[keep],
                            None if self.has_box is None else self.has_box[keep])


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Class order used for label indices everywhere: sorted class names."""
    return sorted(manifest["label"].unique())


def image_to_chw(image: Image.Image) -> np.ndarray:
    """A preprocessed image as uint8 C x H x W, the layout of every tensor of images here
    (training, evaluation and `imgpipe predict` all go through this)."""
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_split(manifest: pd.DataFrame, split: str, classes: list[str]) -> SplitTensors:
    source = manifest.attrs.get("source", "the split manifest")
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise ValueError(f"{source} has no '{split}' images")
    index = {name: position for position, name in enumerate(classes)}
    arrays = []
    for done, path in enumerate(rows["path"], start=1):
        with Image.open(path) as image:
            arrays.append(image_to_chw(image))
        if done % 10000 == 0:
            log.info("%s: %d / %d images decoded", split, done, len(rows))
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images of split '{split}' in {source} differ in shape: {sorted(shapes)[:3]}; "
                         f"rerun preprocess")
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([index[label] for label in rows["label"]], dtype=torch.int64)
    boxes = has_box = None
    if "box_status" in rows.columns:
        has_box = torch.tensor((rows["box_status"] == "ok").to_numpy())
        corners = rows[BOX_COLUMNS].apply(pd.to_numeric, errors="coerce").fillna(0.0).to_numpy(dtype=np.float32)
        boxes = torch.from_numpy(corners)
    return SplitTensors(images, labels, list(rows["path"]), boxes, has_box)


def normalization_for(images: torch.Tensor, weights: str) -> dict[str, list[float]]:
    """Per-channel mean/std: ImageNet's for ImageNet weights, else the training images' own."""
    channels = images.shape[1]
    if weights == "imagenet":
        if channels == 1:
            return {"mean": [float(np.mean(IMAGENET_MEAN))], "std": [float(np.mean(IMAGENET_STD))]}
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    # Summed in chunks: a float copy of the whole set would be 4x the uint8 preload.
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):
        scaled = chunk.to(torch.float64).div_(255)
        total += scaled.sum(dim=(0, 2, 3))
        squares += scaled.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist()}


class Normalizer:
    """uint8 or [0, 1] float batch -> normalised float32, with mean/std held on the device once."""

    def __init__(self, normalization: dict[str, list[float]], device: torch.device | str, channels_last: bool = False):
        self.mean = torch.tensor(normalization["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(normalization["std"], device=device).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype == torch.uint8:
            batch = batch.float().div_(255)
        batch = (batch - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

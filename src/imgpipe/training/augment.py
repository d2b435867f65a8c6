"""Batched data augmentation with a different random draw for every image, on the batch's device.

torchvision.transforms.v2 transforms draw one set of parameters per call, so applied to a
batch they move, flip and recolour all of its images alike. Here each image gets its own
parameters, drawn from a CPU `torch.Generator` the caller owns (so a run is reproducible
and the generator's state can be checkpointed for an exact resume), and the whole batch is
transformed by a few batched tensor operations. Per image, the result equals (to float32
rounding) torchvision.transforms.v2.functional's kernels called with that image's
parameters on the image scaled to [0, 1]: `horizontal_flip`, then `affine` (bilinear,
`fill=None`: zeros outside the image), then `adjust_brightness`, `adjust_contrast`,
`adjust_saturation`. (v2.RandomAffine's default fill=0 is not quite fill=None: it also
scales the one-pixel band along the moved image's edge by how much of the image each
sample covered, darkening that band twice; inside the image the two agree.)

Presets (every parameter drawn uniformly and independently per image):

- ``none``: no augmentation; the batch is only scaled to [0, 1].
- ``light``: horizontal flip with p=0.5; affine: rotation within +-10 degrees, translation
  within +-10% of the width / height (fractional pixels; v2.RandomAffine rounds them to
  whole ones), scale 0.9-1.1, no shear.
- ``standard``: flip as ``light``; affine: rotation within +-15 degrees, translation within
  +-10%, scale 0.85-1.15; then colour jitter in this fixed order (v2.ColorJitter shuffles
  it per call): brightness factor 0.8-1.2, contrast factor 0.8-1.2 and, for RGB only,
  saturation factor 0.8-1.2. No hue jitter.

Cost on one CPU thread, batch 32 at 40x40x1: about 19 (light) and 23 (standard)
microseconds per image, 4-6% of a SimpleCNN Adam step; 40% of it is grid_sample, most of
the rest the fixed cost of some forty small tensor operations per batch
(bench/augment_speed.py measures it). Two shortcuts keep it there: the
flip is folded into the affine matrix (a mirrored sampling grid, rather than a flipped
copy of the batch), and the sampling grid is built from per-axis coordinate rows instead
of F.affine_grid, which alone cost three times as much as grid_sample at this size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgpipe.training.transfer import PinnedStaging, to_device

AUGMENT_PRESETS = ("none", "light", "standard")


@dataclass(frozen=True)
class PresetRanges:
    flip_probability: float
    max_degrees: float
    max_translate_fraction: float  # of the width for x, of the height for y
    scale_range: tuple[float, float]
    colour_factor_range: tuple[float, float] | None  # brightness, contrast and (RGB only) saturation


PRESET_RANGES: dict[str, PresetRanges] = {
    "light": PresetRanges(flip_probability=0.5, max_degrees=10.0, max_translate_fraction=0.10,
                          scale_range=(0.90, 1.10), colour_factor_range=None),
    "standard": PresetRanges(flip_probability=0.5, max_degrees=15.0, max_translate_fraction=0.10,
                             scale_range=(0.85, 1.15), colour_factor_range=(0.8, 1.2)),
}


@dataclass
class AugmentParams:
    """Per-image parameters of one batch, 1-d tensors of length N (translate: N x 2); None skips a step.

    The affine fields (angle, translate, scale) are all set or all None and mean what they
    mean to v2.functional.affine with shear 0: angle in degrees, translate in pixels (x, y),
    scale about the image centre.
    """

    flip: torch.Tensor | None = None  # bool
    angle: torch.Tensor | None = None
    translate: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None


def _affine_theta(params: AugmentParams, height: int, width: int) -> np.ndarray:
    """N x 6 rows of the 2 x 3 matrices from output to input coordinates in [-1, 1]
    (F.affine_grid's theta), computed with numpy on the CPU: for a batch of small vectors
    each numpy operation costs a microsecond where a torch one costs several.

    The inverse matrix of torchvision's _get_inverse_affine_matrix (centre 0, no shear),
    which works in pixels from the image centre, conjugated by diag(width / 2, height / 2)
    into [-1, 1] coordinates: theta = A @ [I | -shift], with A the inverse rotation and
    scale and shift the translation, both in those coordinates. A flip, if given, is folded
    in: sampling a flipped image at x is sampling the image at -x, so A's x row (and with
    it the x offset) changes sign.
    """
    radians = np.deg2rad(params.angle.numpy().astype(np.float64))
    scale = params.scale.numpy().astype(np.float64)
    cos, sin = np.cos(radians) / scale, np.sin(radians) / scale
    rotation = np.stack([cos, sin * (height / width), sin * (-width / height), cos], 1).reshape(-1, 2, 2)
    if params.flip is not None:
        rotation[params.flip.numpy(), 0, :] *= -1
    shift = params.translate.numpy().astype(np.float64) / np.array([width / 2, height / 2])
    offset = -(rotation * shift[:, None, :]).sum(axis=2, keepdims=True)
    return np.concatenate([rotation, offset], axis=2).reshape(-1, 6)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional's _blend with one factor per image: images * f + other * (1 - f), clamped to [0, 1]."""
    factor = factor.view(-1, 1, 1, 1)
    # torchvision's own order of operations; torch.addcmul, one pass fewer, is several
    # times slower with these broadcasts on the CPU.
    return images.mul(factor).add_(other * (1 - factor)).clamp_(0, 1)


class BatchAugment:
    """Augments uint8 N x C x H x W batches into float32 in [0, 1], each image with its own draw.

    `preset` is one of AUGMENT_PRESETS (see the module docstring); `channels` (1 or 3) is
    that of the batches it will get. Called with a batch and a CPU torch.Generator: the same
    generator state and batch give a bit-identical result on the CPU.
    """

    def __init__(self, preset: str, channels: int):
        if preset not in AUGMENT_PRESETS:
            raise ValueError(f"unknown augmentation preset '{preset}'; valid presets: "
                             f"{', '.join(AUGMENT_PRESETS)}")
        if channels not in (1, 3):
            raise ValueError(f"augmentation needs 1 (grayscale) or 3 (RGB) channels, not {channels}")
        self.preset = preset
        self.channels = channels
        self.ranges = PRESET_RANGES.get(preset)
        self._draw_bounds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._grid_bases: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._staging: dict[torch.device, PinnedStaging] = {}

    @property
    def active(self) -> bool:
        return self.preset != "none"

    def __repr__(self) -> str:
        return f"BatchAugment(preset={self.preset!r}, channels={self.channels})"

    def draw(self, count: int, height: int, width: int, generator: torch.Generator) -> AugmentParams:
        """Parameters for `count` images of height x width, drawn on the CPU from `generator` alone."""
        if generator.device.type != "cpu":
            raise ValueError(f"augmentation draws from a CPU torch.Generator, not one on {generator.device}")
        if self.ranges is None:
            return AugmentParams()
        # One draw of fixed layout per batch: how far the generator advances depends only on
        # the batch size, never on the channel count or on the values drawn.
        low, high = self._bounds(height, width)
        values = torch.lerp(low, high, torch.rand(count, 8, generator=generator))
        flip_draw, angle, _, _, scale, brightness, contrast, saturation = values.unbind(1)
        params = AugmentParams(flip=flip_draw < self.ranges.flip_probability, angle=angle,
                               translate=values[:, 2:4], scale=scale)
        if self.ranges.colour_factor_range is not None:
            params.brightness, params.contrast = brightness, contrast
            if self.channels == 3:
                params.saturation = saturation
        return params

    def _bounds(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds of the eight uniform draws, in the order draw() unpacks them."""
        if (height, width) not in self._draw_bounds:
            ranges = self.ranges
            shift_x, shift_y = ranges.max_translate_fraction * width, ranges.max_translate_fraction * height
            colour = ranges.colour_factor_range or (1.0, 1.0)
            low = [0.0, -ranges.max_degrees, -shift_x, -shift_y, ranges.scale_range[0]] + [colour[0]] * 3
            high = [1.0, ranges.max_degrees, shift_x, shift_y, ranges.scale_range[1]] + [colour[1]] * 3
            self._draw_bounds[height, width] = (torch.tensor(low), torch.tensor(high))
        return self._draw_bounds[height, width]

    def _sampling_grid(self, theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """F.affine_grid(theta, ..., align_corners=False) with a fraction of its cost.

        Each grid coordinate is a row term plus a column term, so the grid is one broadcast
        add of N x 2 x H x 1 and N x 2 x 1 x W; it is handed to grid_sample as a permuted
        view, which grid_sample reads as fast as a contiguous one.
        """
        key = (height, width, theta.device)
        if key not in self._grid_bases:
            # Pixel centres in [-1, 1] (align_corners=False), laid out so that one matmul
            # with theta gives every column's x-term and every row's y-plus-offset term.
            xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
            ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
            basis = torch.zeros(3, width + height)
            basis[0, :width], basis[1, width:], basis[2, width:] = xs, ys, 1
            self._grid_bases[key] = basis.to(theta.device)
        terms = torch.mm(theta.reshape(-1, 3), self._grid_bases[key]).view(-1, 2, width + height)
        x_terms, y_terms = terms.split([width, height], dim=2)
        return (y_terms.unsqueeze(3) + x_terms.unsqueeze(2)).permute(0, 2, 3, 1)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """`images` (uint8 N x C x H x W) transformed with the given per-image `params`, as float32 in [0, 1]."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"augmentation expects uint8 N x C x H x W images, got {images.dtype} "
                             f"of shape {tuple(images.shape)}")
        if images.shape[1] != self.channels:
            raise ValueError(f"{self!r} got images with {images.shape[1]} channel(s)")
        height, width = images.shape[2:]
        per_image = self._per_image_columns(params, height, width, images.device)

        if "flip" in per_image:  # a flip without an affine to fold it into
            images = torch.where(per_image["flip"].bool().view(-1, 1, 1, 1), images.flip(-1), images)
        output = images.float().div_(255)

        if "theta" in per_image:
            grid = self._sampling_grid(per_image["theta"].view(-1, 2, 3), height, width)
            output = F.grid_sample(output, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if not per_image.keys() & {"brightness", "contrast", "saturation"}:
                # Bilinear weights sum to at most 1, but float rounding can step a hair past
                # 1; a colour step would clamp anyway.
                output.clamp_(0, 1)

        if "brightness" in per_image:
            output = output.mul_(per_image["brightness"].view(-1, 1, 1, 1)).clamp_(0, 1)
        if per_image.keys() & {"contrast", "saturation"} and self.channels == 3:
            # torchvision costs seconds to import: only colour jitter of RGB images needs it.
            from torchvision.transforms.v2.functional import rgb_to_grayscale
        if "contrast" in per_image:
            grayscale = rgb_to_grayscale(output) if self.channels == 3 else output
            output = _blend(output, grayscale.mean(dim=(1, 2, 3), keepdim=True), per_image["contrast"])
        if "saturation" in per_image and self.channels == 3:
            output = _blend(output, rgb_to_grayscale(output), per_image["saturation"])
        return output

    def _per_image_columns(self, params: AugmentParams, height: int, width: int,
                           device: torch.device) -> dict[str, torch.Tensor]:
        """The parameters as float32 columns on `device`, moved there in one copy.

        The affine matrices are built on the CPU with numpy, where the parameters are drawn:
        on CUDA that saves a dozen tiny kernel launches, and one asynchronous copy from
        pinned memory carries everything.
        """
        columns: dict[str, np.ndarray] = {}
        if params.angle is not None:
            columns["theta"] = _affine_theta(params, height, width)
        elif params.flip is not None:
            columns["flip"] = params.flip.numpy().reshape(-1, 1)
        for name in ("brightness", "contrast", "saturation"):
            if getattr(params, name) is not None:
                columns[name] = getattr(params, name).numpy().reshape(-1, 1)
        if not columns:
            return {}
        packed = torch.from_numpy(np.concatenate(list(columns.values()), axis=1, dtype=np.float32))
        if device.type == "cuda" and device not in self._staging:
            self._staging[device] = PinnedStaging(device)
        packed = to_device(packed, device, self._staging.get(device))
        return dict(zip(columns, packed.split([column.shape[1] for column in columns.values()], dim=1)))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.active:
            return images.float().div_(255)
        count, _, height, width = images.shape
        return self.apply(images, self.draw(count, height, width, generator))

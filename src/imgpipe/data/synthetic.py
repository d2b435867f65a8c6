"""Offline localisation data: scikit-learn's handwritten digits pasted on textured backgrounds.

Each image is a `canvas` x `canvas` RGB picture of noise, a colour gradient and stripes with
one digit of the class pasted at a random place and scale; its box is exact (the digit's ink,
to the pixel). Everything follows from the source's seed, the digit and the image's number, so
the same source gives the same bytes and boxes on every machine, and preprocess recomputes the
boxes without drawing anything.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from imgpipe.data.boxes import Box

DEFAULTS = {"count": 150, "canvas": 96, "seed": 0}
MIN_SCALE, MAX_SCALE = 0.3, 0.7  # the digit's side, as a share of the canvas


def settings(source: dict) -> dict:
    """A synthetic source's settings with their defaults."""
    return DEFAULTS | source["synthetic"]


def origin(source_settings: dict, digit: int, number: int) -> str:
    """Everything the image follows from: another seed or canvas is another image, never one
    replayed from the crawl store under the old settings."""
    return (f"synthetic:digits-on-texture#{digit}/{number}?seed={source_settings['seed']}"
            f"&canvas={source_settings['canvas']}")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # only synthetic sources pay its import

    digits = load_digits()
    return digits.images, digits.target


@dataclass(frozen=True)
class Layout:
    sample: int  # index into scikit-learn's digits
    side: int  # pixels of the pasted 8x8 digit's side
    x: int
    y: int
    rng_seed: int


def layout(source_settings: dict, digit: int, number: int) -> Layout:
    images, targets = _digits()
    samples = np.flatnonzero(targets == digit)
    rng = np.random.default_rng([source_settings["seed"], digit, number])
    canvas = source_settings["canvas"]
    side = int(rng.integers(round(MIN_SCALE * canvas), round(MAX_SCALE * canvas) + 1))
    side -= side % 8  # a whole number of pixels per digit pixel: the ink's box is exact
    return Layout(int(samples[number % len(samples)]), side, int(rng.integers(0, canvas - side + 1)),
                  int(rng.integers(0, canvas - side + 1)), int(rng.integers(0, 2**31)))


def ink_box(item: Layout) -> Box:
    """The digit's ink on the canvas, to the pixel."""
    images, _ = _digits()
    rows, cols = np.nonzero(images[item.sample] > 0)
    cell = item.side // 8
    return Box(item.x + cols.min() * cell, item.y + rows.min() * cell,
               item.x + (cols.max() + 1) * cell, item.y + (rows.max() + 1) * cell)


def render(source_settings: dict, item: Layout) -> bytes:
    """The PNG of one image."""
    from PIL import Image

    images, _ = _digits()
    canvas = source_settings["canvas"]
    rng = np.random.default_rng(item.rng_seed)
    ys, xs = np.mgrid[0:canvas, 0:canvas] / canvas
    start, end = rng.uniform(0, 160, 3), rng.uniform(0, 160, 3)
    angle = rng.uniform(0, np.pi)
    gradient = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
    gradient = (gradient - gradient.min()) / (np.ptp(gradient) or 1)
    background = start + (end - start) * gradient
    stripes = np.sin((xs * np.cos(angle + 1) + ys * np.sin(angle + 1)) * rng.uniform(8, 30) * np.pi)[..., None]
    background += stripes * rng.uniform(10, 30) + rng.normal(0, 12, (canvas, canvas, 3))
    ink = np.kron(images[item.sample] / 16.0, np.ones((item.side // 8, item.side // 8)))[..., None]
    colour = rng.uniform(200, 255, 3)
    patch = background[item.y:item.y + item.side, item.x:item.x + item.side]
    background[item.y:item.y + item.side, item.x:item.x + item.side] = patch * (1 - ink) + colour * ink
    buffer = io.BytesIO()
    Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def items(source: dict) -> list[tuple[str, Layout]]:
    """(origin, layout) of every image a synthetic source makes, in order."""
    chosen = settings(source)
    digit = chosen["digit"]
    return [(origin(chosen, digit, number), layout(chosen, digit, number)) for number in range(chosen["count"])]


def boxes(source: dict) -> dict[str, tuple[Box, str]]:
    """{origin: (box, where)} of a synthetic source, as imgpipe.data.sourceboxes.source_boxes gives them."""
    return {name: (ink_box(item), name) for name, item in items(source)}

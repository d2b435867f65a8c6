"""Distinct low-texture images, made offline: the pictures on which perceptual hashes fail.

Shapes on plain, gradient and noise backgrounds (circles, squares and triangles: three
classes, as a user's synthetic folder has them), stripes, gradient-filled shapes on plain
backgrounds, icon-like glyph arrangements (also as RGBA on a transparent background) and
scan-like text pages. pHash puts many such
pairs within a few bits of each other (see imgpipe.data.nearmatch), so the dedupe stage must
drop none of them: bench/dedupe.py and tests/test_dedupe.py both run this set through
``dedupe_images``. It lives in the library, not in tests/ or bench/, so both import it the
same way (and a user can check a setting against it: ``write_low_texture_set(folder)``);
it needs only numpy and Pillow.

What "distinct" means here (to a person looking at the two pictures): every image has a
family and a kind (e.g. shape/circle on a noise background, icons with one arrangement of
glyphs, a page with 7 lines) and a few numbers, each with the step a person clearly sees:
the main shape's center moved by 12% of the side, its size changed by a factor 1.4, a gray
level (of the shape, background, stripe or ink) changed by 48 of 255, a stripe or gradient
turned by 20-45 degrees, a stripe period changed by 1.4x, a text line's length changed by
20% of the page. Two images are distinct when their family or kind differs or at least one
number differs by at least its step; images are drawn at random and one that is not
distinct from every image drawn before it is drawn again. Hue alone does not count here,
though the pixel test tells a red shape from a green one of equal brightness since it
compares colour (imgpipe.data.nearmatch.chroma_difference): the set is drawn so that each image
is distinct from the others without colour (a stricter rule, and pHash is blind to hue),
nor does the phase of stripes or the grain of a noise background. Every foreground stands
out of its background by at least 64 gray levels.

Everything follows from the seed: the same call gives the same pixels on every machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE = 128
SHAPES = ("circle", "square", "triangle")
GRADIENT_SHAPES = ("diamond", "ellipse")
BACKGROUNDS = ("plain", "gradient", "noise")
GLYPHS = ("dot", "ring", "plus", "bar")
MIN_CONTRAST = 64  # gray levels between a foreground and its background
PLACE_STEP = 0.06  # of the side
SIZE_STEP = np.log(1.5)
OTHER_FAMILIES = ("stripes", "gradient_shape", "icons", "scan", "transparent_icons")


@dataclass(frozen=True)
class LowTextureImage:
    """One image: `label` (its class in a folder-per-class layout), how it is drawn, and what
    makes it distinct (`kind`, and `numbers` in steps a person clearly sees)."""

    name: str
    label: str
    family: str
    kind: tuple
    numbers: dict[str, float]  # name -> value in steps; angles carry their period in `periods`
    periods: dict[str, float] = field(default_factory=dict)
    draw: Callable[[], Image.Image] = field(default=None, repr=False, compare=False)
    fmt: str = "PNG"


def distinct(a: LowTextureImage, b: LowTextureImage) -> bool:
    """True when a person tells `a` and `b` apart (module docstring)."""
    if (a.family, a.kind) != (b.family, b.kind):
        return True
    for key, value in a.numbers.items():
        gap = abs(value - b.numbers[key])
        period = a.periods.get(key)
        if period:
            gap = min(gap % period, period - gap % period)
        if gap >= 1:
            return True
    return False


def _luma(rgb) -> float:
    return 0.299 * float(rgb[0]) + 0.587 * float(rgb[1]) + 0.114 * float(rgb[2])


def _colour_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours whose gray levels differ by at least MIN_CONTRAST."""
    while True:
        both = np.floor(rng.random(6) * 256)
        a, b = both[:3], both[3:]
        if abs(_luma(a) - _luma(b)) >= MIN_CONTRAST:
            return a, b


def _polarity(foreground, background) -> str:
    return "light_on_dark" if _luma(foreground) > _luma(background) else "dark_on_light"


def _layout(cx: float, cy: float, size: float) -> dict[str, float]:
    return {"x": cx / PLACE_STEP, "y": cy / PLACE_STEP, "size": np.log(size) / SIZE_STEP}


def _linear(rng_angle: float, side: int = SIDE) -> np.ndarray:
    """0..1 along the direction `rng_angle` (degrees) across a side x side canvas."""
    ys, xs = np.mgrid[0:side, 0:side] / (side - 1)
    t = np.cos(np.radians(rng_angle)) * xs + np.sin(np.radians(rng_angle)) * ys
    return (t - t.min()) / np.ptp(t)


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")


def _shape_mask(kind: str, cx: float, cy: float, size: float, side: int = SIDE) -> Image.Image:
    """A mask of a shape whose bounding box is size x size (share of the side) centered at (cx, cy)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    half = size * side / 2
    x, y = cx * side, cy * side
    box = (x - half, y - half, x + half, y + half)
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        draw.rectangle(box, fill=255)
    elif kind == "triangle":
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=255)
    elif kind == "diamond":
        draw.polygon([(x, y - half), (x + half, y), (x, y + half), (x - half, y)], fill=255)
    elif kind == "ellipse":  # twice as wide as high
        draw.ellipse((x - half, y - half / 2, x + half, y + half / 2), fill=255)
    else:
        raise ValueError(kind)
    return mask


def _paint(background: np.ndarray, mask: Image.Image, foreground) -> np.ndarray:
    alpha = (np.asarray(mask, dtype=np.float64) / 255)[..., None]
    return background * (1 - alpha) + np.asarray(foreground, dtype=np.float64) * alpha


def _place(rng, size: float) -> tuple[float, float]:
    return tuple(rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, 2))


def _shape(rng, number: int, kind: str) -> LowTextureImage:
    """A shape of random colour, size and place on a plain, gradient or noise background."""
    background_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(0.15, 0.6))
    cx, cy = _place(rng, size)
    while True:  # the shape stands out of every part of its background
        shape_colour, base = _colour_pair(rng)
        other = base
        if background_kind == "gradient":
            # from the base colour to one 64-128 levels away in gray (a visible gradient)
            angle = float(rng.uniform(0, 360))
            other = np.clip(base + rng.uniform(64, 128) * (1 if _luma(base) < 128 else -1), 0, 255)
        if abs(_luma(shape_colour) - _luma(other)) >= MIN_CONTRAST and _polarity(shape_colour, base) == _polarity(
                shape_colour, other):
            break
    numbers = _layout(cx, cy, size)
    noise_sigma, noise_seed = float(rng.uniform(12, 30)), int(rng.integers(2**31))

    def draw() -> Image.Image:
        if background_kind == "gradient":
            t = _linear(angle)[..., None]
            background = base * (1 - t) + other * t
        else:
            background = np.broadcast_to(base.astype(np.float64), (SIDE, SIDE, 3)).copy()
        if background_kind == "noise":
            background += np.random.default_rng(noise_seed).normal(0, noise_sigma, (SIDE, SIDE, 1))
        return _to_image(_paint(background, _shape_mask(kind, cx, cy, size), shape_colour))

    kind_key = (kind, _polarity(shape_colour, base))
    return LowTextureImage(f"{kind}_{number:04d}", kind, "shape", kind_key, numbers, {}, draw)


def _stripes(rng, number: int) -> LowTextureImage:
    angle, period, duty = float(rng.uniform(0, 180)), float(rng.uniform(0.08, 0.35)), float(rng.uniform(0.25, 0.75))
    first, second = _colour_pair(rng)
    phase = float(rng.uniform(0, 1))
    numbers = {"angle": angle / 15, "period": np.log(period) / np.log(1.3), "duty": duty / 0.25}

    def draw() -> Image.Image:
        ys, xs = np.mgrid[0:SIDE, 0:SIDE] / SIDE
        t = (np.cos(np.radians(angle)) * xs + np.sin(np.radians(angle)) * ys) / period + phase
        on = ((t % 1) < duty)[..., None]
        return _to_image(np.where(on, first, second).astype(np.float64))

    return LowTextureImage(f"stripes_{number:04d}", "stripes", "stripes", (), numbers, {"angle": 180 / 15}, draw)


def _gradient_shape(rng, number: int) -> LowTextureImage:
    """A diamond or a wide ellipse (shapes the shape classes do not have) filled with a linear
    gradient, on a plain background."""
    kind = GRADIENT_SHAPES[int(rng.integers(len(GRADIENT_SHAPES)))]
    size = float(rng.uniform(0.3, 0.7))
    cx, cy = _place(rng, size)
    while True:  # both ends of the fill stand out of the background, and differ from each other by 64+ levels
        start, background = _colour_pair(rng)
        direction = 1 if _luma(start) > _luma(background) else -1
        end = np.clip(start + direction * rng.uniform(64, 160), 0, 255)
        if abs(_luma(end) - _luma(start)) >= MIN_CONTRAST:
            break
    angle = float(rng.uniform(0, 360))
    numbers = _layout(cx, cy, size) | {"fill_angle": angle / 45}

    def draw() -> Image.Image:
        t = _linear(angle)[..., None]
        fill = start * (1 - t) + end * t
        plain = np.broadcast_to(background.astype(np.float64), (SIDE, SIDE, 3))
        alpha = (np.asarray(_shape_mask(kind, cx, cy, size), dtype=np.float64) / 255)[..., None]
        return _to_image(plain * (1 - alpha) + fill * alpha)

    return LowTextureImage(f"gradient_{kind}_{number:04d}", "gradient_shape", "gradient_shape",
                           (kind, _polarity(start, background)), numbers, {"fill_angle": 360 / 45}, draw)


def _icon(rng, number: int, transparent: bool = False) -> LowTextureImage:
    """Two to five glyphs (dot, ring, plus, bar) in the cells of a 3x3 grid, on a plain background;
    when `transparent`, on a transparent one (an RGBA PNG, as icon sets come: it is seen, and
    trained on, flattened onto white)."""
    cells = ["" for _ in range(9)]
    for cell in rng.choice(9, size=int(rng.integers(2, 6)), replace=False):
        cells[int(cell)] = GLYPHS[int(rng.integers(len(GLYPHS)))]
    ink, paper = _colour_pair(rng)
    while transparent and _luma(ink) > 255 - MIN_CONTRAST:  # the ink stands out of white
        ink, _ = _colour_pair(rng)
    numbers = {}

    def draw() -> Image.Image:
        background = (255, 255, 255, 0) if transparent else tuple(int(v) for v in paper)
        image = Image.new("RGBA" if transparent else "RGB", (SIDE, SIDE), background)
        pen = ImageDraw.Draw(image)
        colour = tuple(int(v) for v in ink) + ((255,) if transparent else ())
        cell_side = SIDE / 3
        for k, glyph in enumerate(cells):
            x, y = (k % 3 + 0.5) * cell_side, (k // 3 + 0.5) * cell_side
            r = 0.32 * cell_side
            if glyph == "dot":
                pen.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            elif glyph == "ring":
                pen.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=max(3, round(r / 3)))
            elif glyph == "plus":
                pen.rectangle((x - r, y - r / 4, x + r, y + r / 4), fill=colour)
                pen.rectangle((x - r / 4, y - r, x + r / 4, y + r), fill=colour)
            elif glyph == "bar":
                pen.rectangle((x - r, y - r / 3, x + r, y + r / 3), fill=colour)
        return image

    family = "transparent_icons" if transparent else "icons"
    polarity = "dark_on_light" if transparent else _polarity(ink, paper)
    return LowTextureImage(f"{family}_{number:04d}", family, family, (*cells, polarity), numbers, {}, draw)


def _scan(rng, number: int) -> LowTextureImage:
    """A scanned page: light paper with a little grain, a few dark text lines (bars), saved as JPEG."""
    n_lines = int(rng.integers(3, 11))
    top = float(rng.uniform(0.08, 0.3))
    spacing = (0.92 - top) / n_lines
    lengths = rng.uniform(0.2, 0.84, n_lines)
    paper = rng.uniform(215, 255)
    ink = rng.uniform(0, paper - 2 * MIN_CONTRAST)
    grain_seed = int(rng.integers(2**31))
    numbers = {"top": top / PLACE_STEP}
    numbers |= {f"line_{k}": length / 0.2 for k, length in enumerate(lengths)}

    def draw() -> Image.Image:
        page = np.full((SIDE, SIDE), paper)
        for k, length in enumerate(lengths):
            y = round((top + k * spacing) * SIDE)
            page[y:y + max(3, round(spacing * SIDE * 0.45)), round(0.08 * SIDE):round((0.08 + length) * SIDE)] = ink
        page += np.random.default_rng(grain_seed).normal(0, 4, page.shape)
        return _to_image(np.repeat(page[..., None], 3, axis=2))

    return LowTextureImage(f"scan_{number:04d}", "scan", "scan", (n_lines,), numbers, {}, draw, fmt="JPEG")


_MAKERS = {"stripes": _stripes, "gradient_shape": _gradient_shape, "icons": _icon, "scan": _scan,
           "transparent_icons": lambda rng, number: _icon(rng, number, transparent=True)}


def _draw_distinct(make: Callable[[int], LowTextureImage], count: int,
                   drawn: list[LowTextureImage] = ()) -> list[LowTextureImage]:
    """`count` images from `make`, each distinct (as `distinct` says) from all before it and
    from `drawn`, redrawn until it is. Numbers are compared per family and kind, vectorised."""
    by_kind: dict[tuple, np.ndarray] = {}

    def key(image):
        return image.family, image.kind

    def vector(image):
        return np.array([image.numbers[name] for name in sorted(image.numbers)], dtype=np.float64)

    def periods(image):
        return np.array([image.periods.get(name, 0.0) for name in sorted(image.numbers)])

    def add(image):
        row = vector(image)[None]
        by_kind[key(image)] = np.vstack([by_kind[key(image)], row]) if key(image) in by_kind else row

    for image in drawn:
        add(image)
    chosen: list[LowTextureImage] = []
    attempts = 0
    while len(chosen) < count:
        attempts += 1
        if attempts > 200 * count:
            raise RuntimeError(f"could not draw {count} distinct images (got {len(chosen)})")
        candidate = make(len(chosen))
        earlier = by_kind.get(key(candidate))
        if earlier is not None:
            gaps = np.abs(earlier - vector(candidate))
            period = periods(candidate)
            wrapped = np.where(period > 0, np.minimum(gaps % np.where(period > 0, period, 1),
                                                      period - gaps % np.where(period > 0, period, 1)), gaps)
            if not (wrapped >= 1).any(axis=1).all():
                continue
        add(candidate)
        chosen.append(candidate)
    return chosen


def shapes_in_three_classes(per_class: int = 300, seed: int = 0) -> list[LowTextureImage]:
    """Circles, squares and triangles (the labels), `per_class` each: random colour, size and
    place on plain, gradient or noise backgrounds."""
    images = []
    for k, kind in enumerate(SHAPES):
        rng = np.random.default_rng([seed, k])
        images += _draw_distinct(lambda number, rng=rng, kind=kind: _shape(rng, number, kind), per_class)
    return images


def low_texture_set(per_class: int = 300, per_other: int = 60, seed: int = 0) -> list[LowTextureImage]:
    """The three shape classes and `per_other` images of each other family (stripes, gradient
    shapes, icons, scans, transparent icons), 1,200 images by default, labelled by shape or family."""
    images = shapes_in_three_classes(per_class, seed)
    for k, family in enumerate(OTHER_FAMILIES, start=len(SHAPES)):
        rng = np.random.default_rng([seed, k])
        images += _draw_distinct(lambda number, rng=rng, make=_MAKERS[family]: make(rng, number), per_other, images)
    return images


def write_images(images: list[LowTextureImage], folder: Path | str) -> list[tuple[str, str]]:
    """Write each image to ``folder/<label>/<name>.png|.jpg``; returns (path, label) in order."""
    written = []
    for image in images:
        path = Path(folder) / image.label / f"{image.name}.{'jpg' if image.fmt == 'JPEG' else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.draw().save(path, format=image.fmt, **({"quality": 90} if image.fmt == "JPEG" else {}))
        written.append((str(path), image.label))
    return written


def write_low_texture_set(folder: Path | str, **options) -> list[tuple[str, str]]:
    """`low_texture_set(**options)` written to `folder` (see write_images)."""
    return write_images(low_texture_set(**options), folder)

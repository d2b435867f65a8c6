"""Bounding boxes for localisation: reading them, following an image through its stages, IoU.

A box is (x0, y0, x1, y1) in pixels of an image, x to the right and y down, continuous
coordinates: a box over the whole W x H image is (0, 0, W, H). Sources give boxes in pixels
of the original file as stored (before its EXIF orientation is applied); preprocessing
applies the orientation and the resize to the box exactly as Pillow applies them to the
pixels, and the split manifest carries it normalised to 0..1 of the final image.
"""

from __future__ import annotations

import csv
import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

BOX_COLUMNS = ["box_x0", "box_y0", "box_x1", "box_y1"]
CSV_HEADER = ["file", "x0", "y0", "x1", "y1"]


class BoxError(ValueError):
    """A box that cannot be used, with where it came from."""


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def scaled(self, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> Box:
        """x -> x * sx + dx, y -> y * sy + dy."""
        return Box(self.x0 * sx + dx, self.y0 * sy + dy, self.x1 * sx + dx, self.y1 * sy + dy)

    def clipped(self, width: float, height: float) -> Box | None:
        """The part inside a width x height image; None when nothing of it is."""
        box = Box(max(0.0, self.x0), max(0.0, self.y0), min(width, self.x1), min(height, self.y1))
        return box if box.width > 0 and box.height > 0 else None

    def normalised(self, width: float, height: float) -> Box:
        return self.scaled(1 / width, 1 / height)


def check_box(box: Box, width: int, height: int, where: str) -> Box:
    """`box` if it is a proper box inside a width x height image, else BoxError naming `where`."""
    values = box.as_tuple()
    if not all(math.isfinite(v) for v in values):
        raise BoxError(f"{where}: box {values} has a coordinate that is not a number")
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise BoxError(f"{where}: box {values} is empty or inverted (needs x0 < x1 and y0 < y1)")
    if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        raise BoxError(f"{where}: box {values} is outside the {width}x{height} image")
    return box


def read_box_csv_header(path: Path | str) -> None:
    """BoxError naming the file unless it starts with the header file,x0,y0,x1,y1."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a header Excel saved with a BOM
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError) as error:
        raise BoxError(f"{path}: cannot read the box file ({error})") from None
    if header is None or [cell.strip() for cell in header] != CSV_HEADER:
        raise BoxError(f"{path}:1: the header must be {','.join(CSV_HEADER)}, found {','.join(header or [])!r}")


def read_box_csv(path: Path | str) -> tuple[dict[str, tuple[Box, str]], list[tuple[str | None, str]]]:
    """A `file,x0,y0,x1,y1` CSV: {file as written: (box, 'path:line')}, and the problems of lines
    that give none, each (the file it names, or None, and a message naming the CSV and line).
    One box per file (a second line for the same file is a problem)."""
    path = Path(path)
    read_box_csv_header(path)
    boxes: dict[str, tuple[Box, str]] = {}
    problems: list[tuple[str | None, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader)
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            if not row or not "".join(row).strip():
                continue
            name = row[0].strip() or None
            if len(row) != 5:
                problems.append((name, f"{where}: expected 5 fields (file,x0,y0,x1,y1), found {len(row)}"))
                continue
            try:
                box = Box(*(float(cell) for cell in row[1:]))
            except ValueError:
                problems.append((name, f"{where}: coordinates {row[1:]} are not all numbers"))
                continue
            if name in boxes:
                problems.append((None, f"{where}: a second box for {name} (first at {boxes[name][1]}); one box "
                                       f"per image"))
                continue
            boxes[name] = (box, where)
    return boxes, problems


def read_voc_box(path: Path | str) -> Box:
    """The one object's box of a Pascal VOC annotation file (pixels; VOC's 1-based corners are
    pixel indices, so xmin 1 is the left edge, 0 here, and xmax 100 the right edge, 100)."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise BoxError(f"{path}: not a readable VOC XML file ({error})") from None
    objects = root.findall("object")
    if len(objects) != 1:
        raise BoxError(f"{path}: {len(objects)} <object> elements; localisation takes one box per image")
    found = objects[0].find("bndbox")
    try:
        corners = [float(found.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
    except (AttributeError, TypeError, ValueError):
        raise BoxError(f"{path}: <bndbox> needs numeric xmin, ymin, xmax and ymax") from None
    # (a 0 where VOC's 1-based corners allow no less, as some tools write them, is the edge)
    return Box(max(0.0, corners[0] - 1), max(0.0, corners[1] - 1), corners[2], corners[3])


# EXIF orientation -> how the stored image is turned upright (what ImageOps.exif_transpose does).
def oriented_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """A box on the stored width x height image, on the image turned upright by its EXIF orientation."""
    w, h = width, height
    x0, y0, x1, y1 = box.as_tuple()
    if orientation in (0, 1):
        return box
    if orientation == 2:  # mirrored left-right
        return Box(w - x1, y0, w - x0, y1)
    if orientation == 3:  # rotated 180
        return Box(w - x1, h - y1, w - x0, h - y0)
    if orientation == 4:  # mirrored top-bottom
        return Box(x0, h - y1, x1, h - y0)
    if orientation == 5:  # transposed: (x, y) -> (y, x)
        return Box(y0, x0, y1, x1)
    if orientation == 6:  # turned 90 degrees clockwise: (x, y) -> (h - y, x)
        return Box(h - y1, x0, h - y0, x1)
    if orientation == 7:  # transversed: (x, y) -> (h - y, w - x)
        return Box(h - y1, w - x1, h - y0, w - x0)
    if orientation == 8:  # turned 90 degrees counter-clockwise: (x, y) -> (y, w - x)
        return Box(y0, w - x1, y1, w - x0)
    raise BoxError(f"EXIF orientation {orientation} is not one of 1-8")


def resized_box(box: Box, width: int, height: int, size: int, mode: str) -> Box | None:
    """A box on an upright width x height image, on that image resized to size x size as
    imgpipe.data.preprocess.resize_image resizes it (stretch, pad, center_crop; the arithmetic of
    Pillow's ImageOps.pad and ImageOps.fit). Clipped to the result; None when the crop cut it away."""
    sx, sy, dx, dy = _resize_transform(width, height, size, mode)
    return box.scaled(sx, sy, dx, dy).clipped(size, size)


def box_on_upright_image(normalised: Box, width: int, height: int, size: int, mode: str) -> Box:
    """The inverse of `resized_box`: a box given as shares of the size x size training image,
    in pixels of the width x height upright image it was made from (what `imgpipe predict`
    reports); a box over a center_crop's edge reaches into the part the crop left out."""
    sx, sy, dx, dy = _resize_transform(width, height, size, mode)
    pixels = normalised.scaled(size, size)
    return pixels.scaled(1 / sx, 1 / sy, -dx / sx, -dy / sy)


def _resize_transform(width: int, height: int, size: int, mode: str) -> tuple[float, float, float, float]:
    """(sx, sy, dx, dy): where resize_image puts a point (x, y) of the upright image: (x sx + dx, y sy + dy)."""
    if mode == "stretch":
        return size / width, size / height, 0.0, 0.0
    if mode == "pad":
        # ImageOps.contain: the long side becomes `size`, the other rounded; then centred.
        if width > height:
            new_w, new_h = size, round(height / width * size)
        elif height > width:
            new_w, new_h = round(width / height * size), size
        else:
            new_w, new_h = size, size
        return new_w / width, new_h / height, float(round((size - new_w) * 0.5)), float(round((size - new_h) * 0.5))
    if mode == "center_crop":
        # ImageOps.fit: the largest centred square, then resized.
        side = float(min(width, height))
        left, top = (width - side) * 0.5, (height - side) * 0.5
        return size / side, size / side, -left * size / side, -top * size / side
    raise ValueError(f"unknown resize mode '{mode}' (stretch, pad, center_crop)")


def iou(a: Box | tuple, b: Box | tuple) -> float:
    """Intersection over union of two boxes (0 when they do not overlap or both are empty)."""
    a = a if isinstance(a, Box) else Box(*a)
    b = b if isinstance(b, Box) else Box(*b)
    inter = Box(max(a.x0, b.x0), max(a.y0, b.y0), min(a.x1, b.x1), min(a.y1, b.y1)).area
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


VOC = "voc"
ORIENTATION_TAG = 0x0112


def is_box_annotation(path: Path, boxes: str | None) -> bool:
    """Whether a file of a folder source is one of its box annotations (a VOC XML file, the box
    CSV kept inside the folder): not an image to import, not part of the crawl's fingerprint."""
    if not boxes:
        return False
    if boxes == VOC:
        return path.suffix.lower() == ".xml"
    return path.resolve() == Path(boxes).resolve()


def box_key(origin: str) -> str:
    """How boxes and images find each other: the absolute path of a file (however the config or
    the CSV spells it: relative, './a.png', absolute), or a synthetic image's origin."""
    return origin if origin.startswith("synthetic:") else os.path.abspath(origin)


TURNING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def upright_size(stored: tuple[int, int, int]) -> tuple[int, int]:
    """Width and height of an image as shown, from its stored (width, height, EXIF orientation)."""
    width, height, orientation = stored
    return (height, width) if orientation in TURNING_ORIENTATIONS else (width, height)


def upright_resized_box(box: Box, stored: tuple[int, int, int], size: int, mode: str, where: str) -> Box | None:
    """`box` (pixels of the file as stored: `stored` is its width, height and EXIF orientation)
    on the training image preprocess makes of the file, normalised to 0..1; None when the crop
    cut it away. BoxError when it does not fit the stored image."""
    width, height, orientation = stored
    check_box(box, width, height, where)
    upright = oriented_box(box, orientation, width, height)
    resized = resized_box(upright, *upright_size(stored), size, mode)
    return resized.normalised(size, size) if resized is not None else None

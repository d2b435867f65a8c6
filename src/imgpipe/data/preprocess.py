"""Preprocess: decoded, oriented, colour-converted and resized images, ready to train on.

Every kept image of a class is written as PNG (lossless, so the training input is
exactly what was computed here). A file that fails to decode now despite having passed the
crawl check is recorded, never passed on; a failure to write the result (a full disk) fails
the job instead, since the image itself is fine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from imgpipe.core.files import error_text, writing
from imgpipe.data.boxes import (
    BOX_COLUMNS,
    ORIENTATION_TAG,
    BoxError,
    box_key,
    upright_resized_box,
)
from imgpipe.data.images import flatten_transparency
from imgpipe.data.sourceboxes import SourceBoxes

log = logging.getLogger(__name__)

PAD_COLORS = {"black": 0, "white": 255}


def to_color(image: Image.Image, color: str) -> Image.Image:
    """Convert to 'L' (grayscale) or 'RGB', flattening any transparency onto white.

    Pillow's plain convert() drops alpha onto black and clips 16-bit data, so both are
    handled explicitly.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit: scale down to 8 bits instead of clipping everything above 255.
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode == "F":
        image = float_to_gray(image)
    target = "L" if color == "grayscale" else "RGB"
    return flatten_transparency(image).convert(target)


def float_to_gray(image: Image.Image) -> Image.Image:
    """A 32-bit float image (scientific TIFF) as 8-bit grayscale.

    Pillow's convert('L') clips floats to 0-255, so data in 0-1 (the usual convention)
    came out black. Data in 0-1 is scaled by 255, data in 0-255 kept, anything else
    stretched from its minimum to its maximum; NaN and infinity become 0.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.where(np.isfinite(scaled), scaled, 0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def resize_image(image: Image.Image, size: int, mode: str, pad_color: str = "black") -> Image.Image:
    """Resize to size x size: 'stretch', 'pad' (letterbox, keep aspect) or 'center_crop'."""
    target = (size, size)
    if mode == "stretch":
        return image.resize(target, Image.Resampling.LANCZOS)
    if mode == "center_crop":
        return ImageOps.fit(image, target, Image.Resampling.LANCZOS)
    if mode == "pad":
        fill = PAD_COLORS[pad_color]
        fill = fill if image.mode == "L" else (fill, fill, fill)
        return ImageOps.pad(image, target, Image.Resampling.LANCZOS, color=fill)
    raise ValueError(f"unknown resize mode '{mode}' (stretch, pad, center_crop)")


def prepare_image(path: Path | str, size: int, color: str, resize: str, pad_color: str = "black") -> Image.Image:
    """Decode one file and return the training-ready image (EXIF orientation applied)."""
    return prepare_image_with_geometry(path, size, color, resize, pad_color)[0]


def prepare_image_with_geometry(path: Path | str, size: int, color: str, resize: str,
                                pad_color: str = "black") -> tuple[Image.Image, tuple[int, int, int]]:
    """`prepare_image`, and from the same decode the file's stored width, height and EXIF
    orientation: what turning its box the way the image turns needs."""
    with Image.open(path) as image:
        image.load()
        stored = (image.size[0], image.size[1], image.getexif().get(ORIENTATION_TAG, 1))
        image = ImageOps.exif_transpose(image)
        return resize_image(to_color(image, color), size, resize, pad_color), stored


def preprocess_class(
    fates: pd.DataFrame,
    class_name: str,
    out_dir: Path,
    size: int,
    color: str,
    resize: str,
    pad_color: str = "black",
    boxes: SourceBoxes | None = None,
) -> pd.DataFrame:
    """Write every kept image of one class to out_dir; return `path,label,group,source_file,status,reason`.

    With `boxes` (imgpipe.data.sourceboxes.source_boxes) the manifest also has
    BOX_COLUMNS, the box on the training image normalised to 0..1 (empty where there is none),
    and box_status (ok, missing, invalid, cut_away: the crop left nothing of it) with box_reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = fates[(fates["class"] == class_name) & (fates["status"] == "kept")]
    rows = []
    for done, record in enumerate(kept.itertuples(index=False), start=1):
        target = out_dir / (Path(record.file).stem + ".png")
        try:
            image, stored = prepare_image_with_geometry(record.file, size, color, resize, pad_color)
        except Exception as error:  # one bad file must not stop the class; it is recorded
            log.warning("could not preprocess %s: %s", record.file, error)
            row = {"path": "", "status": "failed", "reason": error_text(error)}
        else:
            with writing(target):  # a full disk fails the job: the image is fine, and a rerun needs it
                image.save(target)
            row = {"path": str(target), "status": "ok", "reason": ""}
        row |= {"label": class_name, "group": record.group, "source_file": record.file}
        if boxes is not None:
            row |= box_fields(record.origin, stored, boxes, size, resize) if row["status"] == "ok" else {}
        rows.append(row)
        if done % 1000 == 0:
            log.info("%s: %d / %d images preprocessed", class_name, done, len(kept))
    log.info("%s: %d images preprocessed, %d failed", class_name, sum(r["status"] == "ok" for r in rows),
             sum(r["status"] != "ok" for r in rows))
    columns = ["path", "label", "group", "source_file", "status", "reason"]
    if boxes is not None:
        collected = {box_key(origin) for origin in fates.loc[fates["class"] == class_name, "origin"]}
        for key in sorted(set(boxes.boxes) - collected):
            log.warning("%s: a box for %s, which is not among the class's collected images", boxes.boxes[key][1], key)
        columns += BOX_COLUMNS + ["box_status", "box_reason"]
        statuses = pd.Series([row.get("box_status", "") for row in rows]).value_counts()
        log.info("%s: boxes: %s", class_name, ", ".join(f"{count} {status}" for status, count in statuses.items()
                                                         if status) or "none")
    return pd.DataFrame(rows, columns=columns).fillna("")


def box_fields(origin: str, stored: tuple[int, int, int], boxes: SourceBoxes, size: int, resize: str) -> dict:
    """The manifest fields of one image's box (`stored`: its file's width, height and EXIF
    orientation): normalised corners and box_status / box_reason."""
    key = box_key(origin)
    if key in boxes.invalid:
        return {"box_status": "invalid", "box_reason": boxes.invalid[key]}
    if key not in boxes.boxes:
        return {"box_status": "missing", "box_reason": f"no box given for {origin}"}
    box, where = boxes.boxes[key]
    try:
        resized = upright_resized_box(box, stored, size, resize, where)
    except BoxError as error:
        log.warning("%s", error)
        return {"box_status": "invalid", "box_reason": str(error)}
    if resized is None:
        log.warning("%s: the %s crop cuts the box %s away entirely", where, resize, box.as_tuple())
        return {"box_status": "cut_away", "box_reason": f"{where}: the {resize} crop leaves nothing of the box"}
    corners = dict(zip(BOX_COLUMNS, (round(value, 6) for value in resized.as_tuple())))
    return corners | {"box_status": "ok", "box_reason": ""}

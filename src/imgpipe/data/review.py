"""Contact sheets: one page per class to check a crawl by eye in a minute.

Each class gets a self-contained HTML page (thumbnails embedded) and a PNG grid. Kept
images come first, then the dropped ones grouped by reason, each marked with its reason
and detail and linked to the image it duplicates (on this sheet, or on the other class's
sheet for a cross-class copy). URLs that gave no image are listed at the end, with why.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from imgpipe.core.files import writing
from imgpipe.data.dedupe import REASONS
from imgpipe.data.preprocess import to_color

log = logging.getLogger(__name__)

THUMB_PX = 112
GRID_THUMB_PX = 72
MAX_TILES = 3000  # beyond this a page gets slow to open: the rest is counted, not shown
MAX_GRID_TILES = 400
# tile border colours by fate, in the page and the PNG grid
FATE_COLORS = {"kept": "#2e7d32", "excluded": "#6a1b9a", "rejected": "#ef6c00", "corrupt": "#b71c1c"}
DUPLICATE_COLOR = "#1565c0"


def sheet_name(class_name: str) -> str:
    return f"{class_name}.html"


def _fate(row) -> str:
    return "kept" if row.status == "kept" else row.reason


def _color(fate: str) -> str:
    return FATE_COLORS.get(fate, DUPLICATE_COLOR if "duplicate" in fate or "cross_class" in fate else "#616161")


def _ordered_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Kept first (manifest order), then dropped by reason in the order rules apply."""
    rank = {reason: number for number, reason in enumerate(("", *REASONS))}
    order = rows["reason"].map(lambda reason: rank.get(reason, len(rank)))
    return rows.assign(_order=order, _pos=range(len(rows))).sort_values(["_order", "_pos"]).drop(
        columns=["_order", "_pos"])


def thumbnail(path: str, size: int) -> Image.Image | None:
    """An RGB thumbnail as a person sees the image (EXIF orientation applied); None if it does not decode."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size * 2, size * 2))
            image = ImageOps.exif_transpose(image)
            image = to_color(image, "rgb")
            image.thumbnail((size, size))
            if max(image.size) < size // 2:  # tiny images (8x8 digits, icons) are blown up to be seen
                scale = size // max(image.size)
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            return image
    except Exception:  # noqa: BLE001 - corrupt files are on the sheet too, as a blank tile
        return None


def _data_uri(image: Image.Image | None) -> str:
    if image is None:
        return ""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_contact_sheet(fates: pd.DataFrame, class_name: str, html_path: Path | str, png_path: Path | str,
                        exclude_comments: dict[str, str] | None = None) -> dict:
    """Write the class's HTML sheet and PNG grid from the dedupe manifest; returns counts per fate.

    ``exclude_comments`` (exclusion entry -> its comment) puts each hand exclusion's reason
    on its tile.
    """
    exclude_comments = exclude_comments or {}
    rows = fates[fates["class"] == class_name]
    with_file = _ordered_rows(rows[rows["file"] != ""])
    without_file = rows[rows["file"] == ""]
    tile_ids = _tile_ids(fates)
    tile_id = tile_ids.get(class_name, {})
    class_of = dict(zip(fates["file"], fates["class"]))
    counts = {fate: int(count) for fate, count in with_file.apply(_fate, axis=1).value_counts().items()} \
        if len(with_file) else {}

    tiles, shown, drawn, untiled = [], with_file.head(MAX_TILES), set(), []
    for row in shown.itertuples(index=False):
        fate = _fate(row)
        if row.file in drawn:  # the same bytes under another URL: one tile per file, the URL listed below
            untiled.append((row.origin or row.file, fate, f"same bytes as {Path(row.file).name}, shown above"))
            continue
        drawn.add(row.file)
        caption = [f"<b>{html.escape(fate)}</b>"]
        detail = row.detail
        entry = detail.removeprefix("excluded by hand: ") if fate == "excluded" else ""
        if entry and exclude_comments.get(entry):
            detail = f"excluded by hand: {exclude_comments[entry]}"
        if detail:
            caption.append(html.escape(detail))
        if row.duplicate_of:
            other_class = class_of.get(row.duplicate_of, class_name)
            target = tile_ids.get(other_class, {}).get(row.duplicate_of, "")
            href = f"#{target}" if other_class == class_name else f"{quote(sheet_name(other_class))}#{target}"
            distance = "" if pd.isna(row.distance) else f" (distance {int(row.distance)})"
            label = Path(row.duplicate_of).name + ("" if other_class == class_name else f" in {other_class}")
            caption.append(f'of <a href="{html.escape(href)}">{html.escape(label)}</a>{distance}')
        origin = html.escape(row.origin or row.file)
        name = html.escape(Path(row.file).name)
        image = _data_uri(thumbnail(row.file, THUMB_PX))
        picture = f'<img src="{image}" alt="{name}" loading="lazy">' if image else '<div class="blank">no preview</div>'
        tiles.append(
            f'<figure id="{tile_id[row.file]}" style="border-color:{_color(fate)}" title="{origin}">{picture}'
            f'<figcaption>{name}<br>{"<br>".join(caption)}</figcaption></figure>')
    left_out = len(with_file) - len(shown)

    untiled = [(row.origin, row.reason, row.detail) for row in without_file.itertuples(index=False)] + untiled
    failures = "".join(f"<tr><td>{html.escape(origin)}</td><td>{html.escape(fate)}</td><td>{html.escape(why)}</td></tr>"
                       for origin, fate, why in untiled)
    summary = ", ".join(f"{count} {fate}" for fate, count in counts.items())
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(class_name)}: contact sheet</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(class_name)}</h1>"
        f"<p>{len(rows)} URLs or files: {summary or 'no image'}"
        f"{f', {len(without_file)} without an image' if len(without_file) else ''}. Kept images first, then the "
        "dropped ones by reason; a link leads to the image a duplicate was dropped for. To drop an image by hand, "
        "put its sha256 or file path (hover a tile for its URL) in the dedupe.exclude list with a # comment "
        "saying why.</p>"
        + (f"<p><b>{left_out} more images are not shown</b> (at most {MAX_TILES} per page): see the dedupe "
           "manifest.</p>" if left_out else "")
        + f'<div class="tiles">{"".join(tiles)}</div>'
        + (f"<h2>Without a tile of their own ({len(untiled)})</h2><table><tr><th>URL or file</th><th>fate</th>"
           f"<th>why</th></tr>{failures}</table>" if untiled else "")
        + "</body></html>\n"
    )
    with writing(html_path):  # (thumbnails that do not decode are blank tiles; a full disk fails the job)
        Path(html_path).write_text(page, encoding="utf-8")
    _write_grid(with_file.head(MAX_GRID_TILES), class_name, Path(png_path), left_out=len(with_file) - MAX_GRID_TILES)
    log.info("%s: contact sheet of %d images (%s), %d without an image", class_name, len(with_file), summary,
             len(without_file))
    return counts


def _tile_ids(fates: pd.DataFrame) -> dict[str, dict[str, str]]:
    """class -> file -> the id of its tile on that class's sheet, so sheets can link to each other."""
    ids = {}
    for class_name, rows in fates[fates["file"] != ""].groupby("class", sort=False):
        files = _ordered_rows(rows)["file"].drop_duplicates()
        ids[class_name] = {file: f"t{number}" for number, file in enumerate(files)}
    return ids


def _write_grid(rows: pd.DataFrame, class_name: str, path: Path, left_out: int) -> None:
    """A PNG of thumbnails with a border coloured by fate (legend at the top)."""
    columns = 12
    cell = GRID_THUMB_PX + 8
    header = 28
    count = max(1, len(rows))
    grid = Image.new("RGB", (columns * cell, header + cell * ((count + columns - 1) // columns)), "white")
    draw = ImageDraw.Draw(grid)
    legend = f"{class_name}: {len(rows) + max(0, left_out)} images"
    legend += f" ({left_out} not shown)" if left_out > 0 else ""
    legend += " - border: green kept, blue duplicate, purple excluded, orange rejected, red corrupt"
    draw.text((4, 8), legend, fill="black")
    for number, row in enumerate(rows.itertuples(index=False)):
        x, y = (number % columns) * cell, header + (number // columns) * cell
        draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=_color(_fate(row)), width=3)
        image = thumbnail(row.file, GRID_THUMB_PX)
        if image is not None:
            grid.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
    with writing(path):
        grid.save(path)


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 132px; border: 4px solid; border-radius: 4px; padding: 4px; font-size: 11px;
         overflow-wrap: anywhere; }
figure img { display: block; margin: 0 auto 4px; width: 112px; height: 112px; object-fit: contain; }
figure:target { outline: 3px solid #fbc02d; }
.blank { height: 60px; background: #eee; text-align: center; line-height: 60px; color: #777; }
table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
"""

"""Image verification shared by the stages: is this file an image Pillow can fully decode?"""

from __future__ import annotations

import codecs
import types
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from imgpipe.core.files import error_text


def _image_extensions() -> types.MappingProxyType:
    preferred = {
        "JPEG": ".jpg",
        "MPO": ".jpg",  # what Pillow calls many camera and phone JPEGs
        "PNG": ".png",
        "GIF": ".gif",
        "WEBP": ".webp",
        "BMP": ".bmp",
        "DIB": ".bmp",
        "TIFF": ".tif",
        "JPEG2000": ".jp2",
        "ICO": ".ico",
        "PPM": ".ppm",
        "TGA": ".tga",
        "AVIF": ".avif",
    }
    # Every other format Pillow can read gets its first registered extension, so a
    # decodable file never ends up without one.
    for extension, format_name in sorted(Image.registered_extensions().items()):
        preferred.setdefault(format_name, extension)
    return types.MappingProxyType(preferred)


IMAGE_EXTENSIONS = _image_extensions()
"""Pillow format name (``Image.format``) -> file extension, e.g. ``"JPEG"`` -> ``".jpg"``."""


@dataclass(frozen=True)
class ImageCheck:
    """What fully decoding a file showed. ``reason`` is empty exactly when ``ok``.

    Width, height and format are filled in whenever the header could be read, also for
    files whose pixel data turned out to be broken.
    """

    ok: bool
    width: int | None = None
    height: int | None = None
    format: str | None = None
    reason: str = ""


def inspect_image(path: Path | str) -> ImageCheck:
    """Open and fully decode ``path``; bad content gives ``ok=False`` with a reason, never an exception.

    Only file-system errors (missing file, no permission) raise, since they say nothing
    about the content. An image of more than Pillow's ``Image.MAX_IMAGE_PIXELS`` is not decoded.
    The first frame of an animated image is what gets decoded.
    """
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(512)
        if not head:
            return ImageCheck(ok=False, reason="empty file (0 bytes)")
        handle.seek(0)
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as error:
            return ImageCheck(ok=False, reason=f"decompression bomb: {error}")
        except UnidentifiedImageError:
            return ImageCheck(ok=False, reason=f"not an image: {_describe_non_image(head)}")
        except Exception as error:  # Pillow plugins also raise SyntaxError, ValueError, struct.error
            return ImageCheck(ok=False, reason=f"unreadable image header: {error_text(error)}")
        with image:
            width, height = image.size
            found = dict(width=width, height=height, format=image.format)
            limit = Image.MAX_IMAGE_PIXELS
            # Pillow only warns between 1x and 2x its limit and would decode such an
            # image; we reject at 1x, before spending the memory.
            if limit and width * height > limit:
                return ImageCheck(
                    ok=False,
                    reason=f"decompression bomb: {width}x{height} = {width * height} pixels "
                    f"exceeds the limit of {limit} pixels",
                    **found,
                )
            try:
                image.load()
            except Image.DecompressionBombError as error:
                return ImageCheck(ok=False, reason=f"decompression bomb: {error}", **found)
            except OSError as error:
                return ImageCheck(ok=False, reason=f"truncated or corrupt image data: {error}", **found)
            except Exception as error:
                return ImageCheck(ok=False, reason=f"cannot decode image data: {error_text(error)}", **found)
    return ImageCheck(ok=True, **found)


def _describe_non_image(head: bytes) -> str:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG vector graphics (not supported)"
    if text.startswith((b"<?xml", b"<")):
        return "XML/HTML text"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    if b"\x00" in head:
        return "unknown binary format"
    try:
        # incremental, so a multi-byte character cut off at the end of head is fine
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "unknown binary format"
    return "text"


def flatten_transparency(image: Image.Image) -> Image.Image:
    """Any transparency (alpha, or a palette entry or colour key marked transparent) flattened
    onto white, as RGB; a palette image becomes RGB; other images are returned unchanged.

    Shared by preprocessing and by the hashes' and the near-duplicate test's decoding
    (imgpipe.data.hashing), so a
    transparent icon is compared as it is trained on: Pillow's convert() would put a black
    shape on black, and every such icon would look the same.
    """
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette entry or colour key marked transparent (PNG tRNS): as alpha, it is
        # flattened onto the background below instead of keeping its colour.
        image = image.convert("RGBA")
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image

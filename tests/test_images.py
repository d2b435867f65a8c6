import io

import pytest
from crawl_server import HTML_PAGE, image_bytes, png_claiming_size, truncated_jpeg
from PIL import Image

from imgpipe.data.images import IMAGE_EXTENSIONS, ImageCheck, inspect_image


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "format, mode, size",
    [("PNG", "RGB", (30, 20)), ("JPEG", "RGB", (16, 48)), ("JPEG", "CMYK", (20, 20)), ("PNG", "I;16", (9, 7))],
)
def test_good_images(tmp_path, format, mode, size):
    color = 40000 if mode == "I;16" else (10, 20, 30, 40)[: len(mode)]
    path = write(tmp_path, "image", image_bytes(format, size, color, mode))
    assert inspect_image(path) == ImageCheck(ok=True, width=size[0], height=size[1], format=format, reason="")


def test_animated_gif_is_ok(tmp_path):
    frames = [Image.new("RGB", (12, 10), color) for color in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    assert inspect_image(tmp_path / "anim.gif") == ImageCheck(True, 12, 10, "GIF")


def test_truncated_jpeg_keeps_its_header_facts(tmp_path):
    check = inspect_image(write(tmp_path, "cut.jpg", truncated_jpeg()))
    assert not check.ok
    assert check.reason.startswith("truncated or corrupt image data")
    assert (check.width, check.height, check.format) == (64, 64, "JPEG")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file (0 bytes)"),
        (HTML_PAGE, "not an image: an HTML page"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "not an image: SVG"),
        (b'<svg width="10" height="10"><rect/></svg>', "not an image: SVG"),
        (b"tank,elephant\n1,2\n", "not an image: text"),
        (b'{"error": "rate limited"}', "not an image: JSON text"),
        (bytes(range(256)) * 4, "not an image: unknown binary format"),
    ],
)
def test_non_images_are_named(tmp_path, data, reason):
    check = inspect_image(write(tmp_path, "file.jpg", data))
    assert not check.ok
    assert check.reason.startswith(reason)
    assert check.width is None and check.format is None


def test_crafted_png_header_is_a_bomb_at_default_limit(tmp_path):
    check = inspect_image(write(tmp_path, "bomb.png", png_claiming_size(100_000, 100_000)))
    assert not check.ok
    assert check.reason.startswith("decompression bomb")


def test_bomb_over_twice_the_limit(tmp_path, monkeypatch):
    """Pillow raises DecompressionBombError (not an OSError) from open()."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    check = inspect_image(write(tmp_path, "big.png", image_bytes("PNG", (20, 20))))
    assert not check.ok
    assert check.reason.startswith("decompression bomb")


def test_bomb_between_one_and_two_times_the_limit(tmp_path, monkeypatch):
    """Pillow only warns here and would decode; we reject."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = write(tmp_path, "big.png", image_bytes("PNG", (12, 12)))
    with pytest.warns(Image.DecompressionBombWarning):
        check = inspect_image(path)
    assert check == ImageCheck(
        ok=False,
        width=12,
        height=12,
        format="PNG",
        reason="decompression bomb: 12x12 = 144 pixels exceeds the limit of 100 pixels",
    )


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        inspect_image(tmp_path / "nope.png")


def test_image_extensions_cover_every_format_with_an_extension():
    assert IMAGE_EXTENSIONS["JPEG"] == ".jpg"
    assert IMAGE_EXTENSIONS["MPO"] == ".jpg"
    assert IMAGE_EXTENSIONS["PNG"] == ".png"
    assert IMAGE_EXTENSIONS["TIFF"] == ".tif"
    assert IMAGE_EXTENSIONS["WEBP"] == ".webp"
    assert set(Image.registered_extensions().values()) <= set(IMAGE_EXTENSIONS)
    # the extension maps back to the format, so a stored file reopens as what it is
    for format_name in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO(image_bytes(format_name))
        assert Image.registered_extensions()[IMAGE_EXTENSIONS[Image.open(buffer).format]] == format_name

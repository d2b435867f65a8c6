import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgpipe.data.preprocess import prepare_image, preprocess_class, resize_image, to_color


def test_exif_orientation_is_applied(tmp_path):
    # A 20x10 landscape image whose EXIF says "rotate 90": upright it is 10x20.
    image = Image.new("RGB", (20, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    upright = prepare_image(path, size=8, color="rgb", resize="stretch")
    with Image.open(path) as raw:
        assert raw.size == (20, 10)
    # pad mode keeps the aspect ratio, so the orientation shows in where the borders are
    padded = prepare_image(path, size=20, color="rgb", resize="pad")
    assert np.asarray(padded)[10, 0].tolist() == [0, 0, 0]  # left border: the image is now tall
    assert np.asarray(padded)[0, 10].max() > 200
    assert upright.size == (8, 8)


def test_alpha_is_flattened_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_color(image, "rgb").getpixel((0, 0)) == (255, 255, 255)
    assert to_color(image, "grayscale").getpixel((0, 0)) == 255


def test_palette_transparency_is_flattened_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert to_color(image, "grayscale").getpixel((0, 0)) == 255


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert to_color(image, "grayscale").getpixel((0, 0)) == 128


@pytest.mark.parametrize("mode", ["stretch", "pad", "center_crop"])
def test_every_resize_mode_gives_a_square(mode):
    image = Image.new("L", (60, 30), 200)
    assert resize_image(image, 16, mode).size == (16, 16)


def test_pad_keeps_aspect_with_the_configured_border_colour():
    image = Image.new("L", (60, 30), 128)
    padded = np.asarray(resize_image(image, 16, "pad", pad_color="white"))
    assert padded[0, 8] == 255 and padded[8, 8] == 128
    cropped = np.asarray(resize_image(image, 16, "center_crop"))
    assert (cropped == 128).all()


def test_preprocess_class_records_a_file_that_fails(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (30, 20), "blue").save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    fates = pd.DataFrame({
        "file": [str(good), str(broken), str(good)],
        "class": ["sky", "sky", "sea"],
        "status": ["kept", "kept", "kept"],
        "group": [str(good), str(broken), str(good)],
    })
    result = preprocess_class(fates, "sky", tmp_path / "out", size=12, color="grayscale", resize="pad")
    assert result["status"].tolist() == ["ok", "failed"]
    assert result.loc[1, "reason"] and result.loc[1, "source_file"] == str(broken)
    with Image.open(result.loc[0, "path"]) as written:
        assert written.size == (12, 12) and written.mode == "L"


def test_a_colour_key_becomes_background_not_its_colour(tmp_path):
    """PNG tRNS on RGB and grayscale images: pixels of the key colour are transparent."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    rgb[2:] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "key.png", transparency=(255, 0, 0))
    gray = np.full((4, 4), 7, np.uint8)
    gray[2:] = 200
    Image.fromarray(gray).save(tmp_path / "key_gray.png", transparency=7)
    with Image.open(tmp_path / "key.png") as image:
        converted = np.asarray(to_color(image, "rgb"))
    assert converted[0, 0].tolist() == [255, 255, 255] and converted[3, 0].tolist() == [0, 0, 255]
    with Image.open(tmp_path / "key_gray.png") as image:
        assert np.asarray(to_color(image, "grayscale"))[:, 0].tolist() == [255, 255, 200, 200]


@pytest.mark.parametrize("values, expected", [
    (np.array([[0.0, 0.5], [1.0, 0.25]]), [[0, 128], [255, 64]]),  # 0-1: the usual float convention
    (np.array([[0.0, 100.0], [255.0, 50.0]]), [[0, 100], [255, 50]]),  # already 0-255
    (np.array([[-1.0, 0.0], [3.0, np.nan]]), [[0, 64], [255, 0]]),  # any other range: stretched; NaN -> 0
])
def test_a_float_tiff_is_scaled_not_clipped_to_black(tmp_path, values, expected):
    Image.fromarray(values.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as image:
        assert np.asarray(to_color(image, "grayscale")).tolist() == expected

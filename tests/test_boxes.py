"""Boxes: reading them, following EXIF orientation and every resize mode, IoU."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgpipe.data.boxes import Box, BoxError, check_box, iou, oriented_box, read_box_csv, read_voc_box, resized_box
from imgpipe.data.preprocess import resize_image


def bright_box(image: Image.Image) -> Box:
    """The box around the pixels brighter than half (a white rectangle on black)."""
    values = np.asarray(image.convert("L"), dtype=float)
    rows, cols = np.nonzero(values > 127)
    return Box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def rectangle_image(width: int, height: int, box: Box) -> Image.Image:
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[int(box.y0):int(box.y1), int(box.x0):int(box.x1)] = 255
    return Image.fromarray(pixels, "L")


@pytest.mark.parametrize("mode, expected", [
    # 200x100, box (50, 25)-(150, 75), to 40x40, by hand:
    ("stretch", (10, 10, 30, 30)),      # x * 40/200, y * 40/100
    ("pad", (10, 15, 30, 25)),          # scaled to 40x20 (x 0.2), 10 px of padding above
    ("center_crop", (0, 10, 40, 30)),   # the 100x100 square from x = 50, x 0.4
])
def test_resized_boxes_by_hand(mode, expected):
    assert resized_box(Box(50, 25, 150, 75), 200, 100, 40, mode).as_tuple() == pytest.approx(expected)


def test_center_crop_clips_a_box_it_cuts_and_reports_one_it_cuts_away():
    # 200x100 to 50: the crop keeps x 50..150
    assert resized_box(Box(20, 10, 80, 90), 200, 100, 50, "center_crop").as_tuple() == pytest.approx((0, 5, 15, 45))
    assert resized_box(Box(0, 10, 40, 90), 200, 100, 50, "center_crop") is None
    # tall images crop top and bottom
    assert resized_box(Box(10, 0, 50, 30), 60, 120, 30, "center_crop") is None
    assert resized_box(Box(10, 40, 50, 80), 60, 120, 30, "center_crop").as_tuple() == pytest.approx((5, 5, 25, 25))


@pytest.mark.parametrize("mode", ["stretch", "pad", "center_crop"])
@pytest.mark.parametrize("width, height", [(300, 180), (180, 300), (211, 97), (128, 128)])
def test_resized_boxes_match_the_pixels_pillow_resizes(mode, width, height):
    box = Box(round(width * 0.3), round(height * 0.35), round(width * 0.7), round(height * 0.8))
    resized = resize_image(rectangle_image(width, height, box), 64, mode)
    predicted = resized_box(box, width, height, 64, mode)
    measured = bright_box(resized)
    assert predicted.as_tuple() == pytest.approx(measured.as_tuple(), abs=1.0), (predicted, measured)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_every_exif_orientation(orientation, tmp_path):
    width, height, box = 120, 70, Box(10, 5, 50, 30)
    path = tmp_path / f"o{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    rectangle_image(width, height, box).save(path, exif=exif)
    with Image.open(path) as stored:
        upright = ImageOps.exif_transpose(stored)
    assert oriented_box(box, orientation, width, height) == bright_box(upright)


def test_hand_computed_orientations():
    box = Box(10, 5, 50, 30)  # on a 120x70 image
    assert oriented_box(box, 6, 120, 70) == Box(40, 10, 65, 50)   # 90 clockwise: x' = 70 - y, y' = x
    assert oriented_box(box, 8, 120, 70) == Box(5, 70, 30, 110)   # 90 counter-clockwise: x' = y, y' = 120 - x
    assert oriented_box(box, 3, 120, 70) == Box(70, 40, 110, 65)
    with pytest.raises(BoxError):
        oriented_box(box, 9, 120, 70)


def test_iou_of_known_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_a_box_csv_names_the_file_and_line_of_each_problem(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("file,x0,y0,x1,y1\na.png,1,2,30,40\nb.png,1,two,3,4\nc.png,1,2,3\na.png,0,0,5,5\n\nd.png,5,5,1,1\n")
    boxes, problems = read_box_csv(path)
    assert boxes["a.png"] == (Box(1, 2, 30, 40), f"{path}:2")
    assert problems == [("b.png", f"{path}:3: coordinates ['1', 'two', '3', '4'] are not all numbers"),
                        ("c.png", f"{path}:4: expected 5 fields (file,x0,y0,x1,y1), found 4"),
                        (None, f"{path}:5: a second box for a.png (first at {path}:2); one box per image")]
    with pytest.raises(BoxError, match="empty or inverted"):
        check_box(boxes["d.png"][0], 100, 100, boxes["d.png"][1])
    with pytest.raises(BoxError, match=f"{path}:2: box .* is outside the 20x20 image"):
        check_box(boxes["a.png"][0], 20, 20, boxes["a.png"][1])
    (tmp_path / "bad.csv").write_text("name,a,b\n")
    with pytest.raises(BoxError, match="bad.csv:1: the header must be file,x0,y0,x1,y1"):
        read_box_csv(tmp_path / "bad.csv")


def test_a_voc_file_gives_its_one_box_in_edge_coordinates(tmp_path):
    voc = tmp_path / "cat.xml"
    voc.write_text("<annotation><size><width>100</width><height>80</height></size><object><name>cat</name>"
                   "<bndbox><xmin>1</xmin><ymin>11</ymin><xmax>50</xmax><ymax>80</ymax></bndbox></object></annotation>")
    assert read_voc_box(voc) == Box(0, 10, 50, 80)
    voc.write_text(voc.read_text().replace("<xmin>1</xmin>", "<xmin>0</xmin>"))  # 0-based, as some tools write
    assert read_voc_box(voc) == Box(0, 10, 50, 80)
    voc.write_text("<annotation><object/><object/></annotation>")
    with pytest.raises(BoxError, match="2 <object> elements"):
        read_voc_box(voc)
    voc.write_text("<annotation><object><bndbox><xmin>a</xmin></bndbox></object></annotation>")
    with pytest.raises(BoxError, match="numeric xmin"):
        read_voc_box(voc)
    voc.write_text("<annotation>")
    with pytest.raises(BoxError, match="not a readable VOC XML"):
        read_voc_box(voc)


def test_synthetic_images_and_boxes_are_the_same_everywhere_and_the_box_holds_the_ink():
    import io

    from imgpipe.data import synthetic

    source = {"synthetic": {"digit": 4, "count": 5, "canvas": 64, "seed": 3}}
    chosen = synthetic.settings(source)
    first, second = synthetic.items(source), synthetic.items(source)
    assert first == second and len(first) == 5
    for origin, item in first:
        box = synthetic.boxes(source)[origin][0]
        assert 0 <= box.x0 < box.x1 <= 64 and 0 <= box.y0 < box.y1 <= 64
        assert synthetic.render(chosen, item) == synthetic.render(chosen, item)
        # The ink is the brightest thing drawn: the box holds the image's brightest pixels.
        pixels = np.asarray(Image.open(io.BytesIO(synthetic.render(chosen, item))).convert("L"), dtype=float)
        ink = pixels >= 200
        inside = np.zeros_like(ink)
        inside[int(box.y0):int(box.y1), int(box.x0):int(box.x1)] = True
        assert ink[inside].mean() > 5 * max(ink[~inside].mean(), 1e-3)
    other_seed = synthetic.items({"synthetic": {**source["synthetic"], "seed": 4}})
    assert [item for _, item in other_seed] != [item for _, item in first]


@pytest.mark.parametrize("mode", ["stretch", "pad", "center_crop"])
def test_a_box_on_the_training_image_goes_back_onto_the_upright_image(mode):
    from imgpipe.data.boxes import box_on_upright_image

    box = Box(70, 20, 130, 80)  # inside the center crop of a 200x100 image
    resized = resized_box(box, 200, 100, 40, mode)
    back = box_on_upright_image(resized.normalised(40, 40), 200, 100, 40, mode)
    assert back.as_tuple() == pytest.approx(box.as_tuple(), abs=1e-6)


def test_boxes_find_their_images_however_the_paths_are_spelt_and_bad_lines_mark_their_image(tmp_path, monkeypatch):
    from imgpipe.data.boxes import box_key
    from imgpipe.data.sourceboxes import source_boxes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "boxes.csv").write_text(
        "\ufefffile,x0,y0,x1,y1\n"  # saved by Excel, with a byte-order mark
        f"a.png,1,2,3,4\n./b.png,1,2,3,4\n{tmp_path / 'data' / 'c.png'},1,2,3,4\nd.png,1,x,3,4\n./a.png,0,0,1,1\n")
    found = source_boxes([{"folder": "data", "boxes": "data/boxes.csv"}])
    for name in ("data/a.png", "data/b.png", "data/c.png"):
        assert box_key(name) in found.boxes, name
    assert found.boxes[box_key("data/a.png")][0] == Box(1, 2, 3, 4)
    assert "not all numbers" in found.invalid[box_key("data/d.png")]
    assert len(found.problems) == 1 and "a second box for" in found.problems[0]

"""Boxes through the real pipeline: synthetic digits, a box CSV with EXIF-rotated images, VOC files."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_pipeline_e2e import snakemake, write_config

pytestmark = pytest.mark.e2e


def planned(workdir, target) -> dict[str, int]:
    """Rule -> job count of a dry run for `target`."""
    output = snakemake(workdir, "-n", "--cores", "2", target).stdout  # a target must not follow --resources
    if "Nothing to be done" in output:
        return {}
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", output.split("Job stats:", 1)[1],
                                                           re.MULTILINE) if rule != "total"}


def write_rectangles(folder, count, seed, orientation_of_first=1):
    """100x60 noisy images with a white 40x20 rectangle at (20, 10): distinct bytes, a known box."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        pixels = rng.integers(0, 60, (60, 100)).astype(np.uint8)
        pixels[10:30, 20:60] = 255
        exif = Image.Exif()
        exif[0x0112] = orientation_of_first if number == 0 else 1
        Image.fromarray(pixels, "L").convert("RGB").save(folder / f"r{number}.png", exif=exif)


def test_boxes_follow_the_images_into_the_split_manifest(tmp_path, mlflow_template_db):
    workdir = tmp_path
    shutil.copy(mlflow_template_db, workdir / "mlflow.db")
    data = workdir / "data"
    write_rectangles(data / "csv", 5, seed=1, orientation_of_first=6)
    (data / "csv" / "boxes.csv").write_text(
        "file,x0,y0,x1,y1\n" + "".join(f"r{n}.png,20,10,60,30\n" for n in range(4))
        + "r4.png,20,10,160,30\nghost.png,1,1,2,2\nbroken\n")
    write_rectangles(data / "voc", 4, seed=2)
    for number in range(4):
        (data / "voc" / f"r{number}.xml").write_text(
            "<annotation><object><bndbox><xmin>21</xmin><ymin>11</ymin><xmax>60</xmax><ymax>30</ymax>"
            "</bndbox></object></annotation>")
    write_config(workdir, {
        "experiment": "boxes",
        "classes": {"csv": {"sources": [{"folder": "data/csv", "boxes": "data/csv/boxes.csv"}]},
                    "voc": {"sources": [{"folder": "data/voc", "boxes": "voc"}]},
                    "three": {"sources": [{"synthetic": {"digit": 3, "count": 12}}]}},
        "images": {"size": 48, "color": "rgb", "resize": "center_crop"},
        "dedupe": {"near_distance": 0},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 1},
        "models": {"cnn": {"arch": "simple_cnn", "epochs": 1}},
    })
    target = "results/boxes/split/manifest.csv"
    snakemake(workdir, "--cores", "2", target)

    raw = pd.concat(pd.read_csv(workdir / f"results/boxes/raw/{c}.csv") for c in ("csv", "voc"))
    assert len(raw) == 9, "the box CSV and the VOC files are annotations, not images"
    images = pd.read_csv(workdir / "results/boxes/images/csv.csv")
    origin_of = dict(zip(raw["file"], raw["origin"].str.rsplit("/", n=1).str[-1]))
    boxes = images.set_index(images["source_file"].map(origin_of))  # by the name in the user's folder
    # 100x60 -> center crop 60x60 from x = 20 -> 48x48: the box (20, 10)-(60, 30) -> (0, 10/60)-(40/60, 30/60)
    assert boxes.loc["r1.png", ["box_x0", "box_y0", "box_x1", "box_y1"]].tolist() == pytest.approx(
        [0, 1 / 6, 2 / 3, 0.5], abs=1e-6)
    # r0 is stored 100x60 with EXIF orientation 6 (turned clockwise): upright 60x100, box (30, 20)-(50, 60),
    # crop y 20..80 -> (30, 0)-(50, 40) of 60
    assert boxes.loc["r0.png", ["box_x0", "box_y0", "box_x1", "box_y1"]].tolist() == pytest.approx(
        [0.5, 0, 5 / 6, 2 / 3], abs=1e-6)
    assert boxes.loc["r4.png", "box_status"] == "invalid"
    assert "data/csv/boxes.csv:6: box (20.0, 10.0, 160.0, 30.0) is outside the 100x60 image" in \
        boxes.loc["r4.png", "box_reason"]
    log = (workdir / "logs/boxes/preprocess/csv.log").read_text()
    assert "data/csv/boxes.csv:8: expected 5 fields" in log
    assert re.search(r"data/csv/boxes.csv:7: a box for \S*/data/csv/ghost.png, which is not among the class's", log)

    voc = pd.read_csv(workdir / "results/boxes/images/voc.csv")
    assert (voc["box_status"] == "ok").all()
    assert voc[["box_x0", "box_y0", "box_x1", "box_y1"]].iloc[0].tolist() == pytest.approx([0, 1 / 6, 2 / 3, 0.5],
                                                                                         abs=1e-6)

    split = pd.read_csv(workdir / target)
    assert list(split.columns) == ["path", "label", "split", "box_x0", "box_y0", "box_x1", "box_y1", "box_status"]
    synthetic = split[split["label"] == "three"]
    assert len(synthetic) == 12 and (synthetic["box_status"] == "ok").all()
    assert ((synthetic["box_x0"] >= 0) & (synthetic["box_x1"] <= 1) & (synthetic["box_x0"] < synthetic["box_x1"])).all()

    # A user's perturbations: touching the box CSV reruns nothing; fixing a box reruns preprocess
    # of that class (and what follows), never its crawl.
    (data / "csv" / "boxes.csv").touch()
    assert planned(workdir, target) == {}
    (data / "csv" / "boxes.csv").write_text((data / "csv" / "boxes.csv").read_text().replace("160", "59"))
    assert planned(workdir, target) == {"preprocess": 1, "split": 1}

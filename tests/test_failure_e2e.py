"""The real `snakemake` when a disk fills up under a job: the job fails, and the next run
redoes what it left undone instead of saying "Nothing to be done"."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import SmallDisk, write_shape_images
from PIL import Image
from test_pipeline_e2e import snakemake, workdir, write_config  # noqa: F401 - workdir is a fixture

pytestmark = pytest.mark.e2e
SPLIT = "results/shapes/split/manifest.csv"


def test_a_preprocess_that_fails_on_a_full_disk_is_redone_with_what_follows_it(workdir):
    for seed, kind in enumerate(("bright", "dark")):
        write_shape_images(workdir / "data" / kind, kind, 8, seed=seed)
    config = {
        "experiment": "shapes",
        "classes": {kind: {"sources": [{"folder": f"data/{kind}"}]} for kind in ("bright", "dark")},
        "images": {"size": 32, "color": "grayscale", "resize": "pad"},
        "dedupe": {"near_distance": 0},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 3},
        "models": {"cnn": {"arch": "simple_cnn", "epochs": 1}},
    }
    write_config(workdir, config)
    disk = SmallDisk(workdir / "results" / "shapes" / "images", "4m")  # the preprocessed images' own disk
    try:
        snakemake(workdir, "--cores", "2", SPLIT)

        # a new image size reruns preprocess, which finds the disk full: removing the old images
        # (Snakemake does, before it runs the job) frees less than the larger new ones need
        write_config(workdir, config | {"images": {**config["images"], "size": 128}})
        disk.fill()
        failed = snakemake(workdir, "--cores", "2", SPLIT, check=False)
        assert failed.returncode != 0
        assert "no space left on device writing results/shapes/images/" in failed.stderr

        (disk.path / "filler").unlink()
        plan = snakemake(workdir, "-n", SPLIT).stdout
        assert "Nothing to be done" not in plan  # the old split was kept, but it is not taken as current
        assert "split" in plan and "preprocess" in plan
        snakemake(workdir, "--cores", "2", SPLIT)
        split = pd.read_csv(workdir / SPLIT)
        with Image.open(workdir / split.loc[0, "path"]) as image:
            assert image.size == (128, 128)
        for kind in ("bright", "dark"):  # no image was recorded as failed: the job was
            assert set(pd.read_csv(workdir / f"results/shapes/images/{kind}.csv")["status"]) == {"ok"}
    finally:
        disk.unmount()

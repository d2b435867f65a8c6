"""Shared fixtures: a per-test MLflow store, small real images, offline guards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing in tests may try the internet: pretrained-weight downloads fail fast instead."""
    monkeypatch.setenv("IMGPIPE_OFFLINE", "1")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An already-created MLflow SQLite store (creating one costs seconds; copying it, milliseconds)."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    # The store records its Default experiment's artifact folder as ./mlruns of the folder it
    # is created in: created here, runs of tests that use that experiment never write into
    # the checkout's own mlruns/.
    cwd = Path.cwd()
    os.chdir(path.parent)
    try:
        mlflow.set_tracking_uri(f"sqlite:///{path}")
        MlflowClient().search_experiments()
        mlflow.set_tracking_uri(None)
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, mlflow_template_db) -> str:
    """A fresh MLflow store for one test, exported the way the pipeline reads it."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    # New experiments keep their artifacts in ./mlruns of the working directory: the test's
    # folder, not the checkout.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "IMGPIPE_MLFLOW_PARENT_RUN_ID",
                 "IMGPIPE_MLFLOW_INVOCATION_TAGS", "IMGPIPE_MLFLOW_RECORDS"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)  # a process-wide URI would override the variable
    # Each pipeline job is a fresh process; in one test process, forget the previous
    # test's active experiment, which lives in another store.
    mlflow.tracking.fluent._active_experiment_id = None
    yield uri
    from imgpipe.tracking import invocation

    if invocation._record_publisher is not None:  # a test that never ended its invocation
        invocation._record_publisher.stop()
        invocation._record_publisher = None
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def reordered(value):
    """The same config with every mapping's keys in reverse order, as a re-saving editor might."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


def write_shape_images(folder: Path, kind: str, count: int, size: int = 48, seed: int = 0) -> list[Path]:
    """`count` distinct, learnable images: 'bright' discs on dark or 'dark' bars on light, jittered."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[:size, :size]
    for index in range(count):
        noise = rng.integers(0, 60, (size, size))
        cx, cy, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [int(rng.integers(size // 6, size // 3))]
        if kind == "bright":
            array = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 230, 20) + noise
        else:
            offset = int(rng.integers(0, size // 2))
            array = np.where((xx + offset) % (size // 2) < size // 6, 10, 200) + noise
        path = folder / f"{kind}_{index:03d}.png"
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L").convert("RGB").save(path)
        paths.append(path)
    return paths


def make_shapes_manifest(root: Path, per_class: int = 40, size: int = 32, counts: dict | None = None) -> Path:
    """A split manifest of preprocessed 'bright' and 'dark' shape images (grayscale, size x size)."""
    import pandas as pd

    from imgpipe.data.preprocess import prepare_image
    from imgpipe.data.split import stratified_group_split, write_manifest

    rows = []
    for seed, kind in enumerate(("bright", "dark")):
        for path in write_shape_images(root / "raw" / kind, kind, (counts or {}).get(kind, per_class), seed=seed):
            target = root / "images" / kind / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            prepare_image(path, size, "grayscale", "stretch").save(target)
            rows.append((str(target), kind, str(target)))
    path = root / "manifest.csv"
    write_manifest(stratified_group_split(pd.DataFrame(rows, columns=["path", "label", "group"]),
                                          {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0), path)
    return path


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory) -> Path:
    return make_shapes_manifest(tmp_path_factory.mktemp("shapes"))


def model_settings(**overrides) -> dict:
    """A model entry as the pipeline passes it to training: validated, defaults filled."""
    from imgpipe.config.schema import load_schema
    from imgpipe.config.validation import validate_config

    config = {"experiment": "x", "classes": {"a": {"sources": [{"digits": 1}]}, "b": {"sources": [{"digits": 2}]}},
              "images": {"size": 32}, "crawl": {"min_size": 8}, "models": {"m": {"arch": "simple_cnn", "seed": 5, "device": "cpu", **overrides}}}
    return validate_config(config, load_schema(REPO / "workflow/schemas/config.schema.yaml"))["models"]["m"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium, installed with apt-get where it is missing and we are root
    (a fresh CI machine). Without it, and without root to install it, the test fails saying so."""
    import os
    import subprocess

    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("headless Chromium is needed to check the HTML report: install Debian's `chromium` package")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return shutil.which("chromium")


class SmallDisk:
    """A real, small file system (tmpfs) mounted on a folder, to run out of space or be made
    read-only for real: what a full or failing disk does to a job cannot be faked by a mock."""

    def __init__(self, path: Path, size: str):
        import os
        import subprocess

        if os.geteuid() != 0:
            pytest.fail("mounting a small tmpfs to fill up needs root: run the tests as root (as CI does)")
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
        self.path = path

    def fill(self) -> None:
        """Write a file until the disk refuses another byte."""
        import errno

        with open(self.path / "filler", "ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
        assert shutil.disk_usage(self.path).free == 0

    def make_read_only(self) -> None:
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        import subprocess

        subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path) -> SmallDisk:
    disk = SmallDisk(tmp_path / "small-disk", "4m")  # room for an MLflow store (about 1 MB)
    yield disk
    disk.unmount()

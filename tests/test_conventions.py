"""What keeps the conda environment and the package's dependencies from drifting apart."""

import tomllib
import yaml
from conftest import REPO


def test_the_conda_environment_has_the_packages_dependencies():
    # Snakemake builds envs/imgpipe.yaml from a copy, where `pip install -e ..` cannot work,
    # so the environment lists the dependencies itself: they must be pyproject's.
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    environment = yaml.safe_load((REPO / "envs" / "imgpipe.yaml").read_text())
    pip = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))

    assert [requirement.replace(" ", "") for requirement in pip] == [d.replace(" ", "") for d in declared]


def test_the_dag_picture_names_the_class_or_model_of_every_job(tmp_path):
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    dot = subprocess.run([snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--dag"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    labels = re.findall(r'label = "([^"]+)"', dot)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for model in config["models"]:
        assert f"train\\nmodel: {model}" in labels
        assert f"evaluate\\nevaluated: {model}" in labels
    assert sum(label.startswith("crawl\\ncls: ") for label in labels) == len(config["classes"])

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

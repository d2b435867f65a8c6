"""The cluster profiles build the default experiment's DAG with the resources they promise.

A dry run: nothing is submitted. profiles/slurm runs for real in tests/test_slurm_e2e.py;
profiles/kubernetes has no cluster here, so this is all that checks it.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
MODEL_RULES = ("train", "evaluate")


def dry_run(tmp_path: Path, profile: str) -> dict[str, list[str]]:
    """rule -> the resources line of each of its planned jobs."""
    result = subprocess.run(
        [SNAKEMAKE, "-n", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "config.yaml"), "--profile", str(REPO / "profiles" / profile)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
             "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=rule \w+:)", result.stdout):
        rule = re.match(r"rule (\w+):", block.strip())
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if rule and resources:
            jobs.setdefault(rule.group(1), []).append(resources.group(1))
    return jobs


@pytest.mark.parametrize("profile, gpu_resources", [
    ("slurm", {"gpu=1"}),
    ("kubernetes", {"gpu=1", "gpu_manufacturer=nvidia"}),
])
def test_a_cluster_profile_gives_the_model_rules_a_gpu_and_every_rule_its_resources(tmp_path, profile,
                                                                                    gpu_resources):
    jobs = dry_run(tmp_path, profile)

    assert {rule: len(lines) for rule, lines in jobs.items()} == {
        "crawl": 10, "dedupe": 1, "review": 1, "preprocess": 10, "split": 1, "train": 2, "evaluate": 2, "report": 1,
        "all": 1}
    for rule, lines in jobs.items():
        for line in lines:
            resources = set(line.split(", "))
            # (no GPU here: without the profile the Snakefile would give them gpu=0)
            assert (gpu_resources <= resources) == (rule in MODEL_RULES), (rule, line)
            assert "runtime=720" in resources if rule == "train" else "runtime=720" not in resources
    assert all("mem_mb=8000" in line for line in jobs["train"])

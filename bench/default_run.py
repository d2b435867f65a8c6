"""Wall time of the default pipeline from nothing, and what it reached. Prints JSON.

    python bench/default_run.py [--cores 8] [--keep DIR]

Runs the real `snakemake` with the repository's Snakefile and default config in a fresh
working directory (so nothing is reused), then reads the per-job benchmark files and the
test metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="imgpipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    started = time.perf_counter()
    result = subprocess.run([snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                             "--cores", str(args.cores), "--resources", "gpu=1"],
                            cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"snakemake failed in {workdir}:\n{result.stderr[-5000:]}")
    jobs = {}
    for tsv in sorted((workdir / "benchmarks" / "digits").rglob("*.tsv")):
        jobs[str(tsv.relative_to(workdir / "benchmarks" / "digits").with_suffix(""))] = float(
            pd.read_csv(tsv, sep="\t")["s"].iloc[0])
    models = {}
    for metrics_file in sorted((workdir / "results" / "digits" / "eval").glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text()) | json.loads(metrics_file.with_name("speed.json").read_text())
        models[metrics["model"]] = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc",
                                                            "n_test", "train_seconds", "best_epoch",
                                                            "inference_ms_per_image", "n_parameters")}
    print(json.dumps({
        "command": f"snakemake --cores {args.cores} --resources gpu=1 (default config, fresh directory)",
        "wall_seconds": round(wall, 1),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "job_seconds": {name: round(seconds, 1) for name, seconds in jobs.items()},
        "models": models,
        "workdir": str(workdir),
    }, indent=2))


if __name__ == "__main__":
    main()

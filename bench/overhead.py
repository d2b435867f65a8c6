"""Fixed costs of the default run's jobs, and of an up-to-date dry run. Prints JSON.

    python bench/overhead.py [--keep DIR]

1. Runs the default pipeline from nothing (bench/default_run.py; or reuses DIR if it holds
   a finished run) and takes each job's wall time from Snakemake's benchmark files.
2. For each stage, the floor of what a job pays before and after its work, measured alone
   (median of 3 fresh processes): the interpreter with the stage script's own imports (read
   from workflow/scripts/<stage>.py), and those plus the job's MLflow run as the script opens
   it: a record written for the invocation to publish (data jobs, imgpipe.tracking.records), or a
   run opened and closed on a copy of the run's store (train, evaluate). Snakemake's script
   preamble comes on top of it.
3. `snakemake -n` on the finished, up-to-date folder: seconds, median of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from imgpipe.tracking.records import INVOCATION_FILE, RECORDS_ENV

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
STAGES = ["crawl", "dedupe", "review", "preprocess", "split", "train", "evaluate", "report"]
REPEATS = 3


def script_imports(stage: str) -> str:
    """The import statements at the top level of the stage's script (multi-line ones joined)."""
    lines, pending = [], ""
    for line in (REPO / "workflow" / "scripts" / f"{stage}.py").read_text().splitlines():
        if pending or re.match(r"(import|from) \S", line):
            pending += line + "\n"
            if pending.count("(") == pending.count(")"):
                lines.append(pending)
                pending = ""
    return "".join(lines)


def seconds_of(code: str, env: dict, cwd: Path) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], env=env, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 2)


def job_walls(workdir: Path) -> dict[str, list[float]]:
    walls: dict[str, list[float]] = {}
    for tsv in sorted((workdir / "benchmarks" / "digits").rglob("*.tsv")):
        stage = tsv.relative_to(workdir / "benchmarks" / "digits").parts[0].removesuffix(".tsv")
        walls.setdefault(stage, []).append(float(pd.read_csv(tsv, sep="\t")["s"].iloc[0]))
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="a default run's folder (made there if it holds none)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="imgpipe-overhead-"))
    if not (workdir / "results" / "digits" / "report" / "summary.json").exists():
        subprocess.run([PYTHON, str(REPO / "bench" / "default_run.py"), "--keep", str(workdir)], check=True,
                       stdout=subprocess.DEVNULL)
    walls = job_walls(workdir)

    store = Path(tempfile.mkdtemp(prefix="imgpipe-overhead-store-"))
    shutil.copy(workdir / "mlflow.db", store / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "overhead"}
    interpreter = seconds_of("pass", env, store)
    stages = {}
    records = store / "records"
    records.mkdir()
    (records / INVOCATION_FILE).write_text("{}")  # what makes a job write its record there
    record_env = env | {RECORDS_ENV: str(records)}
    for stage in STAGES:
        imports = script_imports(stage)
        if "data_job_run" in imports:
            floor = seconds_of(imports + "with data_job_run('overhead', {}):\n    pass\n", record_env, store)
        elif "job_run" in imports:
            floor = seconds_of(imports + "with job_run('overhead', {}):\n    pass\n", env, store)
        else:
            floor = None
        stages[stage] = {
            "jobs": len(walls.get(stage, [])),
            "job_wall_median_s": round(statistics.median(walls[stage]), 2) if stage in walls else None,
            "imports_s": seconds_of(imports, env, store),
            "imports_and_mlflow_run_s": floor,
        }
    shutil.rmtree(store, ignore_errors=True)

    dry = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = subprocess.run([SNAKEMAKE, "-n", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                                 "--cores", "8", "--resources", "gpu=1"], cwd=workdir, capture_output=True, text=True)
        dry.append(time.perf_counter() - started)
        if "Nothing to be done" not in result.stdout + result.stderr:
            sys.exit(f"{workdir} is not up to date: the dry run plans jobs")
    print(json.dumps({"cpu_count": os.cpu_count(), "workdir": str(workdir), "python_alone_s": interpreter,
                      "stages": stages, "up_to_date_dry_run_s": round(statistics.median(dry), 2),
                      "up_to_date_dry_run_all_s": [round(s, 2) for s in dry]}, indent=1))


if __name__ == "__main__":
    main()

"""What validating a config costs at DAG build (every job's Snakemake parses the Snakefile again). Prints JSON.

    python bench/config_validation.py [--repeats 5]

For the default config and for one with a URL list, an engine and a synthetic source: the
wall time of a fresh process that imports imgpipe.config.validation and validates the config (median of
`repeats`) as the main Snakemake process does (`_validate_s`) and as a job's own Snakemake
does (`_validate_job_s`, thorough=False), and of a bare interpreter. Run it with
PYTHONPATH=<another checkout>/src to compare two versions of imgpipe.config.validation (one without
`thorough` validates fully in both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VALIDATE = """
import inspect, sys, yaml
from imgpipe.config.schema import load_schema
from imgpipe.config.validation import validate_config
config = yaml.safe_load(open(sys.argv[1]))
has_thorough = "thorough" in inspect.signature(validate_config).parameters
job = {"thorough": False} if sys.argv[4] == "job" and has_thorough else {}
validate_config(config, load_schema(sys.argv[2]), sys.argv[3], **job)
"""

WEB_CONFIG = """
experiment: web
classes:
  cat: {sources: [{urls: cats.txt}, {engine: bing, queries: [cat, tabby cat]}]}
  dog: {sources: [{synthetic: {digit: 2}}, {greedy: "https://example.com/dogs/"}]}
models: {cnn: {arch: simple_cnn}}
"""


def median_wall(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    schema = str(REPO / "workflow/schemas/config.schema.yaml")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "cats.txt").write_text("# cats\nhttps://example.com/a.jpg\n")
        (folder / "web.yaml").write_text(WEB_CONFIG)
        configs = {"default": (REPO / "config/config.yaml", REPO), "web": (folder / "web.yaml", folder)}
        figures = {"python": sys.version.split()[0], "repeats": args.repeats,
                   "bare_interpreter_s": median_wall([sys.executable, "-c", "pass"], args.repeats)}
        for name, (config, base_dir) in configs.items():
            for process, suffix in (("main", ""), ("job", "_job")):
                figures[f"{name}_validate{suffix}_s"] = median_wall(
                    [sys.executable, "-c", VALIDATE, str(config), schema, str(base_dir), process], args.repeats)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

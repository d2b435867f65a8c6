"""What link loops in a folder source cost the DAG build and the crawl's listing. Prints JSON.

    python bench/folder_links.py [--files 13] [--timeout 60]

For 0, 1 and 2 `loop -> .` style links in a folder of `--files` images: the entries the
folder walk lists and its seconds, for the walk before (os.walk with followlinks=True, as
imgpipe.core.files.walk_files was: run in a child process, stopped after --timeout seconds) and
now (imgpipe.core.files.walk_folder), and `snakemake -n` on a config with that folder as a source.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from imgpipe.core.files import walk_folder

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
OS_WALK = """
import os, sys
count = 0
for root, _dirs, names in os.walk(sys.argv[1], followlinks=True):
    count += len(names)
print(count)
"""


def make_folder(root: Path, files: int, loops: int) -> Path:
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for number in range(files):
        (folder / f"{number:03d}.jpg").write_bytes(b"\xff\xd8 not decoded here %d" % number)
    if loops >= 1:
        (folder / "loop").symlink_to(".")
    if loops >= 2:
        (folder / "sub" / "up").symlink_to("..")
    return folder


def timed(command: list[str], timeout: float, cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return round(time.perf_counter() - started, 2), "timeout"
    return round(time.perf_counter() - started, 2), done.stdout.strip() if done.returncode == 0 else done.stderr[-300:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=13)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    results = []
    for loops in (0, 1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            folder = make_folder(root, args.files, loops)
            before_s, before_files = timed([sys.executable, "-c", OS_WALK, str(folder)], args.timeout)
            started = time.perf_counter()
            found = walk_folder(folder)
            now_s = round(time.perf_counter() - started, 4)
            (root / "config.yaml").write_text(yaml.safe_dump({
                "experiment": "links", "crawl": {"min_size": 8},
                "classes": {"a": {"sources": [{"folder": "photos"}]}, "b": {"sources": [{"digits": 1}]}},
                "models": {"cnn": {"arch": "simple_cnn", "epochs": 1}}}))
            dry_s, _ = timed([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(root),
                              "--configfile", str(root / "config.yaml"), "-n", "--quiet"], args.timeout, cwd=root)
            results.append({"loops": loops, "files": args.files,
                            "before_os_walk": {"entries": before_files, "seconds": before_s},
                            "now_walk_folder": {"files": sum(not item.status for item in found),
                                                "rows_without_file": sum(bool(item.status) for item in found),
                                                "seconds": now_s},
                            "snakemake_dry_run_seconds": dry_s})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

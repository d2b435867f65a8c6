"""Glue: crawl one class's sources (see imgpipe.crawl)."""

from pathlib import Path

from imgpipe.joblog import configure_logging

configure_logging(snakemake.log[0])

import mlflow

from imgpipe.crawl import crawl_class
from imgpipe.tracking import job_run

class_name = snakemake.wildcards.cls
with job_run(f"crawl {class_name}", tags={"imgpipe.stage": "crawl", "imgpipe.class": class_name}):
    manifest = crawl_class(class_name, snakemake.params.sources, Path(snakemake.output.images))
    manifest.to_csv(snakemake.output.manifest, index=False, lineterminator="\n")
    counts = manifest["status"].value_counts()
    mlflow.log_metrics({f"images_{status}": int(counts.get(status, 0)) for status in ("ok", "corrupt", "failed")})

"""Glue: resize / colour-convert one class's kept images (see imgpipe.preprocess)."""

from pathlib import Path

from imgpipe.joblog import configure_logging

configure_logging(snakemake.log[0])

import mlflow

from imgpipe.manifests import read_dedupe_manifest
from imgpipe.preprocess import preprocess_class
from imgpipe.tracking import job_run

class_name = snakemake.wildcards.cls
with job_run(f"preprocess {class_name}", tags={"imgpipe.stage": "preprocess", "imgpipe.class": class_name}):
    fates = read_dedupe_manifest(snakemake.input[0])
    images = preprocess_class(fates, class_name, Path(snakemake.output.images), snakemake.params.size,
                              snakemake.params.color, snakemake.params.resize, snakemake.params.pad_color)
    images.to_csv(snakemake.output.manifest, index=False, lineterminator="\n")
    mlflow.log_params({k: snakemake.params[k] for k in ("size", "color", "resize", "pad_color")})
    mlflow.log_metrics({"images_ok": int((images["status"] == "ok").sum()),
                        "images_failed": int((images["status"] != "ok").sum())})

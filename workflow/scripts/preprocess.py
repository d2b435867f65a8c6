"""Glue: resize / colour-convert one class's kept images (see imgpipe.preprocess)."""

from pathlib import Path

from imgpipe.joblog import configure_logging

configure_logging(snakemake.log[0])


from imgpipe.manifests import read_dedupe_manifest
from imgpipe.preprocess import preprocess_class
from imgpipe.jobrecords import data_job_run

class_name = snakemake.wildcards.cls
with data_job_run(f"preprocess {class_name}", tags={"imgpipe.stage": "preprocess", "imgpipe.class": class_name}) as run:
    fates = read_dedupe_manifest(snakemake.input[0])
    images = preprocess_class(fates, class_name, Path(snakemake.output.images), snakemake.params.size,
                              snakemake.params.color, snakemake.params.resize, snakemake.params.pad_color)
    images.to_csv(snakemake.output.manifest, index=False, lineterminator="\n")
    run.log_params({k: snakemake.params[k] for k in ("size", "color", "resize", "pad_color")})
    run.log_metrics({"images_ok": int((images["status"] == "ok").sum()),
                        "images_failed": int((images["status"] != "ok").sum())})

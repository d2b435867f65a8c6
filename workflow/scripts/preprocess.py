"""Glue: resize / colour-convert one class's kept images, and their boxes (see imgpipe.data.preprocess)."""

import logging
from pathlib import Path

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

from imgpipe.core.manifests import read_dedupe_manifest
from imgpipe.data.preprocess import preprocess_class
from imgpipe.data.sourceboxes import source_boxes
from imgpipe.tracking.records import data_job_run

class_name = snakemake.wildcards.cls
with data_job_run(f"preprocess {class_name}", tags={"imgpipe.stage": "preprocess", "imgpipe.class": class_name}) as run:
    boxes = None
    if snakemake.params.boxes:
        boxes = source_boxes(snakemake.params.boxes)
        for problem in boxes.problems + list(boxes.invalid.values()):  # the images stay; box_status says why
            logging.getLogger("imgpipe.data.boxes").warning("%s", problem)
        run.log_metric("box_file_problems", len(boxes.problems) + len(boxes.invalid))
    fates = read_dedupe_manifest(snakemake.input[0])
    images = preprocess_class(fates, class_name, Path(snakemake.output.images), snakemake.params.size,
                              snakemake.params.color, snakemake.params.resize, snakemake.params.pad_color, boxes)
    images.to_csv(snakemake.output.manifest, index=False, lineterminator="\n")
    run.log_params({k: snakemake.params[k] for k in ("size", "color", "resize", "pad_color")})
    run.log_metrics({"images_ok": int((images["status"] == "ok").sum()),
                     "images_failed": int((images["status"] != "ok").sum())})
    if boxes is not None:
        run.log_metrics({f"boxes_{status}": count for status, count in images["box_status"].value_counts().items()
                         if status})

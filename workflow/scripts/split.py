"""Glue: stratified, leak-free train/val/test split (see imgpipe.data.split)."""

import json

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

import pandas as pd

from imgpipe.core.manifests import read_dedupe_manifest, read_manifest
from imgpipe.data.split import attach_boxes, describe_losses, split_sizes, stratified_group_split, write_manifest
from imgpipe.tracking.records import data_job_run

with data_job_run("split", tags={"imgpipe.stage": "split"}) as run:
    images = pd.concat([read_manifest(path) for path in snakemake.input.images], ignore_index=True)
    losses = describe_losses(read_dedupe_manifest(snakemake.input.dedupe))
    usable = images[images["status"] == "ok"]
    manifest = attach_boxes(stratified_group_split(usable, snakemake.params.ratios, snakemake.params.seed,
                                                   snakemake.params.classes, losses), usable)
    write_manifest(manifest, snakemake.output.manifest)
    sizes = split_sizes(manifest)
    with open(snakemake.output.sizes, "w") as handle:
        json.dump(sizes, handle, indent=2)
    run.log_params({**{f"ratio_{k}": v for k, v in snakemake.params.ratios.items()}, "seed": snakemake.params.seed})
    run.log_metrics(sizes)

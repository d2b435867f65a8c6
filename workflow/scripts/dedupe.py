"""Glue: de-duplicate all classes' raw images (see imgpipe.data.dedupe)."""

import json
import logging

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

import pandas as pd

from imgpipe.core.manifests import read_raw_manifest
from imgpipe.data.dedupe import dedupe_images, located_exclusions, near_duplicate_warnings, summarize_fates
from imgpipe.tracking.records import data_job_run
from imgpipe.tracking.tags import flatten

with data_job_run("dedupe", tags={"imgpipe.stage": "dedupe"}) as run:
    raw = pd.concat([read_raw_manifest(path) for path in snakemake.input.manifests], ignore_index=True)
    exclude = located_exclusions(snakemake.params.exclude, snakemake.config["dedupe"]["exclude"])
    fates = dedupe_images(raw, snakemake.params.near_distance, snakemake.params.near_action, exclude,
                          threads=snakemake.threads, near_pixel_difference=snakemake.params.near_pixel_difference)
    for warning in near_duplicate_warnings(fates).values():
        logging.getLogger("imgpipe.data.dedupe").warning(warning)
    fates.to_csv(snakemake.output.manifest, index=False, lineterminator="\n")
    summary = summarize_fates(fates)
    with open(snakemake.output.summary, "w") as handle:
        json.dump(summary, handle, indent=2)
    run.log_params({"near_distance": snakemake.params.near_distance, "near_action": snakemake.params.near_action,
                    "near_pixel_difference": snakemake.params.near_pixel_difference})
    run.log_metrics({k: v for k, v in flatten(summary).items() if isinstance(v, (int, float))})

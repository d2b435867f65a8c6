"""Glue: crawl one class's sources, resuming from its store (see imgpipe.data.crawl)."""

import json
from pathlib import Path

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])


from imgpipe.core.fingerprints import FileHashCache
from imgpipe.data.crawl import crawl_class
from imgpipe.data.crawlstore import CrawlLimits
from imgpipe.tracking.records import data_job_run

class_name = snakemake.wildcards.cls
settings = snakemake.params.settings
with data_job_run(f"crawl {class_name}", tags={"imgpipe.stage": "crawl", "imgpipe.class": class_name}) as run:
    manifest, summary = crawl_class(
        class_name,
        snakemake.params.sources,
        Path(snakemake.output.images),
        snakemake.params.store,
        # timeout_s and time_budget_s are read here, not passed as params: changing them reruns nothing
        limits=CrawlLimits.from_config(snakemake.config["crawl"]),
        target=settings["target"],
        near_distance=settings["near_distance"],
        near_pixel_difference=settings["near_pixel_difference"],
        # the DAG build hashed every local source file already: reuse those hashes, read-only
        file_hashes=FileHashCache(".snakemake/imgpipe/file-hashes.json"),
    )
    manifest.to_csv(snakemake.output.manifest, index=False, lineterminator="\n")
    Path(snakemake.output.summary).write_text(json.dumps(summary, indent=2) + "\n")
    run.set_tag("imgpipe.crawl_outcome", summary["outcome"])
    run.log_params({"target": summary["target"], **{f"limit.{k}": v for k, v in snakemake.config["crawl"].items()}})
    run.log_metrics({f"images_{status}": count for status, count in summary["statuses"].items()}
                       | {"images_new_unique": summary["images"], "bytes_downloaded": summary["bytes"]})
    if summary["target"] is not None:
        run.log_metric("target_reached", int(summary["target_reached"]))
    run.log_artifact(snakemake.output.manifest)
    run.log_artifact(snakemake.output.summary)

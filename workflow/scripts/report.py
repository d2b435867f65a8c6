"""Glue: the comparison report of all models (see imgpipe.evaluation.report)."""

from pathlib import Path

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])


from imgpipe.evaluation.report import write_report
from imgpipe.tracking.records import data_job_run

models = snakemake.params.models
with data_job_run("report", tags={"imgpipe.stage": "report"}) as run:
    summary = write_report(
        snakemake.params.experiment,
        metrics_paths=dict(zip(models, map(Path, snakemake.input.metrics))),
        history_paths=dict(zip(models, map(Path, snakemake.input.histories))),
        split_manifest=Path(snakemake.input.split),
        dedupe_manifest=Path(snakemake.input.dedupe),
        out_dir=Path(snakemake.output.markdown).parent,
        rank_by=snakemake.params.rank_by,
        predictions_paths=dict(zip(models, map(Path, snakemake.input.predictions))),
        log_paths={model: [Path(p) for p in paths] for model, paths in snakemake.params.model_logs.items()},
        review_sheets={Path(path).stem: Path(path) for path in snakemake.input.review},
    )
    if summary["best_model"] is not None:
        run.set_tag("imgpipe.best_model", summary["best_model"])
        run.set_tag("imgpipe.significant_best", str(summary["significant_best"]))
    run.set_tag("imgpipe.verdict", summary["verdict"][:5000])
    if summary["best_value"] is not None:
        run.log_metric(f"best_{summary['rank_by']}", summary["best_value"])
    for path in snakemake.output:
        run.log_artifact(path, artifact_path="report")
    for path in snakemake.input.review:  # the classes' contact sheets (their PNG grids beside them)
        run.log_artifact(path, artifact_path="review")
        run.log_artifact(path.removesuffix(".html") + ".png", artifact_path="review")

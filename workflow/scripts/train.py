"""Glue: train one model, with its MLflow run (see imgpipe.train)."""

import json

from imgpipe.joblog import configure_logging

configure_logging(snakemake.log[0])

import mlflow

from imgpipe.tracking import flatten, job_run, log_epoch, log_torch_model, write_run_reference
from imgpipe.train import example_input, load_trained_model, train_classifier

model_name = snakemake.wildcards.model
settings = snakemake.params.settings
with job_run(model_name, tags={"imgpipe.stage": "model", "imgpipe.model": model_name}) as run:
    write_run_reference(run, snakemake.output.mlflow_run)
    mlflow.log_params({**flatten(settings), **flatten(snakemake.params.image, "image."),
                       "threads": snakemake.threads, "dataloader_workers": 0})
    history, summary = train_classifier(model_name, settings, snakemake.params.image, snakemake.input.manifest,
                                        snakemake.output.checkpoint, snakemake.threads, on_epoch=log_epoch)
    history.to_csv(snakemake.output.history, index=False, lineterminator="\n")
    with open(snakemake.output.summary, "w") as handle:
        json.dump(summary, handle, indent=2)
    mlflow.log_metrics({k: summary[k] for k in ("n_parameters", "train_seconds", "best_epoch", "best_val_accuracy")})
    mlflow.log_artifact(snakemake.output.checkpoint)
    mlflow.log_artifact(snakemake.output.history)
    model, checkpoint = load_trained_model(snakemake.output.checkpoint)
    log_torch_model(model, example_input(checkpoint))

"""Glue: classify one predict folder with one model, into an MLflow job run (see imgpipe.serving.predict)."""

from pathlib import Path

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

from imgpipe.training.devices import prepare_model_job

gpu_claim = prepare_model_job(snakemake.resources.gpu)  # before torch is imported

import torch

from imgpipe.serving.predict import best_model_name, load_classifier, predict_inputs, resolve_top_k, write_predictions
from imgpipe.tracking.records import data_job_run
from imgpipe.training.devices import pick_device

folder, chosen = snakemake.wildcards.folder, snakemake.wildcards.model
torch.set_num_threads(snakemake.threads)
model_dirs = {Path(path).parent.name: Path(path).parent for path in snakemake.input.checkpoints}
model_name = best_model_name(snakemake.input.summary) if "summary" in snakemake.input.keys() else chosen
if model_name not in model_dirs:
    raise ValueError(f"the report summary {snakemake.input.summary} names '{model_name}' as the best model, which "
                     f"this config does not train ({', '.join(model_dirs)}); rerun the report")
with data_job_run(f"predict {folder} {chosen}", tags={"imgpipe.stage": "predict", "imgpipe.predict_folder": folder,
                                                      "imgpipe.predict_model": model_name}) as run:
    classifier = load_classifier(model_dirs[model_name], pick_device("auto", gpu_claimed=gpu_claim is not None))
    top_k = resolve_top_k(snakemake.params.top_k, classifier.classes)
    predictions = predict_inputs(classifier, [snakemake.params.folder])
    for path in (snakemake.output.csv, snakemake.output.json):
        write_predictions(classifier, predictions, top_k, path)
        run.log_artifact(path, artifact_path="predict")
    run.log_metrics({"n_predicted": len(predictions.paths), "n_failed": len(predictions.failures)})

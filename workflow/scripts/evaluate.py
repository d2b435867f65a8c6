"""Glue: evaluate one model on the test split, into its MLflow run (see imgpipe.evaluation.evaluate)."""

import json

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

from imgpipe.training.devices import pick_device, prepare_model_job

gpu_claim = prepare_model_job(snakemake.resources.gpu)  # before torch is imported

import mlflow

from imgpipe.core.files import writing
from imgpipe.evaluation.evaluate import evaluate_checkpoint, mlflow_test_metrics, write_evaluation_outputs
from imgpipe.evaluation.plots import (
    plot_confident_errors,
    plot_confusion_matrix,
    plot_embedding,
    plot_localization_grid,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_unavailable,
)
from imgpipe.tracking.runs import job_run, log_split_dataset, read_run_reference
from imgpipe.tracking.store import artifact_writes

model_name = snakemake.wildcards.evaluated
output = snakemake.output
device_setting = snakemake.config["models"][model_name]["device"]  # not a param: moving it reruns nothing
run_id = read_run_reference(snakemake.input.mlflow_run)
with job_run(model_name, tags={"imgpipe.stage": "model", "imgpipe.model": model_name}, resume_run_id=run_id) as run:
    log_split_dataset(snakemake.input.manifest, context="evaluation")
    evaluation = evaluate_checkpoint(
        snakemake.input.checkpoint, snakemake.input.manifest,
        pick_device(device_setting, gpu_claimed=gpu_claim is not None), snakemake.threads,
        batch_size=snakemake.params.batch_size)
    with open(snakemake.input.summary) as handle:
        training = json.load(handle)
    with open(snakemake.input.timing) as handle:
        train_seconds = json.load(handle)["train_seconds"]
    # (the MLflow run id is in models/<model>/mlflow_run.json: a results file must not name a run of one store)
    metrics = {"model": model_name, **evaluation.metrics,
               **{k: training[k] for k in ("arch", "best_epoch", "epochs", "best_val_accuracy", "device")}}
    write_evaluation_outputs(metrics, [output.metrics, output.model_metrics], output.speed, train_seconds)
    with writing(output.predictions):
        evaluation.predictions.to_csv(output.predictions, index=False, lineterminator="\n")

    classes, predictions = metrics["classes"], evaluation.predictions
    plot_confusion_matrix(metrics["confusion_matrix"], classes, output.confusion_matrix,
                          f"{model_name}: confusion matrix (test)")
    plot_roc_curves(evaluation.roc, output.roc, f"{model_name}: ROC (test)")
    plot_reliability_diagram(metrics["calibration_bins"], metrics["ece"], output.reliability,
                             f"{model_name}: reliability (test)")
    if evaluation.features is not None:
        embedding = plot_embedding(evaluation.features, evaluation.y_true, evaluation.probabilities.argmax(axis=1),
                                   classes, output.embedding, f"{model_name}: penultimate-layer features (test)")
    else:
        plot_unavailable(output.embedding, f"{model_name}: penultimate-layer features (test)",
                         f"not drawn: {evaluation.features_note}")
        embedding = {"pca_explained_variance": [], "tsne": False, "not_drawn": evaluation.features_note}
    if "miou" in metrics:
        plot_localization_grid(predictions, output.localization, f"{model_name}: boxes on test images")
    else:
        plot_unavailable(output.localization, f"{model_name}: boxes on test images",
                         "a classifier (task: classify) has no box head")
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    plot_confident_errors(list(wrong["path"]), list(wrong["label"]), list(wrong["predicted"]),
                          wrong["confidence"].to_numpy(), output.confident_errors,
                          f"{model_name}: most confidently wrong test images")

    mlflow.log_metrics(mlflow_test_metrics(metrics))
    with artifact_writes():
        mlflow.log_dict(embedding, "evaluation/embedding.json")
        for path in (output.metrics, output.speed, output.predictions, output.confusion_matrix, output.roc,
                     output.reliability, output.embedding, output.confident_errors, output.localization):
            mlflow.log_artifact(path, artifact_path="evaluation")

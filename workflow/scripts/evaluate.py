"""Glue: evaluate one model on the test split, into its MLflow run (see imgpipe.evaluate)."""

import json

from imgpipe.joblog import configure_logging

configure_logging(snakemake.log[0])

from imgpipe.training.devices import pick_device, prepare_model_job

gpu_claim = prepare_model_job(snakemake.resources.gpu)  # before torch is imported

import mlflow

from imgpipe.evaluate import evaluate_checkpoint
from imgpipe.plots import plot_confusion_matrix, plot_roc_curves
from imgpipe.tracking import job_run, read_run_reference

model_name = snakemake.wildcards.model
device_setting = snakemake.config["models"][model_name]["device"]  # not a param: moving it reruns nothing
run_id = read_run_reference(snakemake.input.mlflow_run)
with job_run(model_name, tags={"imgpipe.stage": "model", "imgpipe.model": model_name}, resume_run_id=run_id) as run:
    metrics, predictions, y_true, probabilities = evaluate_checkpoint(
        snakemake.input.checkpoint, snakemake.input.manifest,
        pick_device(device_setting, gpu_claimed=gpu_claim is not None), snakemake.threads)
    with open(snakemake.input.summary) as handle:
        training = json.load(handle)
    metrics = {"model": model_name, **metrics,
               **{k: training[k] for k in ("arch", "n_parameters", "train_seconds", "best_epoch", "epochs",
                                            "best_val_accuracy", "device")},
               "mlflow_run_id": run.info.run_id}
    with open(snakemake.output.metrics, "w") as handle:
        json.dump(metrics, handle, indent=2)
    predictions.to_csv(snakemake.output.predictions, index=False, lineterminator="\n")
    classes = metrics["classes"]
    plot_confusion_matrix(metrics["confusion_matrix"], classes, snakemake.output.confusion_matrix,
                          f"{model_name}: confusion matrix (test)")
    plot_roc_curves(y_true, probabilities, classes, snakemake.output.roc, f"{model_name}: ROC (test)")
    mlflow.log_metrics({f"test_{k}": metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "n_test",
                                                           "inference_ms_per_image") if metrics[k] is not None})
    if metrics["roc_auc"] is not None:
        mlflow.log_metric("test_roc_auc", metrics["roc_auc"])
    for name, figures in metrics["per_class"].items():
        mlflow.log_metrics({f"test_{stat}_{name}": value for stat, value in figures.items() if stat != "support"})
    for path in (snakemake.output.metrics, snakemake.output.confusion_matrix, snakemake.output.roc,
                 snakemake.output.predictions):
        mlflow.log_artifact(path, artifact_path="evaluation")

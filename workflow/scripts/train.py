"""Glue: train one model into its MLflow run; after a kill, resume it (see imgpipe.training)."""

from pathlib import Path

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

from imgpipe.training.devices import prepare_model_job

gpu_claim = prepare_model_job(snakemake.resources.gpu)  # before torch is imported

import mlflow

from imgpipe.models.settings import model_setting
from imgpipe.serving.modelcard import write_model_card
from imgpipe.serving.pyfunc import log_classifier_model
from imgpipe.tracking.runs import (
    RunLogger,
    job_run,
    log_missing_epochs,
    log_params_once,
    log_split_dataset,
    write_run_reference,
)
from imgpipe.tracking.store import artifact_writes
from imgpipe.tracking.tags import flatten
from imgpipe.training import resume
from imgpipe.training.devices import pick_device
from imgpipe.training.distributed import train_data_parallel
from imgpipe.training.engine import TrainingJob, train_model, write_training_outputs

model_name = snakemake.wildcards.model
settings = snakemake.params.settings
device_setting = snakemake.config["models"][model_name]["device"]  # not a param: moving it retrains nothing
job = TrainingJob(
    model_name=model_name,
    settings=settings,
    image_settings=snakemake.params.image,
    manifest_path=Path(snakemake.input.manifest),
    work_dir=Path(snakemake.output.checkpoint).parent / "resume",
    checkpoint_path=Path(snakemake.output.checkpoint),
    device=pick_device(device_setting, gpu_claimed=gpu_claim is not None),
    threads=snakemake.threads,
    start_checkpoint=Path(snakemake.input.start_from[0]) if settings["init_from"] else None,
)
state = resume.load_resume_state(job.work_dir, job.fingerprint())
resumed_run = state["metadata"].get("mlflow_run_id") if state else None
with job_run(model_name, tags={"imgpipe.stage": "model", "imgpipe.model": model_name},
             resume_run_id=resumed_run, then=resume.rerun_resumes(job.work_dir)) as run:
    job.metadata = {"mlflow_run_id": run.info.run_id}
    write_run_reference(run, snakemake.output.mlflow_run)
    log_split_dataset(snakemake.input.manifest, context="training")
    log_params_once({**flatten(settings), **flatten(snakemake.params.image, "image."), "device": device_setting,
                     "threads": snakemake.threads, "dataloader_workers": 0,
                     "gpu": gpu_claim.device_id if gpu_claim else "none"})
    if state is not None:
        log_missing_epochs(run.info.run_id, state["history"])
    logger = RunLogger(run.info.run_id, mlflow.get_tracking_uri())
    processes = model_setting(settings, "gpus")
    held = len(gpu_claim.device_id.split(",")) if gpu_claim else 0
    if job.device.type == "cuda" and held != processes:  # Snakemake caps a job's gpu at --resources gpu
        raise RuntimeError(f"model '{model_name}' trains on {processes} GPUs (models.{model_name}.gpus) but this job "
                           f"holds {held}: run snakemake with --resources gpu={processes} or more (at most the "
                           f"GPUs there are), or lower models.{model_name}.gpus")
    if processes > 1:  # each process loads the resume state itself
        history, summary = train_data_parallel(job, processes, snakemake.log[0], on_epoch=logger.log_epoch,
                                               on_start=logger.log_start_weights)
    else:
        history, summary = train_model(job, on_epoch=logger.log_epoch, resume_state=state,
                                       on_start=logger.log_start_weights)
    write_training_outputs(history, summary, snakemake.output.history, snakemake.output.summary,
                           snakemake.output.timing)
    mlflow.log_metrics({k: float(summary[k]) for k in ("n_parameters", "n_trainable_parameters", "train_seconds",
                                                        "best_epoch", "epochs_run", "best_val_accuracy",
                                                        "best_val_miou") if k in summary})
    write_model_card(snakemake.output.checkpoint, settings, summary, snakemake.config,
                     workflow_dir=Path(snakemake.scriptdir))
    # Not a param: registering changes where the model is listed, not what it learns.
    registered_name = model_name if snakemake.config["mlflow"]["register_models"] else None
    with artifact_writes(then=resume.rerun_resumes(job.work_dir)):
        for path in (snakemake.output.checkpoint, snakemake.output.history, snakemake.output.model_card):
            mlflow.log_artifact(path)
        log_classifier_model(snakemake.output.checkpoint, model_name, registered_model_name=registered_name)
resume.clear(job.work_dir)

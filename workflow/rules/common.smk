# Config validation and the helpers the rules share. Everything a job reads from the
# config reaches it through params, so Snakemake reruns exactly the jobs a change affects.

import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

from imgpipe.config.params import (
    box_sources,
    canonical,
    crawl_settings,
    source_fingerprints,
    training_settings,
)
from imgpipe.config.schema import ConfigError, check_config_files, load_schema
from imgpipe.config.validation import read_exclude_list, validate_config
from imgpipe.core.files import prepend_to_pythonpath
from imgpipe.core.fingerprints import FileHashCache
from imgpipe.training.devices import model_uses_gpu, visible_gpus

# Under --sdm conda the jobs' environment (envs/imgpipe.yaml) holds imgpipe's dependencies,
# not imgpipe: jobs import it from this checkout (each job's snakemake reads this file too).
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    prepend_to_pythonpath(os.path.join(workflow.basedir, "src"))

try:
    check_config_files(workflow.configfiles)
    _validated = validate_config(
        config,
        load_schema(workflow.source_path("../schemas/config.schema.yaml")),
        # a job's own Snakemake parses this again: the slow checks ran once, in the main process
        thorough=workflow.is_main_process,
    )
except ConfigError as error:
    raise WorkflowError(str(error)) from None
config.clear()
config.update(_validated)
# Found once, at DAG build, without importing torch: models with device auto hold the
# `gpu` resource only when there is a GPU (IMGPIPE_GPUS declares the list explicitly).
GPUS = visible_gpus()

EXPERIMENT = config["experiment"]
CLASSES = sorted(config["classes"])
MODELS = sorted(config["models"])
RESULTS = f"results/{EXPERIMENT}"
LOGS = f"logs/{EXPERIMENT}"
BENCHMARKS = f"benchmarks/{EXPERIMENT}"

# A model that trains on more GPUs than there are would wait for them forever.
for _name, _model in config["models"].items():
    if GPUS and model_uses_gpu(_model["device"], GPUS) and _model["gpus"] > len(GPUS):
        raise WorkflowError(
            f"config key 'models.{_name}.gpus': {_model['gpus']} GPUs asked, {len(GPUS)} visible "
            f"({', '.join(GPUS)})"
        )


wildcard_constraints:
    cls="|".join(re.escape(name) for name in CLASSES),
    model="|".join(re.escape(name) for name in MODELS),
    evaluated="|".join(re.escape(name) for name in MODELS),


def get_sources(wildcards):
    return config["classes"][wildcards.cls]["sources"]


# sha256 of every local source file, reused while its size and mtime stay the same.
FILE_HASHES = FileHashCache(".snakemake/imgpipe/file-hashes.json")


def get_source_fingerprints(wildcards):
    """A content hash of each local source: new, renamed or edited files rerun the crawl; a touch does not."""
    return source_fingerprints(get_sources(wildcards), cache=FILE_HASHES)


def get_box_sources(wildcards):
    """The class's folder sources with boxes, fingerprinted: a changed box reruns preprocess, not the crawl."""
    return box_sources(get_sources(wildcards), cache=FILE_HASHES)


def get_crawl_settings(wildcards):
    return crawl_settings(config, wildcards.cls)


# The hand-kept exclusion list, read once: its entries drive dedupe, its comments only the
# contact sheets, so explaining an exclusion (or a touch) retrains nothing.
EXCLUSIONS = canonical(
    read_exclude_list(config["dedupe"]["exclude"])
    if config["dedupe"]["exclude"]
    else {}
)


def model_of(wildcards):
    """The model a train or evaluate job is for (evaluate names its wildcard `evaluated`)."""
    return wildcards.evaluated if "evaluated" in wildcards.keys() else wildcards.model


def get_model_settings(wildcards):
    """What the model learns from; its threads and device reach the job outside params, so
    changing them never retrains a finished model."""
    return training_settings(config["models"][wildcards.model])


def get_model_threads(wildcards):
    return config["models"][model_of(wildcards)]["threads"]


def get_model_gpus(wildcards):
    """1 when the model's jobs run on a GPU (each then claims a free device), else 0,
    so that CPU-only models train side by side on the cores."""
    return int(model_uses_gpu(config["models"][model_of(wildcards)]["device"], GPUS))


def get_train_gpus(wildcards):
    """The model's `gpus` when it trains on GPUs (one device per process), else 0."""
    return get_model_gpus(wildcards) * config["models"][wildcards.model]["gpus"]


def get_model_start_checkpoint(wildcards):
    """The checkpoint a model starts from: another model's (init_from: a DAG edge) or a file."""
    model = config["models"][wildcards.model]
    if model["init_from"] is not None:
        return [f"{RESULTS}/models/{model['init_from']}/model.pt"]
    return [model["weights"]] if model["weights"] not in ("none", "imagenet") else []


def start_tracking():
    """The invocation's provenance (results/<experiment>/provenance/) and MLflow run; both
    record the git commit of the Snakefile's folder (workflow.basedir), wherever Snakemake runs.
    """
    from imgpipe.tracking.records import RECORDS_ROOT
    from imgpipe.tracking.provenance import write_provenance
    from imgpipe.tracking.invocation import start_invocation

    provenance = write_provenance(f"{RESULTS}/provenance", config, workflow.basedir)
    start_invocation(
        config["mlflow"]["tracking_uri"],
        config["mlflow"]["experiment"] or EXPERIMENT,
        config,
        workflow_folder=workflow.basedir,
        provenance_folder=provenance,
        records_root=RECORDS_ROOT,  # data jobs' runs, published by this process
    )


def end_tracking(success):
    from imgpipe.tracking.invocation import end_invocation

    end_invocation(success)


# The report's inputs and the end of a run. With --keep-going (the default profile) a
# failed model stops only its own jobs, but the report job needs every model, so it never
# runs; the report is then written from what finished, in onerror.
import time

from snakemake.logging import logger

from imgpipe.core.layout import MODEL_PLOTS

INVOCATION_STARTED = time.time()


def model_logs():
    """Each model's train and evaluate logs: the report shows the end of the newest when it failed."""
    return {
        model: [f"{LOGS}/train/{model}.log", f"{LOGS}/evaluate/{model}.log"]
        for model in MODELS
    }


def mark_unrun_jobs_incomplete():
    """Mark incomplete the outputs an earlier run left for the jobs this run meant to redo but
    never ran (a job before them failed), so that the next run (--rerun-incomplete, the default
    profile) redoes them instead of taking them as current. Snakemake deletes a failed job's
    outputs, and with them what showed that the jobs after it are out of date: a preprocess
    that failed on a full disk after images.size changed would otherwise leave the old split,
    and the next run would say "Nothing to be done". (Snakemake's own DAG and incomplete
    markers; tests/test_pipeline_e2e.py checks it still works this way.)"""
    try:
        unrun = [
            job
            for job in workflow.dag.needrun_jobs()
            if any(os.path.exists(path) for path in job.output)
        ]
        for job in unrun:
            workflow.persistence.started(job)
        if unrun:
            logger.warning(
                f"imgpipe: {len(unrun)} job(s) did not run after the failure; their earlier outputs are "
                f"marked incomplete, so the next run redoes them: "
                + ", ".join(sorted({str(job) for job in unrun}))
            )
    except Exception as error:  # the handler must not hide the failure it follows
        logger.error(
            f"imgpipe: the outputs of jobs that did not run could not be marked incomplete: {error!r}"
        )


def write_report_after_failure():
    try:
        _write_report_after_failure()
    except Exception as error:  # the handler must not hide the failure it reports
        logger.error(
            f"imgpipe: the report could not be written after the failure: {error!r}"
        )


def _write_report_after_failure():
    import os
    from pathlib import Path

    from imgpipe.evaluation.report import stale_model_results, write_report

    results = Path(RESULTS)
    summary_path = results / "report/summary.json"
    if summary_path.is_file() and summary_path.stat().st_mtime >= INVOCATION_STARTED:
        show_verdict()  # the report job itself succeeded in this run: the failure was after it
        return
    data_problem, unavailable = stale_model_results(
        results, MODELS, CLASSES, {m: config["models"][m]["init_from"] for m in MODELS}
    )
    if data_problem:
        logger.error(f"imgpipe: no report: {data_problem} (see the errors above)")
        return
    split, dedupe = results / "split/manifest.csv", results / "dedupe/manifest.csv"
    metrics = {m: results / f"eval/{m}/metrics.json" for m in MODELS}
    summary = write_report(
        EXPERIMENT,
        metrics_paths=metrics,
        history_paths={
            m: results / f"models/{m}/history.csv"
            for m in MODELS
            if m not in unavailable
        },
        split_manifest=split,
        dedupe_manifest=dedupe,
        out_dir=results / "report",
        rank_by=config["report"]["rank_by"],
        predictions_paths={m: results / f"eval/{m}/predictions.csv" for m in MODELS},
        log_paths={
            model: [Path(p) for p in paths] for model, paths in model_logs().items()
        },
        unavailable=unavailable,
        review_sheets={c: results / "review" / f"{c}.html" for c in CLASSES},
    )
    # Written outside a job, the report has no Snakemake metadata: dated to the epoch, it is
    # older than any input, so the next run rebuilds it whatever changed meanwhile.
    for name in ("summary.json", "report.md", "report.html", "learning_curves.png"):
        os.utime(results / "report" / name, (0, 0))
    if unavailable:
        logger.error(
            f"imgpipe: {len(unavailable)} of {len(MODELS)} model(s) have no result from this run "
            f"({', '.join(unavailable)}); the report compares the others."
        )
    show_verdict(fresh=True)


def show_verdict(fresh=None):
    """The report's place and one-line verdict, as the last thing a run prints."""
    import json
    from pathlib import Path

    summary_path = Path(f"{RESULTS}/report/summary.json")
    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    fresh = (
        summary_path.stat().st_mtime >= INVOCATION_STARTED if fresh is None else fresh
    )
    logger.info(
        f"\nReport{'' if fresh else ' (not rebuilt by this run)'}: {Path(summary['report_html']).resolve()}"
        f"\nVerdict: {summary['verdict']}\n"
    )


# predict: one job per `predict.folders` entry and model ("best": the report's first).
PREDICT_FOLDERS = sorted(config["predict"]["folders"])
PREDICT_MODELS = (
    ["best"] if config["predict"]["models"] == "best" else config["predict"]["models"]
)
PREDICT_OUTPUTS = expand(
    f"{RESULTS}/predict/{{folder}}/{{model}}.{{ext}}",
    folder=PREDICT_FOLDERS,
    model=PREDICT_MODELS,
    ext=("csv", "json"),
)


def get_predict_models(wildcards):
    """The checkpoint that predicts; for "best", the report's summary names it among all models.
    After evaluation, so the model's folder holds its test figures for the output's header.
    """
    if config["predict"]["models"] == "best":
        return {
            "summary": f"{RESULTS}/report/summary.json",
            "checkpoints": expand(f"{RESULTS}/models/{{model}}/model.pt", model=MODELS),
        }
    return {
        "checkpoints": [f"{RESULTS}/models/{wildcards.model}/model.pt"],
        "evaluation": f"{RESULTS}/eval/{wildcards.model}/metrics.json",
    }


def get_predict_folder(wildcards):
    return config["predict"]["folders"][wildcards.folder]


def get_predict_folder_fingerprint(wildcards):
    """A content hash of the folder: a new, renamed or edited image reruns the job; a touch does not."""
    return source_fingerprints(
        [{"folder": get_predict_folder(wildcards)}], cache=FILE_HASHES
    )[0]


def get_predict_gpus(wildcards):
    """1 when a GPU was found at DAG build (the job then claims a free device), else 0."""
    return int(model_uses_gpu("auto", GPUS))

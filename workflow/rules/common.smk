# Config validation and the helpers the rules share. Everything a job reads from the
# config reaches it through params, so Snakemake reruns exactly the jobs a change affects.

import re

from snakemake.exceptions import WorkflowError

from imgpipe.config import (
    ConfigError,
    check_config_files,
    load_schema,
    source_fingerprints,
    training_settings,
    validate_config,
)
from imgpipe.training.devices import model_uses_gpu, visible_gpus

try:
    check_config_files(workflow.configfiles)
    _validated = validate_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
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


wildcard_constraints:
    cls="|".join(re.escape(name) for name in CLASSES),
    model="|".join(re.escape(name) for name in MODELS),


def get_sources(wildcards):
    return config["classes"][wildcards.cls]["sources"]


def get_source_fingerprints(wildcards):
    """Size and newest change of each local source, so new or edited files rerun the crawl."""
    return source_fingerprints(get_sources(wildcards))


def get_exclude_list(wildcards):
    exclude = config["dedupe"]["exclude"]
    return [exclude] if exclude else []


def get_model_settings(wildcards):
    """What the model learns from; its threads and device reach the job outside params, so
    changing them never retrains a finished model."""
    return training_settings(config["models"][wildcards.model])


def get_model_threads(wildcards):
    return config["models"][wildcards.model]["threads"]


def get_model_gpus(wildcards):
    """1 when the model's jobs run on a GPU (each then claims a free device), else 0,
    so that CPU-only models train side by side on the cores."""
    return int(model_uses_gpu(config["models"][wildcards.model]["device"], GPUS))


def get_model_start_checkpoint(wildcards):
    """The checkpoint a model starts from: another model's (init_from: a DAG edge) or a file."""
    model = config["models"][wildcards.model]
    if model["init_from"] is not None:
        return [f"{RESULTS}/models/{model['init_from']}/model.pt"]
    return [model["weights"]] if model["weights"] not in ("none", "imagenet") else []


def start_tracking():
    """The invocation's MLflow run; its runs record the git commit of the Snakefile's folder
    (workflow.basedir), wherever Snakemake runs."""
    from imgpipe.tracking import start_invocation

    start_invocation(config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"] or EXPERIMENT, config,
                     workflow_folder=workflow.basedir)


def end_tracking(success):
    from imgpipe.tracking import end_invocation

    end_invocation(success)


# The report's inputs and the end of a run. With --keep-going (the default profile) a
# failed model stops only its own jobs, but the report job needs every model, so it never
# runs; the report is then written from what finished, in onerror.
import time

from snakemake.logging import logger

from imgpipe.layout import MODEL_PLOTS

INVOCATION_STARTED = time.time()


def model_logs():
    """Each model's train and evaluate logs: the report shows the end of the newest when it failed."""
    return {model: [f"{LOGS}/train/{model}.log", f"{LOGS}/evaluate/{model}.log"] for model in MODELS}


def write_report_after_failure():
    try:
        _write_report_after_failure()
    except Exception as error:  # the handler must not hide the failure it reports
        logger.error(f"imgpipe: the report could not be written after the failure: {error!r}")


def _write_report_after_failure():
    from pathlib import Path

    from imgpipe.report import write_report

    split, dedupe = Path(f"{RESULTS}/split/manifest.csv"), Path(f"{RESULTS}/dedupe/manifest.csv")
    if not (split.is_file() and dedupe.is_file()):
        logger.error("imgpipe: no report: the data stages did not finish (see the errors above)")
        return
    metrics, unavailable = {}, {}
    for model in MODELS:
        # (`checkpoint` is a Snakemake keyword at the start of a line, hence `trained`.)
        trained, path = Path(f"{RESULTS}/models/{model}/model.pt"), Path(f"{RESULTS}/eval/{model}/metrics.json")
        metrics[model] = path
        # A failed job's outputs are deleted; what is left of an earlier run is not this model's result.
        if not trained.is_file():
            unavailable[model] = "training did not finish (no model.pt)"
        elif not path.is_file() or path.stat().st_mtime_ns < trained.stat().st_mtime_ns:
            unavailable[model] = "evaluation did not finish (no up-to-date metrics.json)"
    summary = write_report(
        EXPERIMENT,
        metrics_paths=metrics,
        history_paths={m: Path(f"{RESULTS}/models/{m}/history.csv") for m in MODELS if m not in unavailable},
        split_manifest=split,
        dedupe_manifest=dedupe,
        out_dir=Path(f"{RESULTS}/report"),
        rank_by=config["report"]["rank_by"],
        predictions_paths={m: Path(f"{RESULTS}/eval/{m}/predictions.csv") for m in MODELS},
        log_paths={model: [Path(p) for p in paths] for model, paths in model_logs().items()},
        unavailable=unavailable,
    )
    logger.error(f"imgpipe: {len(unavailable)} of {len(MODELS)} model(s) failed; the report of the others is "
                 f"written.")
    show_verdict()


def show_verdict():
    """The report's place and one-line verdict, as the last thing a run prints."""
    import json
    from pathlib import Path

    summary_path = Path(f"{RESULTS}/report/summary.json")
    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    fresh = summary_path.stat().st_mtime >= INVOCATION_STARTED
    logger.info(f"\nReport{'' if fresh else ' (not rebuilt by this run)'}: {Path(summary['report_html']).resolve()}"
                f"\nVerdict: {summary['verdict']}\n")

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
    from imgpipe.tracking import start_invocation

    start_invocation(config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"] or EXPERIMENT, config)


def end_tracking(success):
    from imgpipe.tracking import end_invocation

    end_invocation(success)

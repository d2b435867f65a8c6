# Config validation and the helpers the rules share. Everything a job reads from the
# config reaches it through params, so Snakemake reruns exactly the jobs a change affects.

import re

from snakemake.exceptions import WorkflowError

from imgpipe.config import ConfigError, check_config_files, load_schema, source_fingerprints, validate_config

try:
    check_config_files(workflow.configfiles)
    _validated = validate_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
except ConfigError as error:
    raise WorkflowError(str(error)) from None
config.clear()
config.update(_validated)

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
    return config["models"][wildcards.model]


def get_model_device(wildcards):
    return config["models"][wildcards.model]["device"]


def get_train_threads(wildcards):
    return config["models"][wildcards.model]["threads"]


def get_model_checkpoint_inputs(wildcards):
    """A model that starts from a checkpoint file depends on it."""
    weights = config["models"][wildcards.model]["weights"]
    return [weights] if weights not in ("none", "imagenet") else []


def start_tracking():
    from imgpipe.tracking import start_invocation

    start_invocation(config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"] or EXPERIMENT, config)


def end_tracking(success):
    from imgpipe.tracking import end_invocation

    end_invocation(success)

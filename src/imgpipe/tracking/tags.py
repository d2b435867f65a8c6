"""The tracking vocabulary: the environment variables that carry an invocation to its jobs, the
tag names every imgpipe run carries, and how params are flattened and secrets kept out of them.

Imports nothing heavy (no MLflow): the Snakefile, the scripts and the data jobs' records use it.
"""

from __future__ import annotations

PARENT_RUN_ENV = "IMGPIPE_MLFLOW_PARENT_RUN_ID"


# JSON: the tags every run of the invocation carries (experiment, config hash, git commit).
INVOCATION_TAGS_ENV = "IMGPIPE_MLFLOW_INVOCATION_TAGS"


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"


TAG_PREFIX = "imgpipe."


HOST_TAG = f"{TAG_PREFIX}host"


PID_TAG = f"{TAG_PREFIX}pid"


PID_STARTED_TAG = f"{TAG_PREFIX}pid_started"


ABANDONED_TAG = f"{TAG_PREFIX}abandoned"


ERROR_TAG = f"{TAG_PREFIX}error"  # a failed job's error (MLflow's tag values hold 5000 characters)


ERROR_TAG_CHARS = 5000


KIND_TAG = f"{TAG_PREFIX}kind"


STAGE_TAG = f"{TAG_PREFIX}stage"


MODEL_TAG = f"{TAG_PREFIX}model"


CLASS_TAG = f"{TAG_PREFIX}class"


EXPERIMENT_TAG = f"{TAG_PREFIX}experiment"


INVOCATION_TAG = f"{TAG_PREFIX}invocation"


LAST_INVOCATION_TAG = f"{TAG_PREFIX}last_invocation"  # of a run resumed by a later invocation


CONFIG_HASH_TAG = f"{TAG_PREFIX}config_hash"


VERSION_TAG = f"{TAG_PREFIX}version"


GIT_DIRTY_TAG = f"{TAG_PREFIX}git_dirty"
MISSING_ARTIFACTS_TAG = f"{TAG_PREFIX}missing_artifacts"


# The stage whose runs are top level: a model's train and evaluate jobs share its run.
MODEL_STAGE = "model"


# MLflow's own tags, shown by its UI (mlflow.utils.mlflow_tags; spelled out here so that
# importing this module does not import mlflow).
MLFLOW_SOURCE_NAME = "mlflow.source.name"


MLFLOW_SOURCE_TYPE = "mlflow.source.type"


MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"


MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"


def flatten(values: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested config as MLflow params."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


SECRET_KEYS = ("api_key",)


def redact_secrets(values):
    """A copy of a nested config with secrets (a Flickr api_key) replaced, for logging."""
    if isinstance(values, dict):
        return {k: "<redacted>" if k in SECRET_KEYS else redact_secrets(v) for k, v in values.items()}
    if isinstance(values, list):
        return [redact_secrets(v) for v in values]
    return values


"""Sweeps: one model entry with `sweep: {key: [values]}` becomes one model per combination.

Seed 002 compared batch sizes 8/16/32 with SGD against Adam by editing code between runs;
here `sweep: {batch_size: [8, 16, 32], optimizer: [sgd, adam]}` writes the six models out
at DAG build, each with a name that says what it is (`resnet50-bs16-sgd`). Names depend
only on the keys and values, never on their order in the file, so re-saving a config
with its keys reordered renames (and retrains) nothing.
"""

from __future__ import annotations

import itertools
import re

# Values that say what they are on their own.
BARE_VALUE_KEYS = ("optimizer", "strategy", "arch")
SHORT_KEYS = {
    "batch_size": "bs",
    "lr": "lr",
    "epochs": "ep",
    "weight_decay": "wd",
    "momentum": "mom",
    "label_smoothing": "ls",
    "head_epochs": "he",
    "backbone_lr_factor": "blf",
    "warmup_epochs": "wu",
    "step_epochs": "se",
    "step_gamma": "sg",
    "seed": "seed",
    "threads": "t",
    "head_dropout": "hd",
    "augment": "aug",
    "scheduler": "sched",
    "class_weights": "cw",
    "sampler": "sampler",
    "weights": "w",
    "init_from": "from",
    "precision": "prec",
    "channels_last": "cl",
    "compile": "compile",
    "device": "dev",
    "truncate": "cut",
}
UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


class SweepError(ValueError):
    """A sweep that cannot be expanded; the message names the config key."""


def name_part(key: str, value) -> str:
    """The piece of a swept model's name that says `key` is `value` (see the module docstring)."""
    short = SHORT_KEYS.get(key, key)
    if isinstance(value, bool):
        part = f"{short}-{'on' if value else 'off'}"
    elif isinstance(value, (int, float)):
        part = f"{short}{value:g}"
    elif key in BARE_VALUE_KEYS:
        part = str(value)
    else:
        part = f"{short}-{value}"
    return UNSAFE_NAME_CHARACTERS.sub("_", part)


def expand_sweeps(models: dict[str, dict]) -> dict[str, dict]:
    """Models with every `sweep` written out; entries without one are kept as they are.

    Raises SweepError naming the key when two models would get one name.
    """
    expanded: dict[str, dict] = {}
    origin: dict[str, str] = {}

    def add(name: str, settings: dict, source: str) -> None:
        if name in expanded:
            raise SweepError(f"config key '{source}': model name '{name}' is also made by '{origin[name]}'; "
                             f"rename one of them")
        expanded[name] = settings
        origin[name] = source

    for base_name, settings in models.items():
        if "sweep" not in settings:
            add(base_name, settings, f"models.{base_name}")
    for base_name, settings in models.items():
        if "sweep" not in settings:
            continue
        sweep = settings["sweep"]
        keys = sorted(sweep)
        # A swept key overrides the entry's own value (one merged in from an anchor, say).
        fixed = {key: value for key, value in settings.items() if key != "sweep"}
        for values in itertools.product(*(sweep[key] for key in keys)):
            name = "-".join([base_name] + [name_part(key, value) for key, value in zip(keys, values)])
            add(name, {**fixed, **dict(zip(keys, values))}, f"models.{base_name}.sweep")
    return expanded

"""model_card.json: a trained model directory that says what it is and where it came from.

model.pt alone is enough to predict (it holds the classes, the image settings and the
normalisation); the card repeats those in readable form and adds what model.pt does not
carry: the model's training settings, its training figures, and provenance (imgpipe
version, git commit of the workflow, hash of the whole config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imgpipe.models.checkpoints import read_model_checkpoint
from imgpipe.tracking.provenance import VERSION, config_hash, git_commit

CARD_FILE = "model_card.json"
# Figures from the train job's summary that say how training went.
TRAINING_FIGURES = ("best_epoch", "best_metric", "best_val_accuracy", "best_val_loss", "epochs", "epochs_run",
                    "stopped_early", "n_parameters", "n_trainable_parameters", "n_train", "n_val",
                    "device", "precision", "threads")


def build_model_card(checkpoint: dict, model_settings: dict, training_summary: dict, config: dict,
                     workflow_dir: Path | str) -> dict:
    """The card of one trained model: read from its checkpoint, its config entry and its training summary."""
    return {
        "model_name": checkpoint["model_name"],
        "classes": list(checkpoint["classes"]),
        "preprocessing": {
            "image": dict(checkpoint["image"]),
            "in_channels": checkpoint["in_channels"],
            "normalization": checkpoint["normalization"],
        },
        "architecture": {"arch": checkpoint["arch"], "build": checkpoint.get("build")},
        "settings": model_settings,
        "training": {key: training_summary[key] for key in TRAINING_FIGURES if key in training_summary},
        "provenance": {
            "imgpipe_version": VERSION,
            "git": git_commit(workflow_dir),
            "config_hash": config_hash(config),
            "experiment": config.get("experiment"),
        },
    }


def write_model_card(checkpoint_path: Path | str, model_settings: dict, training_summary: dict, config: dict,
                     workflow_dir: Path | str) -> Path:
    """Build the card of the model in `checkpoint_path` and write it next to it, as model_card.json
    (to a temporary file, then renamed, so a killed job never leaves half a card). Returns its path."""
    path = Path(checkpoint_path).with_name(CARD_FILE)
    card = build_model_card(read_model_checkpoint(checkpoint_path), model_settings, training_summary, config,
                            workflow_dir)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(partial, path)
    return path

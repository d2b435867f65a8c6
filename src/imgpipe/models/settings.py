"""What a model's settings mean when a key is absent: the keys added after models had been trained.

Plain Python (no torch), so that config validation and checkpoint reading share it.
"""

# Model keys added after models had been trained, with the value that means what training did
# before them: left out of the rerun trigger while they keep it, so that upgrading imgpipe
# retrains no finished model (and a model's settings read them with this default).
NEUTRAL_DEFAULTS = {"gpus": 1, "task": "classify", "box_loss": "smooth_l1", "box_loss_weight": 1.0,
                    "boxes_required": False}


def model_setting(settings: dict, key: str):
    """A model setting of training_settings' output, whose NEUTRAL_DEFAULTS keys may have been left out."""
    return settings.get(key, NEUTRAL_DEFAULTS[key])

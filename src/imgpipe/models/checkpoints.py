"""Reading and writing checkpoints: the one place evaluate, predict and training load them.

Every file is read with `torch.load(weights_only=True)`: a checkpoint is tensors, numbers
and strings, never pickled code. A file that is not a checkpoint, or a truncated one, gets
a message that says which and names the file. Writes go to a temporary file that is then
renamed, so a job killed mid-write never leaves half a checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from imgpipe.core.files import error_text, writing
from imgpipe.models.settings import model_setting

# The keys of an imgpipe model.pt that rebuild the network (see `model_build_spec`).
BUILD_KEYS = ("arch", "truncate", "head_hidden", "head_dropout")


class CheckpointError(ValueError):
    """A file that cannot serve as a checkpoint; the message names it and says why."""


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_PROTOCOL_OPCODE = 0x80  # the first byte of the legacy format (a pickle)


def read_torch_file(path: Path | str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): an interrupted copy or save?")
    if head != ZIP_MAGIC and head[0] != PICKLE_PROTOCOL_OPCODE:
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (a file written by torch.save starts "
                              f"with {ZIP_MAGIC!r}; this one with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"checkpoint '{path}' holds pickled Python objects besides tensors (for example a whole model "
                f"saved with torch.save(model)); imgpipe loads only tensors, which is safe: save "
                f"model.state_dict() instead") from error
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({error_text(error)})") from error
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt ({error_text(error).split('. ')[0]}): "
                              f"copy or save it again") from error


def read_checkpoint_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The state_dict in an imgpipe checkpoint or a plain state_dict file."""
    payload = read_torch_file(path)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"checkpoint '{path}' holds no state_dict (tensor name -> tensor)")
    return payload


def read_model_checkpoint(path: Path | str) -> dict:
    """An imgpipe model.pt: state_dict plus what rebuilds and feeds the network."""
    payload = read_torch_file(path)
    absent = [key for key in ("state_dict", "arch", "classes", "in_channels", "image", "normalization")
              if not isinstance(payload, dict) or key not in payload]
    if absent:
        raise CheckpointError(f"'{path}' is not an imgpipe model checkpoint (it lacks {', '.join(absent)}); "
                              f"a plain state_dict can start training (weights: <file>) but not be evaluated")
    return payload


def model_build_spec(settings: dict) -> dict:
    """The settings that rebuild a model's network, stored in its checkpoint."""
    spec = {key: settings.get(key) for key in BUILD_KEYS}
    if model_setting(settings, "task") != "classify":  # classifiers' checkpoints stay as they were
        spec["task"] = settings["task"]
    return spec


def checkpoint_task(checkpoint: dict) -> str:
    """What a checkpoint's network does: 'classify', or 'localize' (a box head too)."""
    return checkpoint.get("build", {}).get("task", "classify")


def save_atomically(payload: Any, path: Path | str, then: str = "") -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over `path`.

    A failed write (torch says "unexpected pos 29760 vs 29712" on a full disk) raises an
    OutputWriteError that names the cause and `path`, and what to do (`then`: what a rerun does).
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with writing(path, then, partial):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)

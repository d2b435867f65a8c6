"""Never lose work: the state of a training run after every epoch, and resuming from it.

A job's resume folder (`results/<experiment>/models/<model>/resume/`, deliberately not a
Snakemake output, so Snakemake never deletes it as incomplete) holds:

- `last.pt`: everything the next epoch depends on: model, optimizer, scheduler and
  gradient-scaler states, the epoch, every random generator, the history, the best epoch
  so far and the early-stopping count, plus metadata (the MLflow run to continue);
- `best-epochNNNN.pt`: the best epoch's model checkpoint, copied to model.pt when training
  ends. It is written before the state that names it, so the two always agree.

Each is written to a temporary file and renamed. A state is used only if its fingerprint
(the model's settings, the image settings, the split manifest's and the starting
checkpoint's contents, and the training code) matches the job's: after a change to any
of them training starts over.
On CPU with the same threads, a resumed run ends with exactly the weights and metrics of
an uninterrupted one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from imgpipe.config.params import training_settings
from imgpipe.core.files import writing
from imgpipe.models.checkpoints import CheckpointError, read_torch_file, save_atomically

log = logging.getLogger(__name__)

RESUME_FORMAT = 2
LAST = "last.pt"
BEST_PATTERN = "best-epoch{epoch:04d}.pt"
BEST_GLOB = "best-epoch*.pt"


def file_digest(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Where training starts (the train job's and each data-parallel process's). A resumed run must
# share every imgpipe module these import with the interrupted one, or its epochs would mix
# two versions of the loop, the loss (localize.py) or the data.
TRAINING_ENTRY_POINTS = ("imgpipe.training.engine", "imgpipe.training.distributed")


def imported_package_files(entry_points, root: Path | str) -> list[Path]:
    """The source files of the package at `root` that the modules `entry_points` import, directly
    or through each other, at the top or inside a function (read from the source, so a module
    that imports lazily counts too, and nothing is imported); package __init__ files included."""
    root = Path(root)
    package = root.name
    found: set[Path] = set()
    todo = list(entry_points)
    while todo:
        parts = todo.pop().split(".")
        if parts[0] != package:
            continue
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
            folder = root.joinpath(*parts[1:depth])
            path = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
            if not path.is_file() or path in found:
                continue  # an attribute (`from imgpipe.models.settings import model_setting`), or done
            found.add(path)
            module = ".".join(parts[:depth])
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    todo.extend(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    anchor = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    base = (importlib.util.resolve_name("." * node.level + (node.module or ""), anchor)
                            if node.level else node.module)
                    todo.extend([base, *(f"{base}.{alias.name}" for alias in node.names)])
    return sorted(found)


def training_code_files() -> list[Path]:
    return imported_package_files(TRAINING_ENTRY_POINTS, Path(__file__).resolve().parents[1])


@functools.lru_cache(maxsize=1)
def training_code_digest() -> str:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in training_code_files():
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def training_fingerprint(settings: dict, image_settings: dict, manifest_path: Path | str,
                         start_checkpoint: Path | str | None) -> str:
    """What a resume state must match: settings, image settings, data, starting weights, code."""
    identity = {
        "format": RESUME_FORMAT,
        # where and how fast it runs may change between the kill and the resumption
        "settings": training_settings(settings),
        "image": image_settings,
        "manifest": file_digest(manifest_path),
        "start": file_digest(start_checkpoint) if start_checkpoint else None,
        "code": training_code_digest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def load_resume_state(work_dir: Path | str, fingerprint: str) -> dict | None:
    """The saved state of an interrupted run of these exact settings, or None (and why, logged)."""
    path = Path(work_dir) / LAST
    if not path.exists():
        return None
    try:
        state = read_torch_file(path)
    except CheckpointError as error:
        log.warning("ignoring resume state: %s; training starts at epoch 1", error)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        log.warning("resume state %s was saved for other settings, data or starting weights; "
                    "training starts at epoch 1", path)
        return None
    if not (Path(work_dir) / state["best_file"]).exists():
        log.warning("resume state %s names %s, which is missing; training starts at epoch 1", path, state["best_file"])
        return None
    log.info("resuming from %s: %d epoch(s) done", path, state["epoch"])
    return state


def rerun_resumes(work_dir: Path | str) -> str:
    """What a rerun after a failed write (a full disk) does, for the error's message."""
    return f"training resumes from the last epoch saved in {work_dir}"


def save_resume_state(work_dir: Path | str, state: dict) -> None:
    save_atomically(state, Path(work_dir) / LAST, rerun_resumes(work_dir))


def save_best(work_dir: Path | str, epoch: int, payload: dict) -> str:
    """Write the model checkpoint of a new best epoch; returns its file name (for the state)."""
    name = BEST_PATTERN.format(epoch=epoch)
    save_atomically(payload, Path(work_dir) / name, rerun_resumes(work_dir))
    return name


def remove_other_best_files(work_dir: Path | str, keep: str) -> None:
    """Drop best-epoch files the saved state no longer names."""
    for path in Path(work_dir).glob(BEST_GLOB):
        if path.name != keep:
            path.unlink(missing_ok=True)


def finish(work_dir: Path | str, best_file: str, checkpoint_path: Path | str) -> None:
    """Copy the best epoch to the job's output (atomically)."""
    partial = Path(checkpoint_path).with_name(f".{Path(checkpoint_path).name}.partial")
    with writing(checkpoint_path, rerun_resumes(work_dir), partial):
        shutil.copyfile(Path(work_dir) / best_file, partial)
        partial.replace(checkpoint_path)


def clear(work_dir: Path | str) -> None:
    """Remove the resume folder once every output of the job is written."""
    shutil.rmtree(work_dir, ignore_errors=True)


def capture_random_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random generator a training run draws from, as tensors and plain numbers
    (so the state loads with weights_only=True)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Training: one model on the train split, the best epoch by validation kept as a checkpoint.

The checkpoint is self-contained and plain (tensors, numbers, strings), so it loads with
`torch.load(weights_only=True)` and carries what inference needs: architecture, classes,
image settings and normalisation.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from imgpipe import __version__
from imgpipe.datasets import SplitTensors, class_names, load_split, normalization_for, normalize_batch, read_split_manifest
from imgpipe.models import build_model, count_parameters

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS needs this for deterministic matmuls on the GPU; harmless elsewhere.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(requested: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device that is absent is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(requested, False):
        raise RuntimeError(f"device '{requested}' was requested (models.<name>.device) but is not available on "
                           f"this machine; use device: auto")
    return torch.device(requested)


def make_optimizer(model: nn.Module, settings: dict) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    name = settings["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=settings["lr"], momentum=settings["momentum"],
                               weight_decay=settings["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(parameters, lr=settings["lr"], weight_decay=settings["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=settings["lr"], weight_decay=settings["weight_decay"])
    raise ValueError(f"unknown optimizer '{name}' (sgd, adam, adamw)")


def batches(n_items: int, batch_size: int, generator: torch.Generator | None = None):
    """Index tensors of one epoch: shuffled when a generator is given, in order otherwise.

    When shuffled (training), a last batch of one image joins the batch before it:
    BatchNorm cannot normalise a single sample whose feature map has shrunk to 1x1.
    """
    order = torch.randperm(n_items, generator=generator) if generator is not None else torch.arange(n_items)
    chunks = list(order.split(batch_size))
    if generator is not None and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def make_scheduler(optimizer: torch.optim.Optimizer, settings: dict):
    """Per-epoch learning-rate schedule: 'cosine' anneals to 0 over the epochs; 'none' keeps lr."""
    if settings["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings["epochs"])
    if settings["scheduler"] == "none":
        return None
    raise ValueError(f"unknown scheduler '{settings['scheduler']}' (none, cosine)")


def run_epoch(model, data: SplitTensors, normalization, device, batch_size, optimizer=None, generator=None):
    """One pass over `data`: trains when an optimizer is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    model.train(training)
    loss_function = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    with torch.set_grad_enabled(training):
        for index in batches(len(data.labels), batch_size, generator if training else None):
            images = normalize_batch(data.images[index].to(device, non_blocking=True), normalization)
            labels = data.labels[index].to(device, non_blocking=True)
            logits = model(images)
            loss = loss_function(logits, labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                (loss / len(index)).backward()
                optimizer.step()
            total_loss += loss.item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
    return total_loss / len(data.labels), correct / len(data.labels)


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write atomically, so an interrupted job never leaves a half-written model."""
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, partial)
    partial.replace(path)


def train_classifier(
    model_name: str,
    settings: dict,
    image_settings: dict,
    manifest_path: Path | str,
    checkpoint_path: Path | str,
    threads: int = 1,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Train `settings['arch']` and keep the epoch with the best validation accuracy.

    Ties go to the lower validation loss. Returns (history, summary); `on_epoch` gets
    each history row as it is made (for live curves in MLflow).
    """
    torch.set_num_threads(threads)
    seed_everything(settings["seed"])
    device = pick_device(settings["device"])
    manifest = read_split_manifest(manifest_path)
    classes = class_names(manifest)
    train_data, val_data = load_split(manifest, "train", classes), load_split(manifest, "val", classes)
    normalization = normalization_for(train_data.images, settings["weights"])
    in_channels = train_data.images.shape[1]
    model = build_model(settings["arch"], len(classes), in_channels, settings["weights"],
                        image_settings["size"]).to(device)
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings)
    generator = torch.Generator().manual_seed(settings["seed"])
    log.info("%s: %s on %s, %d classes, %d train / %d val images of %s, %d parameters, %d thread(s)",
             model_name, settings["arch"], device, len(classes), len(train_data.labels), len(val_data.labels),
             tuple(train_data.images.shape[1:]), count_parameters(model), threads)

    checkpoint_path = Path(checkpoint_path)
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    history, best = [], None
    started = time.perf_counter()
    for epoch in range(1, settings["epochs"] + 1):
        epoch_start = time.perf_counter()
        train_loss, train_accuracy = run_epoch(model, train_data, normalization, device, settings["batch_size"],
                                               optimizer, generator)
        val_loss, val_accuracy = run_epoch(model, val_data, normalization, device, settings["batch_size"])
        row = dict(zip(HISTORY_COLUMNS, (epoch, train_loss, train_accuracy, val_loss, val_accuracy,
                                         optimizer.param_groups[0]["lr"], time.perf_counter() - epoch_start)))
        history.append(row)
        log.info("%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.1f s)", model_name, epoch,
                 settings["epochs"], train_loss, train_accuracy, val_loss, val_accuracy, row["seconds"])
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"{model_name}: training loss became {train_loss} at epoch {epoch}; lower lr")
        if best is None or (val_accuracy, -val_loss) > (best["val_accuracy"], -best["val_loss"]):
            best = row
            save_checkpoint({
                "imgpipe_version": __version__,
                "model_name": model_name,
                "arch": settings["arch"],
                "classes": classes,
                "in_channels": in_channels,
                "image": dict(image_settings),
                "normalization": normalization,
                "epoch": epoch,
                "val_accuracy": val_accuracy,
                "val_loss": val_loss,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            }, checkpoint_path)
        if on_epoch is not None:
            on_epoch(row)
        if scheduler is not None:
            scheduler.step()
    summary = {
        "model": model_name,
        "arch": settings["arch"],
        "n_parameters": count_parameters(model),
        "train_seconds": time.perf_counter() - started,
        "best_epoch": best["epoch"],
        "epochs": settings["epochs"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "device": str(device),
        "threads": threads,
        "dataloader_workers": 0,
        "n_train": len(train_data.labels),
        "n_val": len(val_data.labels),
        "classes": classes,
    }
    return pd.DataFrame(history, columns=HISTORY_COLUMNS), summary


def load_trained_model(checkpoint_path: Path | str, device: torch.device | str = "cpu"):
    """(model in eval mode, checkpoint dict) from an imgpipe checkpoint."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = build_model(checkpoint["arch"], len(checkpoint["classes"]), checkpoint["in_channels"],
                        image_size=checkpoint["image"]["size"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


def example_input(checkpoint: dict) -> np.ndarray:
    """One normalised-input-shaped batch (1 x C x H x W), for MLflow's model signature."""
    size = checkpoint["image"]["size"]
    return np.zeros((1, checkpoint["in_channels"], size, size), dtype=np.float32)

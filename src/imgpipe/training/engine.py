"""Train one model: strategy phases, resume after a kill, early stopping, the best epoch kept.

`train_model` is what the train job runs. It saves a resume state after every epoch
(`imgpipe.training.resume`) and, given one, continues from it. The model checkpoint it
writes is plain (tensors, numbers, strings), loads with `torch.load(weights_only=True)`
and carries what inference needs: how to rebuild the network, the classes, the image
settings and the normalisation.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from imgpipe import __version__
from imgpipe.core.files import write_json, writing
from imgpipe.core.manifests import (
    HISTORY_COLUMNS,
    HISTORY_TIMING_COLUMN,
    LOCALIZE_HISTORY_COLUMNS,
    read_split_manifest,
)
from imgpipe.models.checkpoints import (
    model_build_spec,
    read_model_checkpoint,
    read_torch_file,
)
from imgpipe.models.localize import LocalizationLoss
from imgpipe.models.networks import (
    WeightsLoad,
    build_model,
    count_parameters,
    load_matching_weights,
    load_start_weights,
)
from imgpipe.models.settings import model_setting
from imgpipe.training import resume
from imgpipe.training.augment import BatchAugment
from imgpipe.training.datasets import (
    Normalizer,
    SplitTensors,
    class_names,
    load_split,
    normalization_for,
)
from imgpipe.training.loop import (
    BoxTargets,
    EpochTotals,
    Feeder,
    Precision,
    batch_indices,
    batches_per_epoch,
    choose_precision,
    epoch_order,
    evaluate_epoch,
    image_preparation,
    train_epoch,
)
from imgpipe.training.processgroup import SINGLE, ProcessGroup
from imgpipe.training.schedule import make_optimizer, make_scheduler
from imgpipe.training.strategies import (
    HeadInput,
    ModelParts,
    Phase,
    head_logits,
    needs_parts,
    parameter_groups,
    phase_of,
    plan_phases,
)

log = logging.getLogger(__name__)

FEATURE_BATCH = 256


class TrainingDiverged(FloatingPointError):
    """The loss stopped being a finite number."""


@dataclass
class TrainingJob:
    """One model to train. `start_checkpoint` is init_from's model.pt (or None)."""

    model_name: str
    settings: dict
    image_settings: dict
    manifest_path: Path
    work_dir: Path
    checkpoint_path: Path
    device: torch.device
    threads: int = 1
    start_checkpoint: Path | None = None
    metadata: dict = field(default_factory=dict)  # saved with the resume state (the MLflow run id)

    def fingerprint(self) -> str:
        weights = self.settings["weights"]
        start = self.start_checkpoint or (weights if weights not in ("none", "imagenet") else None)
        return resume.training_fingerprint(self.settings, self.image_settings, self.manifest_path, start)


def seed_everything(seed: int, compiling: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS needs this for deterministic matmuls on the GPU; harmless elsewhere.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if compiling or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # What use_deterministic_algorithms does, minus importing torch._inductor (2.2 s per
        # job here) to set a flag that only torch.compile reads.
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def available_memory_bytes() -> int | None:
    """Memory available for new allocations (Linux's MemAvailable, which counts reclaimable
    page cache; elsewhere the free pages); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def class_weight_tensor(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """n / (classes x n_class): sklearn's 'balanced' weights."""
    counts = torch.bincount(labels, minlength=n_classes).double()
    return (len(labels) / (n_classes * counts.clamp_min(1))).float()


def balanced_sample_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-image draw weights that make every class equally likely."""
    counts = torch.bincount(labels, minlength=n_classes).double()
    return (1.0 / counts.clamp_min(1))[labels]


def _better(row: dict, best: dict | None, metric: str) -> bool:
    if best is None:
        return True
    if metric == "val_loss":
        return (-row["val_loss"], row["val_accuracy"]) > (-best["val_loss"], best["val_accuracy"])
    if metric == "val_miou":
        return (row["val_miou"], row["val_accuracy"]) > (best["val_miou"], best["val_accuracy"])
    return (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


class _Run:
    """The pieces of one training run, built the same way whether it starts or resumes."""

    def __init__(self, job: TrainingJob, group: ProcessGroup = SINGLE):
        settings = self.settings = job.settings
        self.job = job
        self.group = group
        self.device = job.device
        manifest = read_split_manifest(job.manifest_path)
        self.classes = class_names(manifest)
        self.train_data: SplitTensors = load_split(manifest, "train", self.classes)
        self.val_data: SplitTensors = load_split(manifest, "val", self.classes)
        self.localize = model_setting(settings, "task") == "localize"
        if self.localize:
            self.train_data, self.val_data = (self._localisation_rows(self.train_data, "train"),
                                              self._localisation_rows(self.val_data, "val"))
        self.in_channels = self.train_data.images.shape[1]
        self.model = build_model(settings["arch"], len(self.classes), self.in_channels,
                                 job.image_settings["size"], settings["truncate"], settings["head_hidden"],
                                 settings["head_dropout"], model_setting(settings, "task"))
        self.weights_load, self.normalization = self._starting_point()
        self.precision: Precision = choose_precision(settings["precision"], self.device)
        self.channels_last = settings["channels_last"] is True or (settings["channels_last"] == "auto"
                                                                   and self.device.type == "cuda")
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.parts = ModelParts(self.model) if needs_parts(settings) else None
        self.phases: list[Phase] = plan_phases(settings)
        groups = parameter_groups(self.parts, settings) if self.parts else [
            {"params": list(self.model.parameters()), "lr": settings["lr"], "name": "all"}]
        self.optimizer = make_optimizer(groups, settings)
        batches = batches_per_epoch(len(self.train_data.labels), settings["batch_size"])
        self.steps_per_epoch = group.steps(batches)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{job.model_name}: {len(self.train_data.labels)} training images make {batches} "
                             f"batch(es) of {settings['batch_size']}, fewer than the {group.world_size} processes "
                             f"training together: lower models.{job.model_name}.batch_size or gpus")
        self.scheduler = make_scheduler(self.optimizer, settings, self.phases, self.steps_per_epoch)
        self.scaler = self.precision.scaler()
        self.generators = {"shuffle": torch.Generator().manual_seed(settings["seed"]),
                           "augment": torch.Generator().manual_seed(settings["seed"] + 1)}
        self.augment = BatchAugment(settings["augment"], self.in_channels)
        n_classes = len(self.classes)
        weights = (class_weight_tensor(self.train_data.labels, n_classes).to(self.device)
                   if settings["class_weights"] == "balanced" else None)
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=settings["label_smoothing"])
        self.boxes = {"train": None, "val": None}
        if self.localize:
            self.criterion = LocalizationLoss(self.criterion, n_classes, model_setting(settings, "box_loss"),
                                              model_setting(settings, "box_loss_weight"))
            self.boxes = {split: BoxTargets(data.boxes, data.has_box, n_classes)
                          for split, data in (("train", self.train_data), ("val", self.val_data))}
        self.sample_weights = (balanced_sample_weights(self.train_data.labels, n_classes)
                               if settings["sampler"] == "balanced" else None)
        self.normalizer = Normalizer(self.normalization, self.device, self.channels_last)
        self.forward = torch.compile(self.model) if settings["compile"] else self.model
        self.feeders = {"train": Feeder(self.train_data.images, self.device),
                        "val": Feeder(self.val_data.images, self.device)}
        self.feature_cache: dict[str, Feeder] = {}
        self._cache_fits: bool | None = None

    def _localisation_rows(self, data: SplitTensors, split: str) -> SplitTensors:
        """A localising model's rows of a split: all (the box loss skips those without a box), or
        with boxes_required only those with a usable box."""
        name = self.job.model_name
        if data.boxes is None:
            raise ValueError(f"{name}: task localize, but the split manifest {self.job.manifest_path} has no boxes: "
                             f"give the classes' sources boxes (a folder's `boxes`, or synthetic sources)")
        usable = int(data.has_box.sum())
        if usable == 0:
            raise ValueError(f"{name}: task localize, but none of the {len(data.labels)} {split} images has a usable "
                             f"box (see box_status in the split manifest)")
        if not model_setting(self.settings, "boxes_required"):
            return data
        if usable < len(data.labels):
            log.info("%s: %d of %d %s images have no usable box and are left out (boxes_required)", name,
                     len(data.labels) - usable, len(data.labels), split)
        without = [self.classes[index] for index in sorted(set(data.labels.tolist()))
                   if not data.has_box[data.labels == index].any()]
        if without:
            log.warning("%s: boxes_required leaves no %s image of class(es) %s, which have no usable box: the model "
                        "never sees them in this split", name, split, ", ".join(without))
        return data.subset(data.has_box)

    def _starting_point(self) -> tuple[WeightsLoad | None, dict]:
        """Load the starting weights; return what loaded and the input normalisation to use.

        A model started from another imgpipe model keeps that model's normalisation, so
        the features it learnt see the inputs they were trained on.
        """
        settings, job = self.settings, self.job
        if job.start_checkpoint is not None:
            source = read_model_checkpoint(job.start_checkpoint)
            origin = f"model '{source.get('model_name', '?')}' ({job.start_checkpoint})"
            return load_matching_weights(self.model, source["state_dict"], origin), source["normalization"]
        if settings["weights"] == "none" and settings["strategy"] != "finetune":
            log.warning("%s: strategy %s with weights: none trains on a randomly initialised, frozen backbone; "
                        "start from weights: imagenet, a checkpoint or init_from for transfer learning",
                        job.model_name, settings["strategy"])
        report = load_start_weights(self.model, settings["arch"], settings["weights"])
        if settings["weights"] not in ("none", "imagenet"):
            payload = read_torch_file(settings["weights"])
            saved = payload.get("normalization") if isinstance(payload, dict) else None
            if isinstance(saved, dict) and len(saved.get("mean", ())) == self.in_channels:
                return report, saved
            if isinstance(saved, dict):
                log.info("%s: %s was trained on %d-channel images, these have %d: normalising with their own "
                         "statistics", job.model_name, settings["weights"], len(saved["mean"]), self.in_channels)
        return report, normalization_for(self.train_data.images, settings["weights"])

    def frozen_inputs(self, phase: Phase) -> bool:
        """Train the head on features cached once: the backbone is frozen and sees fixed inputs."""
        return phase.backbone_frozen and not self.augment.active and self.features_fit_in_memory()

    def head_inputs(self, split: str, rows: int | None = None) -> torch.Tensor:
        """The frozen backbone's output for the split's first `rows` images (all by default)."""
        data = self.train_data if split == "train" else self.val_data
        indices = batch_indices(len(data.labels) if rows is None else rows, FEATURE_BATCH)
        extract = HeadInput(self.parts)
        self.parts.set_training_mode(backbone_frozen=True)
        chunks = []
        with torch.no_grad(), self.precision.autocast():
            for host_index, device_index in epoch_order(indices, self.device):
                chunks.append(extract(self.normalizer(self.feeders[split](host_index, device_index))).float().cpu())
        return torch.cat(chunks)

    def features_fit_in_memory(self) -> bool:
        """Whether caching the backbone's features of both splits takes under a quarter of the
        available memory (VGG16 gives 25,088 floats per image: 10 GB for 100,000 images)."""
        if self._cache_fits is None:
            per_image = self.head_inputs("train", rows=1)[0].numel() * 4
            # every process of data-parallel training keeps a copy; process 0 decides for all
            needed = per_image * (len(self.train_data.labels) + len(self.val_data.labels)) * self.group.world_size
            available = available_memory_bytes()
            fits = available is None or needed < available / 4
            self._cache_fits = bool(self.group.from_main([float(fits)], self.device)[0])
            if not self._cache_fits:
                log.warning("%s: the frozen backbone's features would take %.1f GB of the %.1f GB available; "
                            "they are computed again every epoch instead of cached (slower, same result)",
                            self.job.model_name, needed / 1e9, available / 1e9)
        return self._cache_fits

    def cached_features(self, split: str) -> Feeder:
        if split not in self.feature_cache:
            started = time.perf_counter()
            features = self.head_inputs(split)
            self.feature_cache[split] = Feeder(features, self.device)
            log.info("%s: backbone features of the %s split computed once: %d x %s, %.1f MB, %.1f s",
                     self.job.model_name, split, features.shape[0], tuple(features.shape[1:]),
                     features.numel() * 4 / 1e6, time.perf_counter() - started)
        return self.feature_cache[split]

    def epoch(self, phase: Phase) -> tuple:
        settings = self.settings
        if self.parts is not None:
            self.parts.freeze_backbone(phase.backbone_frozen)
            self.parts.set_training_mode(phase.backbone_frozen)
        else:
            self.model.train()
        # The same order in every process (same seed); each trains on its share of the batches.
        indices = self.group.shard(batch_indices(len(self.train_data.labels), settings["batch_size"],
                                                 self.generators["shuffle"], self.sample_weights))
        sync = None
        if self.group.active:
            def sync():
                self.group.average_gradients(p for group in self.optimizer.param_groups for p in group["params"])

        if self.parts is not None and self.frozen_inputs(phase):
            head = lambda features: head_logits(self.parts, features)  # noqa: E731
            keep = lambda batch: batch  # noqa: E731
            train = train_epoch(head, self.cached_features("train"), self.train_data.labels, indices, keep,
                                self.criterion, self.optimizer, self.scheduler, self.scaler, self.precision, sync,
                                self.boxes["train"])
            train = self.combined(train)
            self.model.eval()
            val = evaluate_epoch(head, self.cached_features("val"), self.val_data.labels, FEATURE_BATCH, keep,
                                 self.precision, self.boxes["val"])
            return train, self.agreed(val)
        prepare = image_preparation(self.augment, self.normalizer, self.generators["augment"])
        forward = self.forward
        if self.parts is not None and phase.backbone_frozen:
            extract = HeadInput(self.parts)

            def forward(images):  # the frozen backbone needs no graph: only the head learns
                with torch.no_grad():
                    features = extract(images)
                return head_logits(self.parts, features)

        train = train_epoch(forward, self.feeders["train"], self.train_data.labels, indices, prepare, self.criterion,
                            self.optimizer, self.scheduler, self.scaler, self.precision, sync, self.boxes["train"])
        train = self.combined(train)
        self.group.broadcast_buffers(self.model)  # BatchNorm statistics: process 0's, as DDP keeps them
        self.model.eval()
        val = evaluate_epoch(self.forward, self.feeders["val"], self.val_data.labels, FEATURE_BATCH,
                             image_preparation(None, self.normalizer, None), self.precision, self.boxes["val"])
        return train, self.agreed(val)

    def combined(self, totals: EpochTotals) -> EpochTotals:
        """An epoch's training loss and accuracy over every process's batches."""
        if not self.group.active:
            return totals
        loss_sum, correct, count, iou_sum, box_count = self.group.sum(
            [totals.loss * totals.count, totals.accuracy * totals.count, totals.count, totals.iou_sum,
             totals.box_count], self.device)
        return EpochTotals(loss_sum / count, correct / count, int(count), iou_sum, int(box_count))

    def agreed(self, val: EpochTotals) -> EpochTotals:
        """Process 0's validation figures in every process, so that all take the same
        best-epoch, early-stopping and divergence decisions."""
        if not self.group.active:
            return val
        loss, accuracy, count, iou_sum, box_count = self.group.from_main(
            [val.loss, val.accuracy, val.count, val.iou_sum, val.box_count], self.device)
        return EpochTotals(loss, accuracy, int(count), iou_sum, int(box_count))

    def model_payload(self, epoch: int, row: dict) -> dict:
        return {
            "imgpipe_version": __version__,
            "model_name": self.job.model_name,
            "arch": self.settings["arch"],
            "build": model_build_spec(self.settings),
            "classes": self.classes,
            "in_channels": self.in_channels,
            "image": dict(self.job.image_settings),
            "normalization": self.normalization,
            "epoch": epoch,
            "val_accuracy": row["val_accuracy"],
            "val_loss": row["val_loss"],
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
        }


@dataclass
class Progress:
    """Where a training run stands after its last finished epoch: what a resume state keeps."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_file: str | None = None  # the best epoch's checkpoint in the work folder (resume.save_best)
    since_best: int = 0
    stopped_early: bool = False
    resumed_at_epoch: int | None = None

    @property
    def next_epoch(self) -> int:
        return self.history[-1]["epoch"] + 1 if self.history else 1


def restore(run: _Run, state: dict | None) -> Progress:
    """The progress of `state` (a resume state, see `capture`), with the run's model, optimizer,
    scheduler, scaler and random generators put back as they were; a fresh start without one."""
    if state is not None and state.get("precision") != run.precision.name:
        log.warning("%s: the resume state was trained in %s, this device trains in %s; training starts at epoch 1",
                    run.job.model_name, state.get("precision"), run.precision.name)
        state = None
    if state is None:
        return Progress()
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    resume.restore_random_state(state["random"], run.generators)
    return Progress(history=[dict(row) for row in state["history"]], best=state["best"],
                    best_file=state["best_file"], since_best=state["since_best"],
                    stopped_early=state["stopped_early"], resumed_at_epoch=state["epoch"] + 1)


def capture(run: _Run, progress: Progress, fingerprint: str) -> dict:
    """The resume state after the last epoch of `progress`: everything `restore` puts back."""
    return {
        "fingerprint": fingerprint,
        "epoch": progress.history[-1]["epoch"],
        "precision": run.precision.name,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "random": resume.capture_random_state(run.generators),
        "history": progress.history,
        "best": progress.best,
        "best_file": progress.best_file,
        "since_best": progress.since_best,
        "stopped_early": progress.stopped_early,
        "metadata": run.job.metadata,
    }


def history_row(run: _Run, epoch: int, phase: Phase, lr: float, train: EpochTotals, val: EpochTotals,
                seconds: float) -> dict:
    """An epoch's row of history.csv (with its wall time, which the written file leaves out)."""
    row = dict(zip(HISTORY_COLUMNS + [HISTORY_TIMING_COLUMN],
                   (epoch, train.loss, train.accuracy, val.loss, val.accuracy, lr, int(phase.backbone_frozen),
                    seconds)))
    if run.localize:
        row |= dict(zip(LOCALIZE_HISTORY_COLUMNS, (train.miou, val.miou)))
    return row


def log_epoch(run: _Run, row: dict, phase: Phase, train: EpochTotals, val: EpochTotals) -> None:
    miou = (lambda totals: f" mIoU {totals.miou:.4f}" if run.localize else "")  # noqa: E731
    log.info("%s epoch %d/%d%s: train loss %.4f acc %.4f%s | val loss %.4f acc %.4f%s | lr %.3g (%.1f s)",
             run.job.model_name, row["epoch"], run.settings["epochs"],
             " (backbone frozen)" if phase.backbone_frozen else "", train.loss, train.accuracy, miou(train),
             val.loss, val.accuracy, miou(val), row["lr"], row[HISTORY_TIMING_COLUMN])


def check_finite(run: _Run, epoch: int, train: EpochTotals, val: EpochTotals) -> None:
    if not (np.isfinite(train.loss) and np.isfinite(val.loss)):
        name = run.job.model_name
        raise TrainingDiverged(
            f"{name}: the loss became {train.loss if not np.isfinite(train.loss) else val.loss} at "
            f"epoch {epoch}; training stopped. Lower models.{name}.lr (now {run.settings['lr']}), add "
            f"warmup_epochs, or use precision: fp32")


def summarize(run: _Run, progress: Progress, metric: str) -> tuple[pd.DataFrame, dict]:
    """(history, summary) of a finished training: what train_model returns."""
    settings, job, best = run.settings, run.job, progress.best
    trainable = run.parts.head_parameters if run.phases[-1].backbone_frozen else list(run.model.parameters())
    summary = {
        "model": job.model_name,
        "arch": settings["arch"],
        "strategy": settings["strategy"],
        "n_parameters": count_parameters(run.model),
        "n_trainable_parameters": sum(p.numel() for p in trainable),
        "train_seconds": sum(row[HISTORY_TIMING_COLUMN] for row in progress.history),
        "best_epoch": best["epoch"],
        "epochs": settings["epochs"],
        "epochs_run": len(progress.history),
        "stopped_early": progress.stopped_early,
        "best_metric": metric,
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "resumed_at_epoch": progress.resumed_at_epoch,
        "device": str(run.device),
        "precision": run.precision.name,
        "channels_last": run.channels_last,
        "threads": job.threads,
        "data_parallel_processes": run.group.world_size,
        "dataloader_workers": 0,
        "n_train": len(run.train_data.labels),
        "n_val": len(run.val_data.labels),
        "classes": run.classes,
        "start_weights": run.weights_load.as_dict() if run.weights_load else None,
    }
    if run.localize:
        summary |= {"task": "localize", "best_val_miou": best["val_miou"], "n_train_boxes": run.boxes["train"].count,
                    "n_val_boxes": run.boxes["val"].count}
    columns = HISTORY_COLUMNS + (LOCALIZE_HISTORY_COLUMNS if run.localize else []) + [HISTORY_TIMING_COLUMN]
    return pd.DataFrame(progress.history, columns=columns), summary


def train_model(job: TrainingJob, on_epoch: Callable[[dict], None] | None = None,
                resume_state: dict | None = None,
                on_start: Callable[[WeightsLoad | None], None] | None = None,
                group: ProcessGroup = SINGLE) -> tuple[pd.DataFrame, dict]:
    """Train `job`, continuing `resume_state` if given; write job.checkpoint_path (the best epoch).

    Returns (history, summary). `on_start` gets what loading the starting weights did,
    before the first epoch; `on_epoch` gets each new history row once its epoch is saved
    (for live curves in MLflow). In data-parallel training (`group`, see
    imgpipe.training.distributed) every process calls this; process 0 alone writes files.
    """
    settings = job.settings
    torch.set_num_threads(job.threads)
    seed_everything(settings["seed"], compiling=settings["compile"])
    run = _Run(job, group)
    if on_start is not None:
        on_start(run.weights_load)
    progress = restore(run, resume_state)
    fingerprint = job.fingerprint()
    early = settings["early_stopping"]
    metric = early["metric"] if early else "val_accuracy"
    log.info("%s: %s (%s) on %s, %s precision, %d classes, %d train / %d val images of %s, %d parameters, "
             "%d thread(s)%s", job.model_name, settings["arch"], settings["strategy"], run.device, run.precision.name,
             len(run.classes), len(run.train_data.labels), len(run.val_data.labels),
             tuple(run.train_data.images.shape[1:]), count_parameters(run.model), job.threads,
             f", resuming at epoch {progress.next_epoch}" if progress.resumed_at_epoch else "")
    started = time.perf_counter()
    for epoch in range(progress.next_epoch, settings["epochs"] + 1):
        if progress.stopped_early:
            break
        phase = phase_of(run.phases, epoch)
        epoch_start, lr = time.perf_counter(), run.optimizer.param_groups[-1]["lr"]
        train, val = run.epoch(phase)
        row = history_row(run, epoch, phase, lr, train, val, time.perf_counter() - epoch_start)
        log_epoch(run, row, phase, train, val)
        check_finite(run, epoch, train, val)
        progress.history.append(row)
        if _better(row, progress.best, metric):
            progress.best, progress.since_best = row, 0
            # A new file per best epoch, named in the resume state only once written: a kill
            # between the two writes leaves the state and its best epoch in agreement.
            progress.best_file = (resume.save_best(job.work_dir, epoch, run.model_payload(epoch, row))
                                  if group.is_main else None)
        else:
            progress.since_best += 1
        # Patience counts in the last phase only: staged never stops before it unfreezes.
        progress.stopped_early = (bool(early) and phase == run.phases[-1]
                                  and progress.since_best >= early["patience"])
        if not group.is_main:
            continue
        resume.save_resume_state(job.work_dir, capture(run, progress, fingerprint))
        resume.remove_other_best_files(job.work_dir, keep=progress.best_file)
        if on_epoch is not None:
            on_epoch(row)
        if progress.stopped_early:
            log.info("%s: early stop after epoch %d: %s has not improved for %d epochs (best: epoch %d)",
                     job.model_name, epoch, metric, early["patience"], progress.best["epoch"])
    group.check_identical(run.model)
    if group.is_main:
        resume.finish(job.work_dir, progress.best_file, job.checkpoint_path)
    log.info("%s: best epoch %d (%s %.4f), %.1f s of training in this job", job.model_name, progress.best["epoch"],
             metric, progress.best[metric], time.perf_counter() - started)
    return summarize(run, progress, metric)


def write_training_outputs(history: pd.DataFrame, summary: dict, history_path: Path | str,
                           summary_path: Path | str, timing_path: Path | str) -> dict:
    """history.csv and summary.json without wall-clock times (the same config trained again
    writes the same bytes), and the times in timing.json; returns the timing."""
    timing = {
        "train_seconds": summary["train_seconds"],
        "epoch_seconds": history[HISTORY_TIMING_COLUMN].tolist(),
    }
    results = {key: value for key, value in summary.items() if key != "train_seconds"}
    # (training is done: a rerun after a full disk resumes at its last epoch and writes these again)
    with writing(history_path):
        history.drop(columns=HISTORY_TIMING_COLUMN).to_csv(history_path, index=False, lineterminator="\n")
    write_json(summary_path, results)
    write_json(timing_path, timing)
    return timing


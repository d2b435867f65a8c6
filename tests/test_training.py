"""The training engine: strategies, resume after a kill, early stopping, schedules, imbalance."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_shapes_manifest, model_settings

from imgpipe.core.manifests import HISTORY_COLUMNS, HISTORY_TIMING_COLUMN
from imgpipe.models.checkpoints import read_torch_file
from imgpipe.models.networks import build_model
from imgpipe.training import resume
from imgpipe.training.engine import (
    TrainingDiverged,
    TrainingJob,
    balanced_sample_weights,
    class_weight_tensor,
    train_model,
    write_training_outputs,
)
from imgpipe.training.loop import batch_indices, batches_per_epoch
from imgpipe.training.schedule import lr_multiplier
from imgpipe.training.strategies import ModelParts, Phase, plan_phases

IMAGE = {"size": 32, "color": "grayscale", "resize": "stretch", "pad_color": "black"}


def job(tmp_path, manifest, name="m", start_checkpoint=None, **overrides) -> TrainingJob:
    folder = tmp_path / name
    return TrainingJob(name, model_settings(**overrides), IMAGE, manifest, folder / "resume", folder / "model.pt",
                       torch.device("cpu"), start_checkpoint=start_checkpoint)


def state_dicts_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class Killed(Exception):
    """Stands for a SIGKILL right after an epoch was saved (the e2e test kills for real)."""


def test_training_keeps_the_best_validation_epoch_and_is_reproducible(shapes_manifest, tmp_path):
    epochs_seen = []
    first = job(tmp_path, shapes_manifest, "a", epochs=4, lr=0.01, batch_size=16, scheduler="cosine")
    history, summary = train_model(first, on_epoch=epochs_seen.append)
    assert list(history.columns) == HISTORY_COLUMNS + [HISTORY_TIMING_COLUMN] and len(history) == 4
    assert [row["epoch"] for row in epochs_seen] == [1, 2, 3, 4]
    best = history.sort_values(["val_accuracy", "val_loss"], ascending=[False, True]).iloc[0]
    assert summary["best_epoch"] == best["epoch"]
    checkpoint = torch.load(first.checkpoint_path, weights_only=True)
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["classes"] == ["bright", "dark"]
    assert checkpoint["image"] == IMAGE and summary["device"] == "cpu" and summary["threads"] == 1
    assert summary["best_val_accuracy"] > 0.8  # two easy shapes: a model that learned nothing scores 0.5
    assert (first.work_dir / resume.LAST).exists()  # cleared by the job once every output is written

    again, again_summary = train_model(job(tmp_path, shapes_manifest, "b", epochs=4, lr=0.01, batch_size=16,
                                           scheduler="cosine"))
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), again.drop(columns="seconds"))

    # written out, the results are the same bytes; the times go to timing.json
    for name, (table, figures) in {"a": (history, summary), "b": (again, again_summary)}.items():
        timing = write_training_outputs(table, figures, tmp_path / f"{name}.csv", tmp_path / f"{name}.json",
                                        tmp_path / f"{name}.timing.json")
        assert timing["epoch_seconds"] == table["seconds"].tolist() and timing["train_seconds"] > 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert pd.read_csv(tmp_path / "a.csv").columns.tolist() == HISTORY_COLUMNS
    assert "train_seconds" not in json.loads((tmp_path / "a.json").read_text())


@pytest.mark.parametrize("overrides, killed_after", [
    # every random draw a run makes: shuffling, augmentation, dropout, the balanced sampler
    (dict(arch="resnet18", truncate="layer3", head_hidden=[16], head_dropout=0.5, augment="standard",
          sampler="balanced", class_weights="balanced", optimizer="sgd", scheduler="cosine", warmup_epochs=1), 3),
    (dict(strategy="staged", head_epochs=2, scheduler="step", step_epochs=1, step_gamma=0.5, label_smoothing=0.1), 3),
    # killed in the head phase: the feature cache is rebuilt, then the backbone unfreezes
    (dict(arch="resnet18", strategy="staged", head_epochs=3, backbone_lr_factor=0.5), 2),
    (dict(arch="resnet18", strategy="feature_extract", augment="none", early_stopping={"patience": 3}), 3),
    # the early stop falls after the resumption (lr too small to improve on epoch 1)
    (dict(lr=1e-7, early_stopping={"patience": 2, "metric": "val_loss"}), 1),
], ids=["finetune-augmented", "staged", "staged-killed-in-head-phase", "feature-extract-cached", "early-stop"])
def test_a_run_killed_after_an_epoch_resumes_to_exactly_the_uninterrupted_result(shapes_manifest, tmp_path, overrides,
                                                                                 killed_after):
    settings = {"epochs": 5, "lr": 0.01, "batch_size": 8, **overrides}
    uninterrupted = job(tmp_path, shapes_manifest, "whole", **settings)
    history, summary = train_model(uninterrupted)

    interrupted = job(tmp_path, shapes_manifest, "killed", **settings)
    interrupted.metadata = {"mlflow_run_id": "abc"}

    def kill(row):
        if row["epoch"] == killed_after:
            raise Killed

    with pytest.raises(Killed):
        train_model(interrupted, on_epoch=kill)
    assert not interrupted.checkpoint_path.exists()
    state = resume.load_resume_state(interrupted.work_dir, interrupted.fingerprint())
    assert state["epoch"] == killed_after and state["metadata"] == {"mlflow_run_id": "abc"}
    logged = []
    resumed_history, resumed_summary = train_model(interrupted, on_epoch=logged.append, resume_state=state)

    assert [row["epoch"] for row in logged] == list(range(killed_after + 1, summary["epochs_run"] + 1))
    assert resumed_summary["resumed_at_epoch"] == killed_after + 1
    assert resumed_summary["stopped_early"] == summary["stopped_early"]
    assert resumed_summary["n_trainable_parameters"] == summary["n_trainable_parameters"]
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), resumed_history.drop(columns="seconds"))
    whole = torch.load(uninterrupted.checkpoint_path, weights_only=True)
    again = torch.load(interrupted.checkpoint_path, weights_only=True)
    assert whole["epoch"] == again["epoch"] == summary["best_epoch"]
    assert state_dicts_equal(whole["state_dict"], again["state_dict"])  # bit for bit


def test_a_resume_state_of_other_settings_is_not_used(shapes_manifest, tmp_path, caplog):
    first = job(tmp_path, shapes_manifest, "m", epochs=2)
    train_model(first)
    assert resume.load_resume_state(first.work_dir, first.fingerprint())["epoch"] == 2
    changed = job(tmp_path, shapes_manifest, "m", epochs=2, lr=0.002)
    same_but_threads = job(tmp_path, shapes_manifest, "m", epochs=2, threads=2)
    with caplog.at_level(logging.WARNING):
        assert resume.load_resume_state(changed.work_dir, changed.fingerprint()) is None
    assert "saved for other settings" in caplog.text
    assert same_but_threads.fingerprint() == first.fingerprint()  # where it runs, not what it computes
    other_data = make_shapes_manifest(tmp_path / "other", per_class=12)
    assert job(tmp_path, other_data, "m", epochs=2).fingerprint() != first.fingerprint()


def test_a_damaged_resume_state_is_ignored_with_a_warning(shapes_manifest, tmp_path, caplog):
    first = job(tmp_path, shapes_manifest, "m", epochs=1)
    train_model(first)
    last = first.work_dir / resume.LAST
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert resume.load_resume_state(first.work_dir, first.fingerprint()) is None
    assert "truncated or corrupt" in caplog.text and "epoch 1" in caplog.text


def donor_checkpoint(tmp_path, shapes_manifest, **overrides):
    donor = job(tmp_path, shapes_manifest, "donor", epochs=1, **overrides)
    train_model(donor)
    return donor.checkpoint_path


def test_feature_extract_trains_only_the_head_and_keeps_batchnorm_statistics(shapes_manifest, tmp_path, caplog):
    donor = donor_checkpoint(tmp_path, shapes_manifest, arch="resnet18")
    start = read_torch_file(donor)["state_dict"]
    with caplog.at_level(logging.INFO):
        _, summary = train_model(job(tmp_path, shapes_manifest, "frozen", start_checkpoint=donor, arch="resnet18",
                                     strategy="feature_extract", epochs=3, lr=0.05))
    trained = read_torch_file(tmp_path / "frozen" / "model.pt")["state_dict"]
    backbone = [name for name in start if not name.startswith("fc.")]
    assert any("running_mean" in name for name in backbone)
    assert all(torch.equal(start[name], trained[name]) for name in backbone)  # weights and BN statistics
    assert not torch.equal(start["fc.weight"], trained["fc.weight"])
    assert summary["n_trainable_parameters"] == 512 * 2 + 2
    assert "backbone features of the train split computed once" in caplog.text


def test_feature_extract_with_augmentation_runs_the_frozen_backbone_per_batch(shapes_manifest, tmp_path):
    donor = donor_checkpoint(tmp_path, shapes_manifest, arch="resnet18")
    start = read_torch_file(donor)["state_dict"]
    train_model(job(tmp_path, shapes_manifest, "frozen", start_checkpoint=donor, arch="resnet18",
                    strategy="feature_extract", augment="light", epochs=2, lr=0.05))
    trained = read_torch_file(tmp_path / "frozen" / "model.pt")["state_dict"]
    assert all(torch.equal(start[name], trained[name]) for name in start if not name.startswith("fc."))
    assert not torch.equal(start["fc.weight"], trained["fc.weight"])


def test_staged_freezes_the_backbone_for_the_head_epochs_then_trains_it_slower(shapes_manifest, tmp_path):
    donor = donor_checkpoint(tmp_path, shapes_manifest, arch="resnet18")
    start = read_torch_file(donor)["state_dict"]
    staged = job(tmp_path, shapes_manifest, "staged", start_checkpoint=donor, arch="resnet18", strategy="staged",
                 head_epochs=2, epochs=3, lr=0.01, backbone_lr_factor=0.1)
    snapshots = {}

    def keep_state(row):
        state = read_torch_file(staged.work_dir / resume.LAST)
        snapshots[row["epoch"]] = state

    history, _ = train_model(staged, on_epoch=keep_state)
    after_head = snapshots[2]["model"]
    assert all(torch.equal(start[n], after_head[n]) for n in start if not n.startswith("fc."))
    assert not torch.equal(start["fc.weight"], after_head["fc.weight"])
    assert not torch.equal(start["layer1.0.conv1.weight"], snapshots[3]["model"]["layer1.0.conv1.weight"])
    groups = {group["name"]: group["lr"] for group in snapshots[3]["optimizer"]["param_groups"]}
    assert groups["backbone"] == pytest.approx(0.1 * groups["head"])
    assert history["backbone_frozen"].tolist() == [1, 1, 0]


def test_model_parts_put_a_frozen_backbone_in_eval_mode():
    parts = ModelParts(build_model("resnet18", 2, 1))
    parts.freeze_backbone(True)
    parts.set_training_mode(backbone_frozen=True)
    assert not parts.model.bn1.training and not parts.model.layer4[1].bn2.training and parts.head.training
    assert not any(p.requires_grad for p in parts.backbone_parameters)
    assert all(p.requires_grad for p in parts.head_parameters)
    parts.freeze_backbone(False)
    parts.set_training_mode(backbone_frozen=False)
    assert parts.model.bn1.training and all(p.requires_grad for p in parts.model.parameters())


def test_init_from_starts_from_that_model_and_keeps_its_normalisation(shapes_manifest, tmp_path):
    donor = donor_checkpoint(tmp_path, shapes_manifest)
    source = read_torch_file(donor)
    _, summary = train_model(job(tmp_path, shapes_manifest, "child", start_checkpoint=donor, epochs=1))
    child = read_torch_file(tmp_path / "child" / "model.pt")
    assert child["normalization"] == source["normalization"]
    assert summary["start_weights"]["fresh"] == [] and len(summary["start_weights"]["loaded"]) == 10
    assert "donor" in summary["start_weights"]["origin"]


def test_a_start_that_fits_only_the_head_is_refused(tmp_path):
    # simple_cnn's head.bias fits a Swin's head by name and shape: a "transfer" of 2 numbers
    from imgpipe.models.networks import SimpleCNN, load_matching_weights

    with pytest.raises(ValueError, match=r"only head tensors \(head.bias\) of its 10 tensors fit this SwinTransformer"):
        load_matching_weights(build_model("swin_t", 2, 1, image_size=32), SimpleCNN(1, 2).state_dict(), "the cnn")


def test_starting_from_a_checkpoint_of_another_architecture_fails_naming_it(shapes_manifest, tmp_path):
    donor = donor_checkpoint(tmp_path, shapes_manifest)  # simple_cnn
    with pytest.raises(ValueError, match=r"model 'donor' .*none of its 10 tensors fit this MobileNetV3"):
        train_model(job(tmp_path, shapes_manifest, "mobile", start_checkpoint=donor, arch="mobilenet_v3_small"))


def test_a_diverging_loss_stops_with_a_message_that_says_what_to_do(shapes_manifest, tmp_path):
    diverging = job(tmp_path, shapes_manifest, "boom", optimizer="sgd", lr=1e12, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"boom: the loss became (nan|inf).*models.boom.lr"):
        train_model(diverging)
    assert not diverging.checkpoint_path.exists()


def test_early_stopping_stops_after_patience_epochs_without_improvement(shapes_manifest, tmp_path):
    _, summary = train_model(job(tmp_path, shapes_manifest, "stuck", lr=1e-9, epochs=10,
                                 early_stopping={"patience": 2, "metric": "val_loss"}))
    assert summary["stopped_early"] and summary["best_metric"] == "val_loss"
    assert summary["epochs_run"] < 10 and summary["epochs_run"] - summary["best_epoch"] == 2


def test_precision_and_memory_format_branches_run_on_the_cpu(shapes_manifest, tmp_path):
    # bf16 / fp16 autocast (fp16 with a gradient scaler) and channels_last, as on a GPU
    weights = {}
    for precision in ("fp32", "bf16", "fp16"):
        trained = job(tmp_path, shapes_manifest, precision, precision=precision, channels_last=True, epochs=1)
        states = []
        _, summary = train_model(trained, on_epoch=lambda row: states.append(
            read_torch_file(trained.work_dir / resume.LAST)))
        assert summary["precision"] == precision and summary["channels_last"]
        assert bool(states[0]["scaler"]) == (precision == "fp16")  # a live gradient scaler only for fp16
        weights[precision] = read_torch_file(trained.checkpoint_path)["state_dict"]["head.weight"]
    # autocast really computed in lower precision: same seed, same data, other weights
    assert not torch.equal(weights["fp32"], weights["bf16"]) and not torch.equal(weights["fp32"], weights["fp16"])


def test_a_resume_state_of_another_precision_starts_over(shapes_manifest, tmp_path, caplog):
    bf16 = job(tmp_path, shapes_manifest, "m", precision="bf16", epochs=2)
    train_model(bf16)
    state = resume.load_resume_state(bf16.work_dir, bf16.fingerprint())
    state["precision"] = "fp16"  # as if saved on a GPU without bf16
    with caplog.at_level(logging.WARNING):
        _, summary = train_model(bf16, resume_state=state)
    assert "trained in fp16, this device trains in bf16" in caplog.text and summary["resumed_at_epoch"] is None


def test_a_feeder_on_a_device_gathers_batches_there():
    # the branch a GPU takes when the split fits in its memory; torch's meta device stands in
    from imgpipe.training.loop import Feeder, epoch_order

    feeder = Feeder(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.device("meta"))
    assert feeder.resident and feeder.data.device.type == "meta"
    batches = [feeder(host, device) for host, device in epoch_order([torch.tensor([0, 3]), torch.tensor([5])],
                                                                     torch.device("meta"))]
    assert [tuple(b.shape) for b in batches] == [(2, 1, 4, 4), (1, 1, 4, 4)]
    assert all(b.device.type == "meta" for b in batches)


def test_compile_keeps_plain_checkpoint_names(shapes_manifest, tmp_path):
    _, summary = train_model(job(tmp_path, shapes_manifest, "compiled", compile=True, epochs=1))
    names = read_torch_file(tmp_path / "compiled" / "model.pt")["state_dict"]
    assert "head.weight" in names and not any("_orig_mod" in name for name in names)


def test_balanced_class_weights_and_sampler_on_imbalanced_labels():
    labels = torch.tensor([0] * 90 + [1] * 10)
    assert class_weight_tensor(labels, 2).tolist() == pytest.approx([100 / 180, 100 / 20])
    weights = balanced_sample_weights(labels, 2)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([index for _ in range(100) for index in batch_indices(100, 10, generator, weights)])
    share_of_minority = (labels[drawn] == 1).float().mean().item()
    assert 0.45 < share_of_minority < 0.55  # 0.10 without the sampler


def test_a_lone_last_training_sample_joins_the_batch_before():
    chunks = batch_indices(33, 8, torch.Generator().manual_seed(0))
    assert [len(c) for c in chunks] == [8, 8, 8, 9] and batches_per_epoch(33, 8) == 4
    assert [len(c) for c in batch_indices(33, 8)] == [8, 8, 8, 8, 1]  # evaluation keeps every sample alone


def test_learning_rate_schedules():
    settings = model_settings(epochs=4, scheduler="cosine", warmup_epochs=1)
    phases = plan_phases(settings)
    cosine = lr_multiplier(settings, phases, steps_per_epoch=10)
    assert [cosine(step) for step in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert cosine(10) == pytest.approx(1.0) and cosine(25) == pytest.approx(0.5) and cosine(39) < 0.01
    step = lr_multiplier(model_settings(epochs=6, scheduler="step", step_epochs=2, step_gamma=0.1), phases, 10)
    assert [step(s) for s in (0, 19, 20, 40)] == pytest.approx([1, 1, 0.1, 0.01])
    staged = model_settings(epochs=4, strategy="staged", head_epochs=2, scheduler="cosine")
    restart = lr_multiplier(staged, plan_phases(staged), steps_per_epoch=10)
    assert restart(0) == restart(20) == pytest.approx(1.0)  # the schedule restarts when the backbone unfreezes
    assert restart(19) < 0.01
    assert plan_phases(staged) == [Phase(1, 2, True), Phase(3, 2, False)]


def test_the_resume_guard_covers_every_imgpipe_module_that_training_imports():
    """A change to any module training runs (the localiser's loss in localize.py, too) discards a
    resume state rather than mixing two versions of the code in one run."""
    import subprocess
    import sys

    from conftest import REPO

    entry_points = ", ".join(resume.TRAINING_ENTRY_POINTS)
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {entry_points}\n"
                               "print('\\n'.join(m.__file__ for n, m in sorted(sys.modules.items())"
                               " if n.split('.')[0] == 'imgpipe' and getattr(m, '__file__', None)))"],
        capture_output=True, text=True, check=True).stdout.split()
    covered = set(resume.training_code_files())
    assert loaded and {Path(path).resolve() for path in loaded} <= covered
    package = REPO / "src" / "imgpipe"
    assert {package / "models" / "localize.py", package / "training" / "loop.py",
            package / "models" / "networks.py"} <= covered


def test_the_resume_guard_follows_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "entry.py").write_text("import os\nfrom pkg.sub import helper\n\ndef run():\n    from . import lazy\n")
    (package / "sub" / "helper.py").write_text("from .. import shared\nfrom pkg.shared import NAME\n")
    (package / "lazy.py").write_text("import pkg.deep.er\n")
    (package / "shared.py").write_text("NAME = 1\n")
    (package / "unused.py").write_text("")
    (package / "deep").mkdir()
    (package / "deep" / "er.py").write_text("")  # a namespace folder without __init__.py
    files = resume.imported_package_files(["pkg.entry"], package)
    assert [path.relative_to(package).as_posix() for path in files] == [
        "__init__.py", "deep/er.py", "entry.py", "lazy.py", "shared.py", "sub/__init__.py", "sub/helper.py"]

import html as html_module
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgpipe.evaluation.plots import plot_confusion_matrix, plot_roc_curves
from imgpipe.evaluation.report import _cheapest, rank_models, stale_model_results, write_report
from imgpipe.evaluation.stats import roc_curves

CLASSES = ["cat", "dog", "fox"]

# Three models: resnet18 is best by accuracy; mobilenet and cnn tie on accuracy and
# mobilenet wins on macro F1. cnn alone has no ROC AUC.
MODELS = {
    "cnn": dict(arch="simple_cnn", accuracy=0.95, balanced_accuracy=0.949, macro_f1=0.948, roc_auc=None,
                n_parameters=23456, train_seconds=12.34, inference_ms_per_image=0.12, best_epoch=27, epochs=30),
    "resnet18": dict(arch="resnet18", accuracy=0.97, balanced_accuracy=0.969, macro_f1=0.968, roc_auc=0.995,
                     n_parameters=11_177_538, train_seconds=301.27, inference_ms_per_image=2.5, best_epoch=8,
                     epochs=10),
    "mobilenet": dict(arch="mobilenet_v3_small", accuracy=0.95, balanced_accuracy=0.951, macro_f1=0.951,
                      roc_auc=0.991, n_parameters=1_520_000, train_seconds=80.0, inference_ms_per_image=0.9,
                      best_epoch=9, epochs=10),
}


def metrics_json(model, figures):
    f1 = figures["macro_f1"]
    return {
        "model": model, "n_test": 90, "roc_auc_note": None if figures["roc_auc"] else "probabilities not saved",
        "classes": CLASSES,
        "per_class": {c: {"precision": f1, "recall": f1, "f1": round(f1 + 0.01 * (i - 1), 4), "support": 30}
                      for i, c in enumerate(CLASSES)},
        "confusion_matrix": [[28, 2, 0], [1, 28, 1], [0, 1, 29]],
        "device": "cpu", "mlflow_run_id": None, "best_val_accuracy": 0.96,
        **figures,
    }


# Test images each model gets wrong: resnet18 and mobilenet disagree on 2 images (a tie
# for McNemar); the CNN is wrong on 27 that resnet18 gets right (a significant gap).
WRONG = {"resnet18": range(0, 3), "mobilenet": range(0, 5), "cnn": range(0, 30)}


def write_predictions(path, y, wrong):
    predicted = [CLASSES[(label + 1) % 3] if i in wrong else CLASSES[label] for i, label in enumerate(y)]
    frame = pd.DataFrame({"path": [f"test/{i}.png" for i in range(len(y))], "label": [CLASSES[i] for i in y],
                          "predicted": predicted, "confidence": 0.9})
    frame.to_csv(path, index=False)
    return path


def write_history(path, epochs):
    epoch = np.arange(1, epochs + 1)
    pd.DataFrame({
        "epoch": epoch, "train_loss": 1 / epoch, "train_accuracy": 1 - 0.5 / epoch,
        "val_loss": 1.1 / epoch, "val_accuracy": 1 - 0.55 / epoch, "lr": 0.001, "seconds": 0.5,
    }).to_csv(path, index=False)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """results/<exp>/ with eval, models, split and dedupe outputs for three models."""
    root = tmp_path_factory.mktemp("results") / "pets"
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    metrics_paths, history_paths, predictions_paths = {}, {}, {}
    for model, figures in MODELS.items():
        eval_dir, model_dir = root / "eval" / model, root / "models" / model
        model_dir.mkdir(parents=True)
        metrics = metrics_json(model, figures)
        plot_confusion_matrix(metrics["confusion_matrix"], CLASSES, eval_dir / "confusion_matrix.png", model)
        probabilities = rng.dirichlet(np.ones(3), size=len(y)) + np.eye(3)[y]
        plot_roc_curves(roc_curves(y, probabilities / probabilities.sum(1, keepdims=True), CLASSES),
                        eval_dir / "roc.png", model)
        (eval_dir / "metrics.json").write_text(json.dumps(metrics))
        write_history(model_dir / "history.csv", figures["epochs"])
        metrics_paths[model], history_paths[model] = eval_dir / "metrics.json", model_dir / "history.csv"
        predictions_paths[model] = write_predictions(eval_dir / "predictions.csv", y, WRONG[model])

    (root / "split").mkdir()
    counts = {"cat": (70, 15, 15), "dog": (56, 12, 12), "fox": (35, 8, 7)}
    rows = [(f"{c}/{c}_{split}_{i}.png", c, split)
            for c, per_split in counts.items() for split, n in zip(("train", "val", "test"), per_split)
            for i in range(n)]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(root / "split" / "manifest.csv", index=False)

    (root / "dedupe").mkdir()
    fates = [("cat", "kept", "")] * 100 + [("cat", "dropped", "exact_duplicate")] * 4 \
        + [("dog", "kept", "")] * 80 + [("dog", "dropped", "corrupt")] * 2 \
        + [("dog", "dropped", "cross_class_near")] * 3 + [("fox", "kept", "")] * 50
    dedupe = pd.DataFrame(
        [(f"raw/{c}/{i}.jpg", c, f"{i:064x}", f"{i:016x}", status, reason, "", "", i)
         for i, (c, status, reason) in enumerate(fates)],
        columns=["file", "class", "sha256", "phash", "status", "reason", "duplicate_of", "distance", "group"],
    )
    dedupe.to_csv(root / "dedupe" / "manifest.csv", index=False)
    return dict(root=root, metrics_paths=metrics_paths, history_paths=history_paths,
                predictions_paths=predictions_paths,
                split_manifest=root / "split" / "manifest.csv", dedupe_manifest=root / "dedupe" / "manifest.csv")


def report(experiment, out_name="report", rank_by="accuracy", **overrides):
    kwargs = dict(experiment="pets", metrics_paths=experiment["metrics_paths"],
                  history_paths=experiment["history_paths"], split_manifest=experiment["split_manifest"],
                  dedupe_manifest=experiment["dedupe_manifest"], out_dir=experiment["root"] / out_name,
                  rank_by=rank_by, predictions_paths=experiment["predictions_paths"])
    kwargs.update(overrides)
    summary = write_report(**kwargs)
    out_dir = kwargs["out_dir"]
    return summary, (out_dir / "report.md").read_text(), (out_dir / "report.html").read_text()


def table_row_order(md, models):
    """Models in the order their comparison-table rows appear."""
    section = md.split("## Comparison", 1)[1].split("\n## ", 1)[0]
    positions = {m: re.search(rf"^\| {re.escape(m)} +\|", section, re.M) for m in models}
    assert all(positions.values()), positions
    return sorted(models, key=lambda m: positions[m].start())


def test_report_ranks_models_and_names_the_best(experiment):
    summary, md, _ = report(experiment)
    assert md.startswith("# Model comparison: pets\n")
    assert table_row_order(md, list(MODELS)) == ["resnet18", "mobilenet", "cnn"]
    best = md.split("## Best model", 1)[1].split("\n## ", 1)[0]
    assert best.strip().startswith("resnet18 (resnet18) ranks first of 3 models by accuracy")
    assert "leads the runner-up, mobilenet, by 0.0200 accuracy" in best
    assert summary["best_model"] == "resnet18"
    assert summary["best_value"] == 0.97
    assert summary["runner_up"] == "mobilenet"
    assert summary["margin"] == pytest.approx(0.02)
    assert summary["ranking"] == ["resnet18", "mobilenet", "cnn"]
    json.dumps(summary)  # the caller logs it to MLflow


def test_report_formats_numbers(experiment):
    _, md, _ = report(experiment)
    row = next(line for line in md.splitlines() if line.startswith("| resnet18 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["resnet18", "resnet18", "0.9700", "0.9680", "0.9690", "n/a", "0.9950", "n/a", "n/a"]
    cost = next(line for line in md.split("### Size and speed")[1].splitlines() if line.startswith("| resnet18 "))
    assert [c.strip() for c in cost.strip("|").split("|")] == ["resnet18", "11,177,538", "n/a", "301.3", "2.500",
                                                               "n/a", "8 / 10"]
    cnn_row = next(line for line in md.splitlines() if line.startswith("| cnn "))
    assert "n/a" in cnn_row  # no ROC AUC
    assert "cnn: no ROC AUC (probabilities not saved)" in md


def test_report_per_class_and_data_sections(experiment):
    _, md, _ = report(experiment)
    per_class = md.split("## Per-class F1", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\| class +\| +test images \| +resnet18 \| +mobilenet \| +cnn \|", per_class, re.M)
    assert re.search(r"^\| fox +\| +30 \| +0\.9780 \| +0\.9610 \| +0\.9580 \|", per_class, re.M)
    data = md.split("## Data", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\| dog +\| +56 \| +12 \| +12 \| +80 \|", data, re.M)
    assert re.search(r"^\| total +\| +161 \| +35 \| +34 \| +230 \|", data, re.M)
    assert "239 images were collected; deduplication and cleaning kept 230 (96.2%) and dropped 9" in data
    header = next(line for line in data.splitlines() if "dropped: corrupt" in line)
    # drop reasons in the canonical order, only those that occur
    assert re.findall(r"dropped: (\w+)", header) == ["corrupt", "cross_class_near", "exact_duplicate"]
    assert re.search(r"^\| dog +\| +80 \| +2 \| +3 \| +0 \| +85 \|", data, re.M)


def test_markdown_links_plots_relative_to_report(experiment):
    _, md, _ = report(experiment)
    out_dir = experiment["root"] / "report"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "learning_curves.png" in links
    assert "../eval/cnn/confusion_matrix.png" in links and "../eval/mobilenet/roc.png" in links
    assert len(links) == 1 + 2 * len(MODELS)  # the fixture draws 2 of each model's plots
    assert all((out_dir / link).is_file() for link in links)
    assert (out_dir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_self_contained(experiment):
    _, _, html = report(experiment)
    assert html.count('src="data:image/png;base64,') == 1 + 2 * len(MODELS)
    references = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)|url\(([^)]*)\)""", html)
    assert references and all(ref.startswith("data:") for pair in references for ref in pair if ref)
    assert "<table>" in html and "<th>model" in html.replace(" ", "")
    assert "resnet18 (resnet18) ranks first of 3 models" in html


def test_missing_and_broken_models_are_listed_not_fatal(experiment, tmp_path):
    broken = tmp_path / "metrics.json"
    broken.write_text("{not json")
    metrics_paths = dict(experiment["metrics_paths"], vit=tmp_path / "nope" / "metrics.json", effnet=broken)
    history_paths = dict(experiment["history_paths"], vit=tmp_path / "nope" / "history.csv")
    summary, md, html = report(experiment, out_name="report_failed", metrics_paths=metrics_paths,
                               history_paths=history_paths)
    failed = md.split("## Failed models", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^- vit: metrics file not found: .*nope/metrics\.json$", failed, re.M)
    assert re.search(r"^- effnet: cannot read .*metrics\.json", failed, re.M)
    assert table_row_order(md, list(MODELS)) == ["resnet18", "mobilenet", "cnn"]
    assert "vit: no training history" in md
    assert set(summary["failed_models"]) == {"vit", "effnet"}
    assert summary["ranking"] == ["resnet18", "mobilenet", "cnn"]
    assert "Failed models" in html


def test_report_with_no_readable_model_still_renders(experiment, tmp_path):
    summary, md, html = report(experiment, out_name="report_empty",
                               metrics_paths={"cnn": tmp_path / "missing.json"}, history_paths={})
    assert summary["best_model"] is None and summary["ranking"] == []
    assert "No model produced readable metrics" in md
    assert "- cnn: metrics file not found" in md
    assert html.count("data:image/png") == 1  # the (empty) learning curves


def test_null_roc_auc_ranks_last(experiment):
    summary, md, _ = report(experiment, out_name="report_auc", rank_by="roc_auc")
    assert summary["ranking"] == ["resnet18", "mobilenet", "cnn"]
    assert "by 0.0040 ROC AUC" in md


def test_ties_broken_by_macro_f1_then_parameters():
    base = dict(accuracy=0.9, balanced_accuracy=0.9, roc_auc=None)
    metrics = {
        "big": dict(base, macro_f1=0.88, n_parameters=1000),
        "small": dict(base, macro_f1=0.88, n_parameters=10),
        "sharp": dict(base, macro_f1=0.89, n_parameters=10**6),
        "worse": dict(base, accuracy=0.8, macro_f1=0.99, n_parameters=1),
    }
    assert rank_models(metrics, "accuracy") == ["sharp", "small", "big", "worse"]
    # no model has a ROC AUC: the ranking falls back to the tie-breakers alone
    assert rank_models(metrics, "roc_auc") == ["worse", "sharp", "small", "big"]


def test_tie_explained_in_best_model_sentence(experiment, tmp_path):
    paths = {}
    for model, params in (("big", 5_000_000), ("small", 50_000)):
        figures = dict(MODELS["cnn"], arch=model, roc_auc=0.99, n_parameters=params)
        paths[model] = tmp_path / model / "metrics.json"
        paths[model].parent.mkdir()
        paths[model].write_text(json.dumps(metrics_json(model, figures)))
    summary, md, _ = report(experiment, out_name="report_tie", metrics_paths=paths, history_paths={})
    assert summary["best_model"] == "small" and summary["margin"] == 0
    assert "ties with the runner-up, big, on accuracy, and equals it on macro F1; it ranks first for having " \
           "fewer parameters (50,000 vs 5,000,000)" in md
    assert "confusion matrix not found" in md  # no plots next to these metrics files


@pytest.mark.parametrize("rank_by", ["f1", "loss", ""])
def test_invalid_rank_by_raises_before_writing(experiment, rank_by):
    out_dir = experiment["root"] / f"report_invalid_{rank_by}"
    with pytest.raises(ValueError, match=rf"rank_by '{rank_by}' is not one of accuracy, balanced_accuracy"):
        report(experiment, out_dir=out_dir, rank_by=rank_by)
    assert not out_dir.exists()


def test_a_lead_that_mcnemar_cannot_confirm_is_called_a_tie(experiment):
    summary, md, html = report(experiment, out_name="report_stats")
    # resnet18 vs mobilenet: 2 images only resnet18 gets right, none the other way: p = 0.5.
    tests = {(t["a"], t["b"]): t for t in summary["pairwise"]}
    pair = tests.get(("resnet18", "mobilenet")) or tests[("mobilenet", "resnet18")]
    assert {pair["a_only"], pair["b_only"]} == {2, 0} and pair["p_value"] == pytest.approx(0.5)
    assert summary["tied_with_best"] == ["mobilenet"] and summary["significant_best"] is False
    assert summary["verdict"].startswith("No significant winner: resnet18 ranks first by accuracy (0.9700) but "
                                         "is statistically tied with mobilenet")
    assert "mobilenet is the cheapest of them" in summary["verdict"]
    # first thing under the title, after the data warnings (the fixture's dog class lost images across classes)
    assert [p for p in md.split("\n\n")[1:] if not p.startswith("Warning:")][0] == summary["verdict"]
    assert "## Is the difference real?" in md and "corrected p < 0.05" in md
    significance = md.split("## Is the difference real?", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\| resnet18 +\| cnn +\| +27 \| +0 \| +< 0.0001 \| +< 0.0001 \| yes", significance, re.M)
    trade = next(line for line in md.split("## Best model")[1].splitlines() if line.startswith("Trade-off"))
    assert trade.startswith("Trade-off: against resnet18, mobilenet is 7.4x smaller (parameters 1,520,000 vs "
                            "11,177,538)")
    assert "3.8x faster to train (training 80.0 s vs 301.3 s)" in trade
    assert html_module.escape(summary["verdict"]) in html


def test_a_significant_lead_is_called_best(experiment, tmp_path):
    paths = {m: experiment["predictions_paths"][m] for m in ("resnet18", "cnn")}
    summary, md, _ = report(experiment, out_name="report_significant",
                            metrics_paths={m: experiment["metrics_paths"][m] for m in paths},
                            predictions_paths=paths)
    assert summary["significant_best"] is True and summary["tied_with_best"] == []
    assert summary["verdict"].startswith("Best: resnet18 (accuracy 0.9700); it is significantly more accurate")


def test_predictions_over_different_images_are_compared_on_those_shared(experiment, tmp_path):
    y = np.repeat([0, 1, 2], 30)
    partial = write_predictions(tmp_path / "predictions.csv", y, range(0, 3))
    frame = pd.read_csv(partial).iloc[:60]
    frame.to_csv(partial, index=False)
    summary, md, _ = report(experiment, out_name="report_partial",
                            predictions_paths=dict(experiment["predictions_paths"], mobilenet=partial))
    assert "compared on the 60 they share" in md
    assert all(t["a_only"] + t["b_only"] <= 60 for t in summary["pairwise"])


def test_failed_model_listed_with_the_end_of_its_log(experiment, tmp_path):
    train_log, evaluate_log = tmp_path / "train.log", tmp_path / "evaluate.log"
    train_log.write_text("".join(f"epoch {i}\n" for i in range(1, 30)) + "ValueError: loss is nan at epoch 30\n")
    summary, md, html = report(experiment, out_name="report_failed_log",
                               metrics_paths=dict(experiment["metrics_paths"], vit=tmp_path / "none.json"),
                               log_paths={"vit": [train_log, evaluate_log]})
    failed = md.split("## Failed models", 1)[1].split("\n## ", 1)[0]
    assert f"vit: the last lines of {train_log}" in failed
    assert "ValueError: loss is nan at epoch 30" in failed and "epoch 19\n" in failed and "epoch 18\n" not in failed
    assert "1 model(s) failed: vit." in summary["verdict"]
    assert "<pre>" in html and "loss is nan" in html


def test_report_renders_in_headless_chromium(experiment, chromium, tmp_path):
    """What a person sees: the page in a real browser, its comparison table and verdict."""
    summary, _, _ = report(experiment, out_name="report_browser")
    page = Path(summary["report_html"]).resolve().as_uri()
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(browser + ["--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The rendered document holds the tables with the models' rows and the verdict.
    assert dom.stdout.count("<table>") >= 4
    assert re.search(r"<td[^>]*>\s*resnet18\s*</td>\s*<td[^>]*>\s*resnet18\s*</td>\s*<td[^>]*>\s*0\.9700",
                     dom.stdout)
    assert "No significant winner" in dom.stdout
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(browser + [f"--screenshot={screenshot}", "--window-size=1280,1600", page],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1280, 1600)
        pixels = np.asarray(image.convert("L"), dtype=float)
    # Not a blank page: text and tables give dark pixels on the white background.
    assert (pixels < 128).mean() > 0.005 and pixels.std() > 10
    shutil.copy(screenshot, experiment["root"] / "report_browser" / "screenshot.png")


def test_a_leader_by_another_metric_that_is_significantly_less_accurate_is_not_called_best(experiment, tmp_path):
    y = np.repeat([0, 1, 2], 30)
    paths, predictions = {}, {}
    for model, macro_f1, wrong in (("sharp", 0.99, range(0, 30)), ("steady", 0.60, range(0, 0))):
        figures = dict(MODELS["cnn"], arch=model, macro_f1=macro_f1)
        paths[model] = tmp_path / model / "metrics.json"
        paths[model].parent.mkdir()
        paths[model].write_text(json.dumps(metrics_json(model, figures)))
        predictions[model] = write_predictions(tmp_path / model / "predictions.csv", y, wrong)
    summary, md, _ = report(experiment, out_name="report_direction", rank_by="macro_f1", metrics_paths=paths,
                            history_paths={}, predictions_paths=predictions)
    assert summary["ranking"] == ["sharp", "steady"]
    assert summary["significant_best"] is False and summary["better_than_best"] == ["steady"]
    assert summary["verdict"].startswith("sharp ranks first by macro F1 (0.9900), but steady is significantly "
                                         "more accurate")
    assert "Best:" not in summary["verdict"]


def test_a_model_without_predictions_leaves_the_lead_unproven(experiment):
    predictions = dict(experiment["predictions_paths"])
    del predictions["mobilenet"]
    summary, md, _ = report(experiment, out_name="report_untested", predictions_paths=predictions)
    assert summary["untested"] == ["mobilenet"] and summary["significant_best"] is None
    assert "Best:" not in summary["verdict"] and "mobilenet could not be tested" in summary["verdict"]
    assert "- mobilenet: no test predictions to compare" in md


def test_predictions_on_disjoint_images_are_not_called_a_tie(experiment, tmp_path):
    y = np.repeat([0, 1, 2], 30)
    other = tmp_path / "predictions.csv"
    frame = pd.read_csv(write_predictions(other, y, range(0, 3)))
    frame["path"] = "elsewhere/" + frame["path"]
    frame.to_csv(other, index=False)
    summary, md, _ = report(experiment, out_name="report_disjoint",
                            metrics_paths={m: experiment["metrics_paths"][m] for m in ("resnet18", "cnn")},
                            predictions_paths={"resnet18": experiment["predictions_paths"]["resnet18"], "cnn": other})
    assert summary["significant_best"] is None and summary["tied_with_best"] == []
    assert "share no image" in md and "tied" not in summary["verdict"]


def test_after_a_failure_only_current_model_results_count(tmp_path):
    """What a failed run leaves: deleted outputs of failed jobs, old outputs of jobs that never ran."""
    import os

    results = tmp_path / "results" / "pets"
    classes, models = ["cat", "dog"], ["cnn", "fresh", "old", "child", "unevaluated"]
    when = iter(range(1_000, 100_000, 10))

    def touch(relative):
        path = results / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        stamp = next(when)
        os.utime(path, (stamp, stamp))

    touch("models/old/model.pt")  # trained on an earlier split
    touch("eval/old/metrics.json")
    touch("models/child/model.pt")  # started from cnn's previous weights
    touch("eval/child/metrics.json")
    for c in classes:
        touch(f"raw/{c}.csv")
    touch("dedupe/manifest.csv")
    for c in classes:
        touch(f"images/{c}.csv")
    touch("split/manifest.csv")
    touch("models/fresh/model.pt")
    touch("eval/fresh/metrics.json")
    touch("models/unevaluated/model.pt")
    starts = {"child": "cnn"}
    problem, stale = stale_model_results(results, models, classes, starts)
    assert problem is None
    assert stale == {"cnn": "training did not finish (no model.pt)",
                     "old": "not trained on the current split (its train job did not run)",
                     "child": "not trained on the current split (its train job did not run)",
                     "unevaluated": "evaluation did not finish (no up-to-date metrics.json)"}
    touch("models/cnn/model.pt")  # cnn retrained after child: child is stale through init_from
    touch("models/child/model.pt")
    touch("eval/child/metrics.json")
    touch("models/cnn/model.pt")
    assert stale_model_results(results, models, classes, starts)[1]["child"] == \
        "not retrained from the current cnn (init_from), which did not finish"
    (results / "images" / "dog.csv").unlink()  # a preprocess job failed
    problem, _ = stale_model_results(results, models, classes, starts)
    assert problem.startswith("the data stages did not finish") and "images/dog.csv" in problem


def test_the_cheapest_of_tied_models_goes_by_size_not_by_measured_speed():
    # Two models of one architecture: which one a run timed faster is noise, and must not
    # change the verdict from one run to the next.
    a, b = {"n_parameters": 100, "latency_ms_batch1": 0.30}, {"n_parameters": 100, "latency_ms_batch1": 0.20}
    assert _cheapest({"a": a, "b": b}, ["b", "a"]) == "a"  # a tie in size goes by name
    assert _cheapest({"a": a, "b": {**b, "n_parameters": 99}}, ["a", "b"]) == "b"


def test_near_duplicate_losses_are_warned_at_the_top_with_the_contact_sheet(experiment):
    sheet = experiment["root"] / "review" / "dog.html"
    sheet.parent.mkdir(exist_ok=True)
    sheet.write_text("<html></html>")
    summary, md, html_text = report(experiment, out_name="warned", review_sheets={"dog": sheet})

    top = md.split("## ", 1)[0]  # before the first section
    assert top.index("Warning: class 'dog'") < top.index(summary["verdict"][:40])
    assert "3 dropped as near duplicates of images in another class (cross_class_near)" in top
    assert "dedupe.near_distance" in top and "dedupe.near_pixel_difference" in top
    assert "[dog](../review/dog.html)" in top
    assert '<a href="../review/dog.html">dog</a>' in html_text
    # the cat class lost 4 of 104 as exact duplicates only: no warning
    assert "class 'cat'" not in md

"""The comparison report: which model is best, and why.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and
rendered twice: Markdown that links the plots by relative path, and a self-contained HTML
page with the plots embedded, so it can be mailed or attached to an MLflow run.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from imgpipe.core.files import read_optional_json
from imgpipe.core.layout import MODEL_PLOTS
from imgpipe.core.manifests import HISTORY_COLUMNS, SPEED_FILE, read_dedupe_manifest, read_split_manifest
from imgpipe.data.dedupe import REASONS as DEDUPE_REASONS
from imgpipe.data.dedupe import near_duplicate_warnings
from imgpipe.data.split import SPLITS
from imgpipe.evaluation import stats
from imgpipe.evaluation.plots import plot_learning_curves

log = logging.getLogger(__name__)

RANK_METRICS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "roc_auc": "ROC AUC",
}
REQUIRED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
MISSING = "n/a"
TOP_K_KEY = re.compile(r"top(\d+)_accuracy")
SIGNIFICANCE = 0.05  # family-wise error rate of the pairwise McNemar tests (Holm)
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Links:
    """Links to files beside the report (relative, so they work wherever results/ is copied)."""

    lead: str
    targets: list[tuple[str, Path]]


@dataclass(frozen=True)
class Preformatted:
    """Text shown as is (the end of a log)."""

    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]


@dataclass(frozen=True)
class Figures:
    """Plots shown side by side in HTML; each is (caption, path to an existing PNG)."""

    images: list[tuple[str, Path]]


Block = Heading | Paragraph | Bullets | Links | Preformatted | Table | Figures


def write_report(
    experiment: str,
    metrics_paths: dict[str, Path],
    history_paths: dict[str, Path],
    split_manifest: Path,
    dedupe_manifest: Path,
    out_dir: Path,
    rank_by: str = "accuracy",
    predictions_paths: dict[str, Path] | None = None,
    log_paths: dict[str, list[Path]] | None = None,
    unavailable: dict[str, str] | None = None,
    review_sheets: dict[str, Path] | None = None,
) -> dict:
    """Write report.md, report.html, learning_curves.png and summary.json to `out_dir`;
    return the summary.

    A model whose metrics.json is missing or unreadable is listed under "Failed models",
    with the end of its newest log in `log_paths`, instead of failing the report. Each
    model's plots (MODEL_PLOTS) are taken from the folder of its metrics.json. With
    `predictions_paths` (each model's predictions.csv on the test split), every pair of
    models is compared with McNemar's exact test, Holm-corrected, and "best" is said only
    of a significant lead.

    The summary (JSON-serialisable, for MLflow and summary.json) holds experiment,
    rank_by, best_model, best_value, runner_up, margin (best minus runner-up in rank_by),
    ranking (best first), tied_with_best, better_than_best (significantly more accurate than
    the first-ranked), untested, significant_best (True, False, or None: cannot be said),
    verdict (one line),
    pairwise (the McNemar tests), failed_models ({model: reason}) and the paths written.
    """
    check_rank_by(rank_by)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    unavailable = unavailable or {}
    metrics, failed = load_metrics({m: p for m, p in metrics_paths.items() if m not in unavailable})
    failed.update(unavailable)
    ranking = rank_models(metrics, rank_by)
    comparison = compare_models(metrics, ranking, predictions_paths or {})
    verdict = verdict_sentence(metrics, ranking, rank_by, comparison, failed)
    # Learning-curve colours follow the ranking; models without metrics come last.
    curve_order = ranking + [m for m in history_paths if m not in metrics]
    histories, history_problems = load_histories({m: history_paths[m] for m in curve_order if m in history_paths})
    curves_path = out_dir / "learning_curves.png"
    plot_learning_curves(histories, curves_path)

    dedupe = read_dedupe_manifest(dedupe_manifest)
    blocks = [Heading(f"Model comparison: {experiment}", 1)]
    blocks += dedupe_warnings_section(dedupe, review_sheets or {})
    blocks.append(Paragraph(verdict))
    blocks += best_model_section(metrics, ranking, rank_by, comparison)
    blocks += comparison_section(metrics, ranking, rank_by)
    blocks += localization_section(metrics, ranking)
    blocks += significance_section(comparison)
    if failed:
        blocks += failed_section(failed, log_paths or {})
    blocks += per_class_section(metrics, ranking)
    blocks += data_section(read_split_manifest(split_manifest), dedupe,
                           class_order=_class_order(metrics, ranking))
    sheets = [(name, Path(path)) for name, path in (review_sheets or {}).items() if Path(path).is_file()]
    if sheets:
        blocks.append(Links("Contact sheets (every image of a class, dropped ones with their reason): ", sheets))
    blocks += [Heading("Learning curves", 2), Figures([("loss and accuracy per epoch", curves_path)])]
    if history_problems:
        blocks.append(Bullets([f"{m}: {problem}" for m, problem in history_problems.items()]))
    blocks += model_plots_section(metrics, ranking, metrics_paths)

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(blocks, out_dir), encoding="utf-8")
    html_path.write_text(render_html(blocks, title=f"imgpipe: {experiment}", out_dir=out_dir), encoding="utf-8")

    best = ranking[0] if ranking else None
    runner_up = ranking[1] if len(ranking) > 1 else None
    log.info("report of %d model(s) written to %s and %s", len(ranking), md_path, html_path)
    log.info("verdict: %s", verdict)
    for model, reason in failed.items():
        log.warning("model %s is missing from the comparison: %s", model, reason)
    summary = {
        "experiment": experiment,
        "rank_by": rank_by,
        "best_model": best,
        "best_value": metrics[best][rank_by] if best else None,
        "runner_up": runner_up,
        "margin": _margin(metrics, best, runner_up, rank_by),
        "ranking": ranking,
        "tied_with_best": comparison["tied"],
        "better_than_best": comparison["better"],
        "untested": comparison["untested"],
        "significant_best": comparison["significant_best"],
        "verdict": verdict,
        "pairwise": comparison["tests"],
        "failed_models": failed,
        "report_md": str(md_path),
        "report_html": str(html_path),
        "summary": str(out_dir / "summary.json"),
        "learning_curves": str(curves_path),
    }
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def stale_model_results(results: Path, models: list[str], classes: list[str],
                        start_models: dict[str, str | None]) -> tuple[str | None, dict[str, str]]:
    """After a failed run: which results under `results` (results/<experiment>) are current.

    A failed job's outputs are deleted, but a job that never ran (its input failed, or the
    run stopped first) keeps what an earlier run left, which must not pass for this run's
    result. Returns (why the data stages are not usable, or None; {model: why its result
    is not current}). `start_models` maps each model to the model it starts from (init_from).
    """
    data = ([results / "raw" / f"{c}.csv" for c in classes] + [results / "dedupe" / "manifest.csv"]
            + [results / "images" / f"{c}.csv" for c in classes] + [results / "split" / "manifest.csv"])
    missing = [str(path) for path in data if not path.is_file()]
    if missing:
        return f"the data stages did not finish ({missing[0]} is missing)", {}
    split = (results / "split" / "manifest.csv").stat().st_mtime_ns
    trained = {m: results / "models" / m / "model.pt" for m in models}
    stale: dict[str, str] = {}
    for model in models:
        metrics = results / "eval" / model / "metrics.json"
        start = start_models.get(model)
        if not trained[model].is_file():
            stale[model] = "training did not finish (no model.pt)"
        elif trained[model].stat().st_mtime_ns < split:
            stale[model] = "not trained on the current split (its train job did not run)"
        elif start and (not trained[start].is_file()
                        or trained[start].stat().st_mtime_ns > trained[model].stat().st_mtime_ns):
            stale[model] = f"not retrained from the current {start} (init_from), which did not finish"
        elif not metrics.is_file() or metrics.stat().st_mtime_ns < trained[model].stat().st_mtime_ns:
            stale[model] = "evaluation did not finish (no up-to-date metrics.json)"
    return None, stale


def compare_models(metrics: dict[str, dict], ranking: list[str], predictions_paths: dict[str, Path]) -> dict:
    """McNemar's exact test for every pair of ranked models on the test images they share.

    Returns {"tests": [...], "standing": {model: 'beaten' | 'tied' | 'better'} against the
    first-ranked model, "tied" and "better" (those models, in ranking order), "untested"
    (models that could not be compared), "significant_best": True when every other model
    is beaten, False when one is tied or better, None when that cannot be said (a model
    untested, no shared image), "n_images": int, "problems": [why, for the reader]}.
    """
    correct, problems = {}, []
    for model in ranking:
        path = predictions_paths.get(model)
        if path is None:
            problems.append(f"{model}: no test predictions to compare")
            continue
        try:
            frame = pd.read_csv(path, usecols=["path", "label", "predicted"], dtype=str, keep_default_na=False)
        except (OSError, ValueError) as error:
            problems.append(f"{model}: cannot read its test predictions {path} ({error})")
            continue
        if frame["path"].duplicated().any():
            problems.append(f"{model}: its test predictions {path} list an image more than once "
                            f"({frame.loc[frame['path'].duplicated(), 'path'].iloc[0]})")
            continue
        correct[model] = pd.Series((frame["label"] == frame["predicted"]).to_numpy(), index=frame["path"])
    untested = [m for m in ranking if m not in correct]
    result = {"tests": [], "standing": {}, "tied": [], "better": [], "untested": untested,
              "significant_best": None, "n_images": 0, "problems": problems}
    if len(ranking) < 2 or ranking[0] not in correct or len(correct) < 2:
        return result
    shared = sorted(set.intersection(*(set(series.index) for series in correct.values())))
    if not shared:
        problems.append("the models' test predictions share no image: they cannot be compared")
        return result
    sizes = {model: len(series) for model, series in correct.items()}
    if any(size != len(shared) for size in sizes.values()):
        problems.append(f"the models' test predictions cover different images ({sizes}); compared on the "
                        f"{len(shared)} they share")
    aligned = {model: series.loc[shared].to_numpy() for model, series in correct.items()}
    tests = stats.pairwise_mcnemar(aligned, alpha=SIGNIFICANCE)
    standing = stats.standing_against(ranking[0], tests)
    tied = [m for m in ranking if standing.get(m) == "tied"]
    better = [m for m in ranking if standing.get(m) == "better"]
    if tied or better:
        significant = False
    else:
        significant = None if untested else True
    return {**result, "tests": tests, "standing": standing, "tied": tied, "better": better,
            "significant_best": significant, "n_images": len(shared)}


def verdict_sentence(metrics: dict[str, dict], ranking: list[str], rank_by: str, comparison: dict,
                     failed: dict[str, str]) -> str:
    """The one line a person reads first (also printed at the end of the run).

    McNemar's test compares accuracy (which images each model gets right): ranked by
    another metric, the sentence says that it is accuracy that differs or not.
    """
    failures = f" {len(failed)} model(s) failed: {', '.join(failed)}." if failed else ""
    if not ranking:
        return f"No model could be compared.{failures}"
    best, label = ranking[0], RANK_METRICS[rank_by]
    first = f"{best} ranks first by {label} ({_fmt_score(metrics[best][rank_by])})"
    in_accuracy = "" if rank_by == "accuracy" else " in accuracy"
    test = f"McNemar, Holm-corrected p {{}} {SIGNIFICANCE}"
    if len(ranking) == 1:
        return f"Only {best} could be evaluated ({label} {_fmt_score(metrics[best][rank_by])}).{failures}"
    if comparison["better"]:
        return (f"{first}, but {_join(comparison['better'])} "
                f"{'is' if len(comparison['better']) == 1 else 'are'} significantly more accurate "
                f"({test.format('<')}): check which metric matters for your use.{failures}")
    if comparison["significant_best"]:
        return (f"Best: {best} ({label} {_fmt_score(metrics[best][rank_by])}); it is significantly more accurate "
                f"than every other model ({test.format('<')}).{failures}")
    if comparison["tied"]:
        tied = comparison["tied"]
        cheapest = _cheapest(metrics, [best] + tied)
        advice = f" {cheapest} is the cheapest of them." if _parameters(metrics[cheapest]) < _parameters(
            metrics[best]) else ""
        untested = (f" {_join(comparison['untested'])} could not be tested."
                    if comparison["untested"] else "")
        return (f"No significant winner: {first} but is statistically tied{in_accuracy} with {_join(tied)} "
                f"({test.format('>=')}).{advice}{untested}{failures}")
    if comparison["untested"] and comparison["standing"]:
        return (f"{first} and is significantly more accurate than {_join(list(comparison['standing']))}, but "
                f"{_join(comparison['untested'])} could not be tested (see 'Is the difference real?').{failures}")
    return f"{first}; whether its lead is significant cannot be said (see 'Is the difference real?').{failures}"


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANK_METRICS:
        raise ValueError(f"rank_by {rank_by!r} is not one of {', '.join(RANK_METRICS)}")


def load_metrics(metrics_paths: dict[str, Path]) -> tuple[dict[str, dict], dict[str, str]]:
    """Read each model's metrics.json: ({model: metrics}, {model: why it could not be read}).

    The speed figures are measurements kept beside it, in speed.json: merged in when
    present (without them the report shows no speed, with a warning).
    """
    metrics, failed = {}, {}
    for model, path in metrics_paths.items():
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            failed[model] = f"metrics file not found: {path}"
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            failed[model] = f"cannot read {path}: {error}"
            continue
        if not isinstance(data, dict):
            failed[model] = f"{path} does not hold a JSON object"
            continue
        bad = [key for key in REQUIRED_METRICS if not _is_number(data.get(key))]
        if bad:
            failed[model] = f"{path} lacks a numeric {', '.join(bad)}"
            continue
        if not _is_number(data.get("roc_auc")):
            data["roc_auc"] = None
        metrics[model] = data | _read_speed(path.with_name(SPEED_FILE))
    return metrics, failed


def _read_speed(path: Path) -> dict:
    if not path.is_file():
        log.warning("no speed figures: %s not found", path)
    speed = read_optional_json(path, "the speed figures")
    return speed if isinstance(speed, dict) else {}


def rank_models(metrics: dict[str, dict], rank_by: str) -> list[str]:
    """Model names, best first: by `rank_by` (missing values last), then macro F1, then
    fewer parameters, then name."""
    check_rank_by(rank_by)

    def key(model):
        m = metrics[model]
        value = m.get(rank_by)
        # Metrics from the same test set that are equal in value can differ in the last bits.
        return (
            value is None,
            -round(value, 10) if value is not None else 0.0,
            -round(m["macro_f1"], 10),
            m.get("n_parameters") if _is_number(m.get("n_parameters")) else math.inf,
            model,
        )

    return sorted(metrics, key=key)


def load_histories(history_paths: dict[str, Path]) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Read each model's history.csv: ({model: DataFrame}, {model: why it could not be read})."""
    histories, problems = {}, {}
    for model, path in history_paths.items():
        try:
            history = pd.read_csv(path)
        except FileNotFoundError:
            problems[model] = f"no training history: {path} not found"
            continue
        except (OSError, ValueError) as error:
            problems[model] = f"cannot read training history {path}: {error}"
            continue
        absent = [c for c in HISTORY_COLUMNS if c not in history.columns]
        if absent:
            problems[model] = f"training history {path} lacks columns {', '.join(absent)}"
            continue
        histories[model] = history
    return histories, problems


def best_model_section(metrics: dict[str, dict], ranking: list[str], rank_by: str,
                       comparison: dict | None = None) -> list[Block]:
    blocks: list[Block] = [Heading("Best model", 2)]
    if not ranking:
        return blocks + [Paragraph("No model produced readable metrics; see Failed models.")]
    best = metrics[ranking[0]]
    label = RANK_METRICS[rank_by]
    size = [f"{_fmt_int(best['n_parameters'])} parameters"] if _is_number(best.get("n_parameters")) else []
    latency = best.get("latency_ms_batch1", best.get("inference_ms_per_image"))
    if _is_number(latency):
        size.append(f"{_fmt_ms(latency)} ms per image")
    text = (
        f"{ranking[0]} ({best.get('arch', 'unknown arch')}) ranks first of {len(ranking)} "
        f"{'model' if len(ranking) == 1 else 'models'} by {label}. "
        f"{_on_test_images(best)}it reaches accuracy {_fmt_score(best['accuracy'])}{_interval(best, 'accuracy')}, "
        f"balanced accuracy {_fmt_score(best['balanced_accuracy'])}, "
        f"macro F1 {_fmt_score(best['macro_f1'])}{_interval(best, 'macro_f1')} "
        f"and ROC AUC {_fmt_score(best['roc_auc'])}"
        + (f", with {' and '.join(size)}." if size else ".")
    )
    if best[rank_by] is None:
        text += f" No model has a {label}, so the ranking falls back to macro F1, then fewer parameters."
    if len(ranking) > 1:
        text += " " + _versus_runner_up(metrics, ranking[0], ranking[1], rank_by)
    blocks.append(Paragraph(text))
    if len(ranking) > 1:
        tied = (comparison or {}).get("tied") or []
        alternative = _cheapest(metrics, tied) if tied else ranking[1]
        trade = tradeoff_sentence(metrics, ranking[0], alternative)
        if trade:
            blocks.append(Paragraph(trade))
    return blocks


# How each cost figure is named and printed in the trade-off sentence; a ratio above 1
# (best / other) means the other model is cheaper.
COSTS = (
    ("n_parameters", "parameters", ("smaller", "larger"), lambda v: f"{int(v):,}"),
    ("file_bytes", "file", ("smaller", "larger"), lambda v: f"{v / 1e6:.2f} MB"),
    ("latency_ms_batch1", "latency at batch 1", ("faster", "slower"), lambda v: f"{v:.3f} ms"),
    ("train_seconds", "training", ("faster to train", "slower to train"), lambda v: f"{v:,.1f} s"),
)


def tradeoff_sentence(metrics: dict[str, dict], best: str, other: str) -> str | None:
    """What choosing `other` instead of `best` saves or costs: size, latency, training time."""
    a, b = metrics[best], metrics[other]
    parts = []
    for key, noun, (cheaper, dearer), fmt in COSTS:
        if not (_is_number(a.get(key)) and _is_number(b.get(key))) or min(a[key], b[key]) <= 0:
            continue
        ratio = a[key] / b[key]
        figures = f"{noun} {fmt(b[key])} vs {fmt(a[key])}"
        if abs(math.log(ratio)) < math.log(1.1):
            parts.append(f"about the same ({figures})")
        elif ratio > 1:
            parts.append(f"{_fmt_factor(ratio)} {cheaper} ({figures})")
        else:
            parts.append(f"{_fmt_factor(1 / ratio)} {dearer} ({figures})")
    if not parts:
        return None
    return f"Trade-off: against {best}, {other} is {_join(parts)}."


def comparison_section(metrics: dict[str, dict], ranking: list[str], rank_by: str) -> list[Block]:
    if not ranking:
        return []
    top_ks = sorted({key for m in ranking for key in metrics[m] if TOP_K_KEY.fullmatch(key)},
                    key=lambda key: int(TOP_K_KEY.fullmatch(key).group(1)))
    localizing = any("miou" in metrics[m] for m in ranking)
    quality_headers = (["model", "arch", "accuracy [95% CI]", "macro F1 [95% CI]", "balanced accuracy",
                        "weighted F1"] + [f"top-{TOP_K_KEY.fullmatch(key).group(1)} accuracy" for key in top_ks]
                       + ["ROC AUC", "log loss", "ECE"] + (["box mIoU"] if localizing else []))
    quality, cost = [], []
    for model in ranking:
        m = metrics[model]
        quality.append([
            model, str(m.get("arch", MISSING)), _fmt_score(m["accuracy"]) + _interval(m, "accuracy"),
            _fmt_score(m["macro_f1"]) + _interval(m, "macro_f1"), _fmt_score(m["balanced_accuracy"]),
            _fmt_score(m.get("weighted_f1"))] + [_fmt_score(m.get(key)) for key in top_ks] + [
            _fmt_score(m["roc_auc"]), _fmt_score(m.get("log_loss")), _fmt_score(m.get("ece")),
        ] + ([_fmt_score(m.get("miou")) if "miou" in m else "no box head"] if localizing else []))
        cost.append([
            model, _fmt_int(m.get("n_parameters")), _fmt_megabytes(m.get("file_bytes")),
            _fmt_seconds(m.get("train_seconds")), _fmt_ms(m.get("latency_ms_batch1", m.get("inference_ms_per_image"))),
            _fmt_int(m.get("throughput_images_per_s")),
            f"{_fmt_int(m.get('best_epoch'))} / {_fmt_int(m.get('epochs'))}",
        ])
    blocks: list[Block] = [
        Heading("Comparison", 2),
        Paragraph(f"Ranked by {RANK_METRICS[rank_by]}; ties broken by macro F1, then fewer parameters. "
                  f"Intervals: 95% bootstrap over the test images. ECE: expected calibration error "
                  f"(0 when confidence matches accuracy)."),
        Table(quality_headers, quality, [False, False] + [True] * (len(quality_headers) - 2)),
        Heading("Size and speed", 3),
        Paragraph("Latency and throughput are medians measured by each model's evaluate job on its device, "
                  "while the machine ran whatever else the run had scheduled: compare them on a quiet machine "
                  "before relying on small differences."),
        Table(["model", "params", "file MB", "train time s", "ms/image at batch 1", "images/s at training batch",
               "best epoch / epochs"], cost, [False] + [True] * 6),
    ]
    notes = [f"{m}: no ROC AUC ({metrics[m].get('roc_auc_note') or 'no reason given'})"
             for m in ranking if metrics[m]["roc_auc"] is None]
    notes += [f"{m}: ROC AUC is the {metrics[m]['roc_auc_note']}" for m in ranking
              if metrics[m]["roc_auc"] is not None and metrics[m].get("roc_auc_note")]
    notes += [f"{m}: macro F1 is the {metrics[m]['macro_f1_note']}" for m in ranking if metrics[m].get("macro_f1_note")]
    if notes:
        blocks.append(Bullets(notes))
    return blocks


def localization_section(metrics: dict[str, dict], ranking: list[str]) -> list[Block]:
    """The localising models (task: localize): how well their boxes fit, per class, and how fast."""
    models = [m for m in ranking if "miou" in metrics[m]]
    if not models:
        return []
    classes = sorted({name for m in models for name in metrics[m].get("miou_per_class", {})})
    rows = [[model, _fmt_score(metrics[model]["miou"]),
             _fmt_score(metrics[model].get("iou_at_least_0_5")), _fmt_int(metrics[model].get("n_boxes"))]
            + [_fmt_score(metrics[model].get("miou_per_class", {}).get(name)) for name in classes]
            + [_fmt_ms(metrics[model].get("latency_ms_batch1")), _fmt_ms(_ms_per_image(metrics[model]))]
            for model in models]
    return [
        Heading("Localisation", 2),
        Paragraph("The box each localising model puts on the test images that have one: mean IoU with the true "
                  "box, the share of images with IoU >= 0.5, and the mean IoU per class; inference time per image "
                  "at batch 1 and at the training batch size (classification and box together)."),
        Table(["model", "mIoU", "IoU >= 0.5", "images with a box"] + [f"mIoU {name}" for name in classes]
              + ["ms/image at batch 1", "ms/image at training batch"], rows, [False] + [True] * (5 + len(classes))),
    ]


def _ms_per_image(m: dict) -> float | None:
    """Milliseconds per image at the training batch size, from the measured throughput."""
    throughput = m.get("throughput_images_per_s")
    return 1000 / throughput if _is_number(throughput) and throughput > 0 else None


def significance_section(comparison: dict) -> list[Block]:
    """Every pair of models on the same test images: where they disagree, and whether it matters."""
    if not comparison["tests"] and not comparison["problems"]:
        return []
    blocks: list[Block] = [Heading("Is the difference real?", 2)]
    if comparison["tests"]:
        count = len(comparison["tests"])
        blocks.append(Paragraph(
            f"McNemar's exact test on the {comparison['n_images']:,} test images: only the images two models "
            f"disagree on count. p-values are Holm-corrected for the {count} comparison{'s' if count != 1 else ''}; "
            f"a difference is significant when the corrected p < {SIGNIFICANCE}."))
        rows = [[t["a"], t["b"], f"{t['a_only']:,}", f"{t['b_only']:,}", _fmt_p(t["p_value"]), _fmt_p(t["p_holm"]),
                 "yes" if t["significant"] else "no"] for t in comparison["tests"]]
        blocks.append(Table(["model A", "model B", "only A right", "only B right", "p", "p (Holm)", "significant"],
                            rows, [False, False, True, True, True, True, False]))
    if comparison["problems"]:
        blocks.append(Bullets(comparison["problems"]))
    return blocks


def failed_section(failed: dict[str, str], log_paths: dict[str, list[Path]]) -> list[Block]:
    blocks: list[Block] = [Heading("Failed models", 2), Bullets([f"{m}: {reason}" for m, reason in failed.items()])]
    for model in failed:
        tail = log_tail([Path(p) for p in log_paths.get(model, [])])
        if tail is not None:
            path, text = tail
            blocks += [Paragraph(f"{model}: the last lines of {path}"), Preformatted(text)]
    return blocks


def log_tail(paths: list[Path], lines: int = LOG_TAIL_LINES) -> tuple[Path, str] | None:
    """The newest existing log among `paths` and its last lines; None when none exists."""
    existing = [p for p in paths if p.is_file()]
    if not existing:
        return None
    newest = max(existing, key=lambda p: p.stat().st_mtime_ns)
    text = newest.read_text(encoding="utf-8", errors="replace").rstrip("\n").splitlines()[-lines:]
    return newest, "\n".join(text)


def per_class_section(metrics: dict[str, dict], ranking: list[str]) -> list[Block]:
    if not ranking:
        return []
    classes = _class_order(metrics, ranking)
    support = {}
    for model in ranking:
        for name, figures in (metrics[model].get("per_class") or {}).items():
            support.setdefault(name, figures.get("support"))
    rows = []
    for name in classes:
        row = [name, _fmt_int(support.get(name))]
        for model in ranking:
            figures = (metrics[model].get("per_class") or {}).get(name) or {}
            row.append(_fmt_score(figures.get("f1")))
        rows.append(row)
    return [
        Heading("Per-class F1", 2),
        Table(["class", "test images"] + ranking, rows, [False] + [True] * (len(ranking) + 1)),
    ]


def dedupe_warnings_section(dedupe: pd.DataFrame, review_sheets: dict[str, Path]) -> list[Block]:
    """Warnings at the top of the report for classes that lost many images as near duplicates, or
    any across classes (imgpipe.data.dedupe.near_duplicate_warnings), each linking the class's contact sheet."""
    blocks: list[Block] = []
    for cls, warning in near_duplicate_warnings(dedupe).items():
        sheet = review_sheets.get(cls)
        lead = f"Warning: {warning}"
        if sheet is not None and Path(sheet).is_file():
            blocks.append(Links(lead + " Contact sheet: ", [(f"{cls}", Path(sheet))]))
        else:
            blocks.append(Paragraph(lead))
    return blocks


def data_section(split: pd.DataFrame, dedupe: pd.DataFrame, class_order: list[str]) -> list[Block]:
    classes = _ordered(class_order, set(split["label"]) | set(dedupe["class"]))

    split_counts = pd.crosstab(split["label"], split["split"]).reindex(index=classes, columns=list(SPLITS),
                                                                      fill_value=0)
    split_counts["total"] = split_counts.sum(axis=1)
    split_counts.loc["total"] = split_counts.sum(axis=0)

    kept = dedupe["status"] == "kept"
    reason = dedupe["reason"].where(dedupe["reason"] != "", "unspecified")
    fate = ("dropped: " + reason).where(~kept, "kept")
    columns = ["kept"] + [f"dropped: {r}" for r in _ordered(list(DEDUPE_REASONS), set(reason[~kept]))]
    fates = pd.crosstab(dedupe["class"], fate).reindex(index=classes, columns=columns, fill_value=0)
    fates["total"] = fates.sum(axis=1)
    fates.loc["total"] = fates.sum(axis=0)

    n_total, n_kept = len(dedupe), int(kept.sum())
    summary = (
        f"{n_total} images were collected; deduplication and cleaning kept {n_kept} "
        f"({_percent(n_kept, n_total)}) and dropped {n_total - n_kept}. "
        f"The split holds {len(split)} images: "
        + ", ".join(f"{int((split['split'] == s).sum())} {s}" for s in SPLITS) + "."
    )
    return [
        Heading("Data", 2),
        Paragraph(summary),
        Heading("Images per class and split", 3),
        _frame_table(split_counts, "class"),
        Heading("Deduplication and cleaning", 3),
        _frame_table(fates, "class"),
    ]


def model_plots_section(metrics: dict[str, dict], ranking: list[str], metrics_paths: dict[str, Path]) -> list[Block]:
    if not ranking:
        return []
    blocks: list[Block] = [Heading("Each model on the test split", 2)]
    for model in ranking:
        folder = Path(metrics_paths[model]).parent
        plots = [(caption, folder / name) for name, caption in MODEL_PLOTS]
        if "miou" in metrics[model]:
            plots.append(("boxes on test images", folder / "localization.png"))
        blocks.append(Heading(model, 3))
        pairs = metrics[model].get("confused_pairs") or []
        if pairs:
            blocks.append(Paragraph("Most confused: " + "; ".join(
                f"{p['true']} taken for {p['predicted']} ({p['count']}x)" for p in pairs) + "."))
        present = [(f"{model}: {caption}", path) for caption, path in plots if path.is_file()]
        if present:
            blocks.append(Figures(present))
        missing = [f"{caption} not found: {path}" for caption, path in plots if not path.is_file()]
        if missing:
            blocks.append(Bullets(missing))
    return blocks


def render_markdown(blocks: list[Block], out_dir: Path) -> str:
    """Markdown; plots are linked by paths relative to `out_dir`, where report.md lives."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Links):
            parts.append(block.lead + ", ".join(f"[{text}]({_relative(path, out_dir)})" for text, path in block.targets))
        elif isinstance(block, Preformatted):
            parts.append("~~~text\n" + block.text + "\n~~~")
        elif isinstance(block, Table):
            rows = [[cell.replace("|", "\\|") for cell in row] for row in block.rows]
            parts.append(tabulate(rows, headers=block.headers, tablefmt="pipe", disable_numparse=True,
                                  colalign=_colalign(block)))
        elif isinstance(block, Figures):
            parts.append("\n\n".join(f"![{caption}]({_relative(path, out_dir)})"
                                     for caption, path in block.images))
    return "\n\n".join(parts) + "\n"


def _relative(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def render_html(blocks: list[Block], title: str, out_dir: Path | None = None) -> str:
    """One self-contained HTML page: plots are embedded as data URIs."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Links):
            links = ", ".join(f'<a href="{html.escape(_relative(path, out_dir or Path(".")))}">{html.escape(text)}</a>'
                              for text, path in block.targets)
            parts.append(f"<p>{html.escape(block.lead)}{links}</p>")
        elif isinstance(block, Preformatted):
            parts.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Table):
            parts.append(tabulate(block.rows, headers=block.headers, tablefmt="html", disable_numparse=True,
                                  colalign=_colalign(block)))
        elif isinstance(block, Figures):
            figures = "".join(
                f'<figure{_wide_class(path)}><img alt="{html.escape(caption)}" src="{_data_uri(path)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                for caption, path in block.images
            )
            parts.append(f'<div class="figures">{figures}</div>')
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { padding: .3em .7em; border-bottom: 1px solid #e4e4e4; }
th { background: #f4f4f4; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; flex: 1 1 420px; }
figure.wide { flex-basis: 100%; }
figure:not(.wide) { max-width: calc(50% - .5em); }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: .85em; color: #666; text-align: center; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def _versus_runner_up(metrics: dict[str, dict], best: str, second: str, rank_by: str) -> str:
    a, b = metrics[best], metrics[second]
    label = RANK_METRICS[rank_by]
    margin = _margin(metrics, best, second, rank_by)
    if margin:
        return (f"It leads the runner-up, {second}, by {margin:.4f} {label} "
                f"({_fmt_score(a[rank_by])} vs {_fmt_score(b[rank_by])}).")
    if a[rank_by] is not None and b[rank_by] is None:
        return f"The runner-up, {second}, has no {label}."
    basis = (f"It ties with the runner-up, {second}, on {label}" if margin == 0
             else f"The runner-up, {second}, has no {label} either")
    if round(a["macro_f1"], 10) != round(b["macro_f1"], 10):
        return f"{basis}; it ranks first on macro F1 ({_fmt_score(a['macro_f1'])} vs {_fmt_score(b['macro_f1'])})."
    if a.get("n_parameters") != b.get("n_parameters"):
        return (f"{basis}, and equals it on macro F1; it ranks first for having fewer parameters "
                f"({_fmt_int(a.get('n_parameters'))} vs {_fmt_int(b.get('n_parameters'))}).")
    return f"{basis}, and equals it on macro F1 and parameter count; the order between them is alphabetical."


def _margin(metrics: dict[str, dict], best: str | None, second: str | None, rank_by: str) -> float | None:
    if best is None or second is None or metrics[best][rank_by] is None or metrics[second][rank_by] is None:
        return None
    return round(metrics[best][rank_by] - metrics[second][rank_by], 10)


def _class_order(metrics: dict[str, dict], ranking: list[str]) -> list[str]:
    """Class names in the order the best model lists them, then any the others add."""
    order: list[str] = []
    for model in ranking:
        m = metrics[model]
        for name in list(m.get("classes") or []) + list(m.get("per_class") or {}):
            if str(name) not in order:
                order.append(str(name))
    return order


def _ordered(preferred: list[str], present: set[str]) -> list[str]:
    """`present` in `preferred` order, unknown names sorted after."""
    return [p for p in preferred if p in present] + sorted(present - set(preferred))


def _frame_table(frame: pd.DataFrame, index_name: str) -> Table:
    rows = [[str(index)] + [f"{int(v):,}" for v in values] for index, values in zip(frame.index, frame.to_numpy())]
    return Table([index_name] + list(frame.columns), rows, [False] + [True] * len(frame.columns))


def _colalign(table: Table) -> list[str]:
    return ["right" if numeric else "left" for numeric in table.numeric]


# A plot this much wider than tall (the embedding's two panels, a row of error thumbnails)
# would shrink to illegibility beside another: it gets a row of its own.
WIDE_ASPECT = 1.7


def _wide_class(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return ' class="wide"' if width > WIDE_ASPECT * height else ""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _on_test_images(m: dict) -> str:
    return f"On {_fmt_int(m['n_test'])} test images " if _is_number(m.get("n_test")) else "On the test split "


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


def _fmt_score(value) -> str:
    return f"{value:.4f}" if _is_number(value) else MISSING


def _fmt_int(value) -> str:
    return f"{int(value):,}" if _is_number(value) else MISSING


def _fmt_factor(ratio: float) -> str:
    """'3.8x', '446x': a decimal only where it says something."""
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:,.0f}x"


def _fmt_p(value) -> str:
    return "< 0.0001" if value < 0.0001 else f"{value:.4f}"


def _fmt_megabytes(value) -> str:
    return f"{value / 1e6:,.2f}" if _is_number(value) else MISSING


def _interval(m: dict, key: str) -> str:
    """' [0.9501, 0.9812]' from the metrics' confidence_intervals; '' without one."""
    interval = (m.get("confidence_intervals") or {}).get(key)
    if not interval or not all(_is_number(v) for v in interval):
        return ""
    return f" [{interval[0]:.4f}, {interval[1]:.4f}]"


def _parameters(m: dict) -> float:
    return m.get("n_parameters") if _is_number(m.get("n_parameters")) else math.inf


def _cheapest(metrics: dict[str, dict], models: list[str]) -> str:
    """The model with the fewest parameters (then by name). Not by measured latency: the verdict
    would then change from run to run between models of one size."""
    return min(models, key=lambda model: (_parameters(metrics[model]), model))


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _fmt_seconds(value) -> str:
    return f"{value:,.1f}" if _is_number(value) else MISSING


def _fmt_ms(value) -> str:
    return f"{value:.3f}" if _is_number(value) else MISSING


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else MISSING

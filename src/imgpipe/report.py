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
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from imgpipe.dedupe import REASONS as DEDUPE_REASONS
from imgpipe.manifests import HISTORY_COLUMNS, read_manifest, read_split_manifest
from imgpipe.plots import plot_learning_curves
from imgpipe.split import SPLITS

log = logging.getLogger(__name__)

RANK_METRICS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "roc_auc": "ROC AUC",
}
REQUIRED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
MISSING = "n/a"


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
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]


@dataclass(frozen=True)
class Figures:
    """Plots shown side by side in HTML; each is (caption, path to an existing PNG)."""

    images: list[tuple[str, Path]]


Block = Heading | Paragraph | Bullets | Table | Figures


def write_report(
    experiment: str,
    metrics_paths: dict[str, Path],
    history_paths: dict[str, Path],
    split_manifest: Path,
    dedupe_manifest: Path,
    out_dir: Path,
    rank_by: str = "accuracy",
) -> dict:
    """Write report.md, report.html and learning_curves.png to `out_dir`; return a summary.

    A model whose metrics.json is missing or unreadable is listed under "Failed models"
    instead of failing the report. Each model's confusion_matrix.png and roc.png are
    taken from the folder of its metrics.json.

    The summary (JSON-serialisable, for MLflow) holds experiment, rank_by, best_model,
    best_value, runner_up, margin (best minus runner-up in rank_by), ranking (model names,
    best first), failed_models ({model: reason}) and the paths written.
    """
    check_rank_by(rank_by)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics, failed = load_metrics(metrics_paths)
    ranking = rank_models(metrics, rank_by)
    # Learning-curve colours follow the ranking; models without metrics come last.
    curve_order = ranking + [m for m in history_paths if m not in metrics]
    histories, history_problems = load_histories({m: history_paths[m] for m in curve_order if m in history_paths})
    curves_path = out_dir / "learning_curves.png"
    plot_learning_curves(histories, curves_path)

    blocks = [Heading(f"Model comparison: {experiment}", 1)]
    blocks += best_model_section(metrics, ranking, rank_by)
    blocks += comparison_section(metrics, ranking, rank_by)
    if failed:
        blocks += [Heading("Failed models", 2), Bullets([f"{m}: {reason}" for m, reason in failed.items()])]
    blocks += per_class_section(metrics, ranking)
    blocks += data_section(read_split_manifest(split_manifest), read_dedupe_manifest(dedupe_manifest),
                           class_order=_class_order(metrics, ranking))
    blocks += [Heading("Learning curves", 2), Figures([("loss and accuracy per epoch", curves_path)])]
    if history_problems:
        blocks.append(Bullets([f"{m}: {problem}" for m, problem in history_problems.items()]))
    blocks += model_plots_section(metrics, ranking, metrics_paths)

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(blocks, out_dir), encoding="utf-8")
    html_path.write_text(render_html(blocks, title=f"imgpipe: {experiment}"), encoding="utf-8")

    best = ranking[0] if ranking else None
    runner_up = ranking[1] if len(ranking) > 1 else None
    log.info("report of %d model(s) written to %s and %s; best by %s: %s", len(ranking), md_path, html_path,
             rank_by, best)
    for model, reason in failed.items():
        log.warning("model %s is missing from the comparison: %s", model, reason)
    return {
        "experiment": experiment,
        "rank_by": rank_by,
        "best_model": best,
        "best_value": metrics[best][rank_by] if best else None,
        "runner_up": runner_up,
        "margin": _margin(metrics, best, runner_up, rank_by),
        "ranking": ranking,
        "failed_models": failed,
        "report_md": str(md_path),
        "report_html": str(html_path),
        "learning_curves": str(curves_path),
    }


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANK_METRICS:
        raise ValueError(f"rank_by {rank_by!r} is not one of {', '.join(RANK_METRICS)}")


def load_metrics(metrics_paths: dict[str, Path]) -> tuple[dict[str, dict], dict[str, str]]:
    """Read each model's metrics.json: ({model: metrics}, {model: why it could not be read})."""
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
        metrics[model] = data
    return metrics, failed


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


def read_dedupe_manifest(path: Path) -> pd.DataFrame:
    return read_manifest(path, ("file", "class", "status", "reason"))


def best_model_section(metrics: dict[str, dict], ranking: list[str], rank_by: str) -> list[Block]:
    blocks: list[Block] = [Heading("Best model", 2)]
    if not ranking:
        return blocks + [Paragraph("No model produced readable metrics; see Failed models.")]
    best = metrics[ranking[0]]
    label = RANK_METRICS[rank_by]
    size = [f"{_fmt_int(best['n_parameters'])} parameters"] if _is_number(best.get("n_parameters")) else []
    if _is_number(best.get("inference_ms_per_image")):
        size.append(f"{_fmt_ms(best['inference_ms_per_image'])} ms per image")
    text = (
        f"{ranking[0]} ({best.get('arch', 'unknown arch')}) is the best of {len(ranking)} "
        f"{'model' if len(ranking) == 1 else 'models'} by {label}. "
        f"{_on_test_images(best)}it reaches accuracy {_fmt_score(best['accuracy'])}, "
        f"balanced accuracy {_fmt_score(best['balanced_accuracy'])}, macro F1 {_fmt_score(best['macro_f1'])} "
        f"and ROC AUC {_fmt_score(best['roc_auc'])}"
        + (f", with {' and '.join(size)}." if size else ".")
    )
    if best[rank_by] is None:
        text += f" No model has a {label}, so the ranking falls back to macro F1, then fewer parameters."
    if len(ranking) > 1:
        text += " " + _versus_runner_up(metrics, ranking[0], ranking[1], rank_by)
    return blocks + [Paragraph(text)]


def comparison_section(metrics: dict[str, dict], ranking: list[str], rank_by: str) -> list[Block]:
    if not ranking:
        return []
    headers = ["model", "arch", "accuracy", "balanced accuracy", "macro F1", "ROC AUC",
               "params", "train time s", "ms/image", "best epoch / epochs"]
    rows = []
    for model in ranking:
        m = metrics[model]
        rows.append([
            model, str(m.get("arch", MISSING)), _fmt_score(m["accuracy"]), _fmt_score(m["balanced_accuracy"]),
            _fmt_score(m["macro_f1"]), _fmt_score(m["roc_auc"]), _fmt_int(m.get("n_parameters")),
            _fmt_seconds(m.get("train_seconds")), _fmt_ms(m.get("inference_ms_per_image")),
            f"{_fmt_int(m.get('best_epoch'))} / {_fmt_int(m.get('epochs'))}",
        ])
    blocks: list[Block] = [
        Heading("Comparison", 2),
        Paragraph(f"Ranked by {RANK_METRICS[rank_by]}; ties broken by macro F1, then fewer parameters."),
        Table(headers, rows, [False, False] + [True] * 8),
    ]
    notes = [f"{m}: no ROC AUC ({metrics[m].get('roc_auc_note') or 'no reason given'})"
             for m in ranking if metrics[m]["roc_auc"] is None]
    if notes:
        blocks.append(Bullets(notes))
    return blocks


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
    blocks: list[Block] = [Heading("Confusion matrices and ROC curves", 2)]
    for model in ranking:
        folder = Path(metrics_paths[model]).parent
        plots = [("confusion matrix", folder / "confusion_matrix.png"), ("ROC curves", folder / "roc.png")]
        blocks.append(Heading(model, 3))
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
        elif isinstance(block, Table):
            rows = [[cell.replace("|", "\\|") for cell in row] for row in block.rows]
            parts.append(tabulate(rows, headers=block.headers, tablefmt="pipe", disable_numparse=True,
                                  colalign=_colalign(block)))
        elif isinstance(block, Figures):
            parts.append("\n\n".join(f"![{caption}]({Path(os.path.relpath(path, out_dir)).as_posix()})"
                                     for caption, path in block.images))
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page: plots are embedded as data URIs."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            parts.append(tabulate(block.rows, headers=block.headers, tablefmt="html", disable_numparse=True,
                                  colalign=_colalign(block)))
        elif isinstance(block, Figures):
            figures = "".join(
                f'<figure><img alt="{html.escape(caption)}" src="{_data_uri(path)}">'
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
figure img { max-width: 100%; height: auto; }
figcaption { font-size: .85em; color: #666; text-align: center; }
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


def _fmt_seconds(value) -> str:
    return f"{value:,.1f}" if _is_number(value) else MISSING


def _fmt_ms(value) -> str:
    return f"{value:.3f}" if _is_number(value) else MISSING


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else MISSING

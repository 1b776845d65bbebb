"""Evaluation reports: ``report.md`` + ``report.html`` (self-contained) + ``metrics.json``.

Charts are small inline SVGs written here (no plotting library): one bar chart per metric comparing
the methods with the retrieval chance level drawn across it and each method's 95% bootstrap
interval as an error bar, line charts of the metrics against the diff's LoRA rank (rank
generalisation) and against the number of training diffs (data scaling), and DIT's loss per
training epoch. Every chart also goes to ``charts/*.svg`` so the Markdown report can show it as an
image. All metrics live in [0, 1], so every metric chart's y axis spans exactly [0, 1]: bars of
different charts compare; the loss chart runs from 0 to a rounded-up maximum loss.
The tables are built in :mod:`dit_engine.report_tables`, the HTML in :mod:`dit_engine.report_html`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .charts import PALETTE, bar_chart, line_chart, nice_axis
from .evaluate import CHANCE_FIELD, METHOD_DESCRIPTIONS, METRIC_NAMES, Metrics, ResultsError, RowScore
from .files import write_text
from .report_html import html_report
from .report_tables import (
    BREAKDOWN_FIELDS,
    DIFFS_NOTE,
    breakdown,
    comparison_note,
    comparison_table,
    definitions,
    diffs_table,
    examples,
    fmt,
    has_rank_sweep,
    overall_table,
    primary,
    scaling_table,
    summary_sentence,
    training_table,
)

_BAR_METRICS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1", "retrieval_at_5")
_RANK_METRICS = ("contains_match", "retrieval_at_1")
_SCALING_METRICS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1")
_MAX_EPOCH_LABELS = 12  # the loss chart labels at most about this many epochs on its x axis


def write_report(
    metrics: Metrics,
    out_dir: str | Path,
    title: str = "DIT evaluation",
    scaling: Sequence[tuple[int, Metrics]] | None = None,
    training: Sequence[Mapping[str, Any]] | None = None,
    provenance: Mapping[str, Any] | None = None,
    diffs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the report files into ``out_dir`` (created if needed); return the HTML report's path.

    ``scaling``: optional (number of training diffs, metrics of that run) pairs for the
    data-scaling curve of the DIT method (``"dit"``, else each run's first method).
    ``training``: optional per-epoch records ``{"epoch": int, "train_loss": float,
    "val_loss": float | None}`` of the DIT adapter's training (see :func:`load_training`), drawn
    as "DIT loss per epoch"; absent or empty: no chart.
    ``provenance``: machine, commit and date of the run (:func:`dit_engine.provenance.provenance`),
    printed under the title and kept in metrics.json.
    ``diffs``: zoo name -> its verification summary (:func:`dit_engine.diffgen.verification_summary`),
    shown as "The diffs" (do they hide their topic?) and kept in metrics.json.
    Every file is written to a temporary name and renamed, so an interrupted run never leaves a
    half-written report over an old one.
    """
    if not metrics.methods:
        raise ResultsError("write_report: metrics has no methods")
    scaling = _checked_scaling(scaling)
    history = training_history(training or [], "write_report: training")
    out = Path(out_dir)
    (out / "charts").mkdir(parents=True, exist_ok=True)

    charts = _charts(metrics, scaling, history)
    for name, svg in charts.items():
        write_text(out / "charts" / f"{name}.svg", svg)
    payload = {"title": title, **metrics.to_dict(), "scaling": _scaling_dict(scaling), "training": history,
               "provenance": dict(provenance or {}), "diffs": {k: dict(v) for k, v in (diffs or {}).items()}}
    made = _made_line(provenance)
    write_text(out / "metrics.json", json.dumps(payload, indent=1) + "\n")
    write_text(out / "report.md", _markdown(metrics, title, scaling, list(charts), history, made, diffs))
    html_path = out / "report.html"
    write_text(html_path, html_report(metrics, title, scaling, charts, history, made, diffs))
    return html_path


def _checked_scaling(scaling: Sequence[tuple[int, Metrics]] | None) -> list[tuple[int, Metrics]]:
    if not scaling:
        return []
    checked = []
    for i, entry in enumerate(scaling):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ResultsError(f"write_report: scaling[{i}] must be (n_train_diffs, Metrics), found {entry!r}")
        n, m = entry
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(m, Metrics) or not m.methods:
            raise ResultsError(
                f"write_report: scaling[{i}] must be (positive int, non-empty Metrics), "
                f"found ({n!r}, {type(m).__name__})"
            )
        checked.append((n, m))
    return sorted(checked, key=lambda e: e[0])


def _scaling_dict(scaling: list[tuple[int, Metrics]]) -> list[dict]:
    return [
        {"n_train_diffs": n, "methods": {k: dataclasses.asdict(m.methods[k].overall) for k in m.methods}}
        for n, m in scaling
    ]


# ---- the DIT training history -------------------------------------------------------------------


def training_history(records: Sequence[Mapping[str, Any]], where: str = "training") -> list[dict]:
    """Checked per-epoch loss records, sorted by epoch: ``{"epoch", "train_loss", "val_loss"}``.

    ``val_loss`` may be missing or None (no held-out diffs that epoch). A loss that is not finite
    (a diverged run) is kept as None: no point on the chart, an empty table cell. When an epoch
    appears more than once (a resumed training that logged it again) the last record counts.
    """
    if isinstance(records, (str, bytes, Mapping)):
        raise ResultsError(f"{where}: expected a list of per-epoch records, found {type(records).__name__}")
    by_epoch: dict[int, dict] = {}
    for i, rec in enumerate(records):
        here = f"{where}[{i}]"
        if not isinstance(rec, Mapping):
            raise ResultsError(f"{here}: expected an object per epoch, found {type(rec).__name__}")
        epoch = rec.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ResultsError(f"{here}: 'epoch' must be an integer >= 0, found {epoch!r}")
        if "train_loss" not in rec:
            raise ResultsError(f"{here}: missing 'train_loss' (expected epoch, train_loss, val_loss)")
        by_epoch[epoch] = {
            "epoch": epoch,
            "train_loss": _loss(rec["train_loss"], f"{here}: 'train_loss'"),
            "val_loss": _loss(rec.get("val_loss"), f"{here}: 'val_loss'"),
        }
    return [by_epoch[e] for e in sorted(by_epoch)]


def _loss(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ResultsError(f"{what} must be a number or null, found {value!r}")
    return float(value) if math.isfinite(value) else None


def load_training(path: str | Path) -> list[dict]:
    """Read DIT's per-epoch losses from ``epochs.jsonl`` (one JSON object per line, blank lines
    skipped), checked as :func:`training_history` does. A missing file is an empty history."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot read the training history ({e})") from None
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return training_history(records, str(path))


# ---- charts -------------------------------------------------------------------------------------


def _charts(metrics: Metrics, scaling: list[tuple[int, Metrics]], training: list[dict]) -> dict[str, str]:
    """Chart name -> SVG text, in the order the report shows them."""
    colours = _method_colours(metrics)
    charts = {f"methods_{f}": _bar_chart(metrics, f, colours) for f in _BAR_METRICS}
    if has_rank_sweep(metrics):
        for field in _RANK_METRICS:
            charts[f"rank_{field}"] = _rank_chart(metrics, field, colours)
    if scaling:
        charts["scaling"] = _scaling_chart(scaling)
    if training:
        charts["training_loss"] = _training_chart(training)
    return charts


def _method_colours(metrics: Metrics) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(metrics.methods)}


def _bar_chart(metrics: Metrics, field: str, colours: dict[str, str]) -> str:
    values = {name: getattr(m.overall, field) for name, m in metrics.methods.items()}
    chance = None
    if field in CHANCE_FIELD:
        overall = [m.overall for m in metrics.methods.values()]
        chance = sum(getattr(s, CHANCE_FIELD[field]) * s.n for s in overall) / sum(s.n for s in overall)
    ci = {name: m.overall.ci[field] for name, m in metrics.methods.items() if m.overall.ci and field in m.overall.ci}
    return bar_chart(METRIC_NAMES[field], values, colours, chance, ci=ci or None)


def _rank_chart(metrics: Metrics, field: str, colours: dict[str, str]) -> str:
    ranks = sorted({r for m in metrics.methods.values() for r in m.by_rank})
    series = [
        (name, colours[name], [getattr(m.by_rank[r], field) if r in m.by_rank else None for r in ranks])
        for name, m in metrics.methods.items()
        if m.by_rank
    ]
    return line_chart(
        f"{METRIC_NAMES[field]} by diff rank", [float(r) for r in ranks], [str(r) for r in ranks],
        series, x_title="LoRA rank of the diff", scale="categorical",
    )


def _scaling_chart(scaling: list[tuple[int, Metrics]]) -> str:
    xs = [float(n) for n, _ in scaling]
    series = [
        (METRIC_NAMES[f], PALETTE[i], [getattr(m.methods[primary(m)].overall, f) for _, m in scaling])
        for i, f in enumerate(_SCALING_METRICS)
    ]
    spread = max(xs) / min(xs)
    return line_chart(
        f"{primary(scaling[-1][1])}: metrics vs training diffs", xs, [str(n) for n, _ in scaling],
        series, x_title="number of training diffs" + (" (log scale)" if spread >= 10 else ""),
        scale="log" if spread >= 10 else "linear",
    )


def _training_chart(training: list[dict]) -> str:
    """Train and held-out loss per epoch; y from 0 to the largest loss rounded up to a round step."""
    epochs = [r["epoch"] for r in training]
    series = [("train diffs", PALETTE[0], [r["train_loss"] for r in training])]
    if any(r["val_loss"] is not None for r in training):
        series.append(("held-out diffs", PALETTE[1], [r["val_loss"] for r in training]))
    losses = [v for _, _, ys in series for v in ys if v is not None]
    y_range, ticks = nice_axis(max(losses, default=0.0))
    every = math.ceil(len(epochs) / _MAX_EPOCH_LABELS)
    labels = [str(e) if i % every == 0 else "" for i, e in enumerate(epochs)]
    return line_chart(
        "DIT loss per epoch", [float(e) for e in epochs], labels, series, x_title="epoch",
        scale="linear", y_range=y_range, y_ticks=ticks, y_title="loss",
    )


# ---- Markdown -----------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows), ""]


def _made_line(provenance: Mapping[str, Any] | None) -> str:
    if not provenance:
        return ""
    commit = str(provenance.get("commit", "unknown"))[:12] + (" with uncommitted changes" if provenance.get("dirty") else "")
    verb = provenance.get("verb", "Measured")  # "Scored": dit evaluate, which reads answers made elsewhere
    return f"{verb} on {provenance.get('machine', 'an unnamed machine')}, commit {commit}, {provenance.get('date', '')}."


def _markdown(
    metrics: Metrics, title: str, scaling: list[tuple[int, Metrics]], charts: list[str], training: list[dict],
    made: str = "", diffs: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    out = [f"# {title}", "", *([made, ""] if made else []), summary_sentence(metrics), ""]
    out += ["## Methods", ""]
    out += [f"- **{name}**: {METHOD_DESCRIPTIONS.get(name, 'custom method')}" for name in metrics.methods]
    out += ["", "## Overall", ""]
    if metrics.bootstrap_resamples:
        out += ["Under each method: its 95% bootstrap interval over diffs (also the error bars).", ""]
    out += _md_table(*overall_table(metrics, ci_cells=False))
    out += [f"![{c}](charts/{c}.svg)" for c in charts if c.startswith("methods_")] + [""]
    if metrics.comparisons:
        out += ["## Paired comparison", "", comparison_note(metrics), "", *_md_table(*comparison_table(metrics))]

    if diffs:
        out += ["## The diffs", "", DIFFS_NOTE, "", *_md_table(*diffs_table(diffs))]

    methods, rows = breakdown(metrics, "by_category")
    out += ["## By category", "", "Cells: contains match / token F1 / retrieval@1.", ""]
    header = ["category", "n", *methods]
    out += _md_table(header, [[k, n, *_triples(v, len(methods))] for k, n, v in rows])

    if has_rank_sweep(metrics):
        methods, rows = breakdown(metrics, "by_rank")
        out += ["## By diff rank (rank generalisation)", "", "Cells: contains match / token F1 / retrieval@1.", ""]
        out += _md_table(["rank", "n", *methods], [[k, n, *_triples(v, len(methods))] for k, n, v in rows])
        out += [f"![{c}](charts/{c}.svg)" for c in charts if c.startswith("rank_")] + [""]

    if scaling:
        out += ["## Data scaling", "", *_md_table(*scaling_table(scaling)), "![scaling](charts/scaling.svg)", ""]
    if training:
        out += ["## DIT training", "", "![training_loss](charts/training_loss.svg)", "",
                *_md_table(*training_table(training))]

    out += ["## Examples", ""]
    header = ["id", "label", *metrics.methods]
    rows = [[i, label, *(_example_cell(r) for r in rs)] for i, label, rs in examples(metrics)]
    out += _md_table(header, rows)
    out += ["## Definitions", "", *(f"- **{k}**: {v}" for k, v in definitions(metrics)), ""]
    return "\n".join(out)


def _triples(values: list[float | None], n_methods: int) -> list[str]:
    k = len(BREAKDOWN_FIELDS)
    cells = []
    for i in range(n_methods):
        chunk = values[i * k : (i + 1) * k]
        cells.append("" if chunk[0] is None else " / ".join(fmt(v) for v in chunk))
    return cells


def _example_cell(row: RowScore | None) -> str:
    if row is None:
        return ""
    mark = "\u2713" if row.contains_match else "\u2717"
    return f"{mark} {row.answer.strip()} (rank {row.retrieval_rank})"

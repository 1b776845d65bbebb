"""Evaluation reports: ``report.md`` + ``report.html`` (self-contained) + ``metrics.json``.

Charts are small inline SVGs written here (no plotting library): one bar chart per metric comparing
the methods with the retrieval chance level drawn across it, line charts of the metrics against the
diff's LoRA rank (rank generalisation) and against the number of training diffs (data scaling).
Every chart also goes to ``charts/*.svg`` so the Markdown report can show it as an image.
All metrics live in [0, 1], so every y axis spans exactly [0, 1]: bars of different charts compare.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from dit_engine.evaluate import (
    CHANCE_FIELD,
    CONTAINS_MAX_EXTRA_WORDS,
    METHOD_DESCRIPTIONS,
    METRIC_FIELDS,
    METRIC_NAMES,
    Metrics,
    ResultsError,
    RowScore,
)

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999", "#000000")
_CHANCE_COLOUR = "#C0392B"
_BAR_METRICS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1", "retrieval_at_5")
_RANK_METRICS = ("contains_match", "retrieval_at_1")
_SCALING_METRICS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1")
_PRIMARY_METHOD = "dit"
_MAX_EXAMPLES = 12

# Bar chart geometry (pixels); the plot area is what bar heights are proportional to.
_BAR_W, _BAR_H = 250, 220
_BAR_MARGIN = dict(left=34, right=10, top=30, bottom=46)
_BAR_PLOT_H = _BAR_H - _BAR_MARGIN["top"] - _BAR_MARGIN["bottom"]
# Line chart geometry: a legend column on the right.
_LINE_W, _LINE_H = 470, 250
_LINE_MARGIN = dict(left=40, right=140, top=30, bottom=44)


def write_report(
    metrics: Metrics,
    out_dir: str | Path,
    title: str = "DIT evaluation",
    scaling: Sequence[tuple[int, Metrics]] | None = None,
) -> Path:
    """Write the report files into ``out_dir`` (created if needed); return the HTML report's path.

    ``scaling``: optional (number of training diffs, metrics of that run) pairs for the
    data-scaling curve of the DIT method (``"dit"``, else each run's first method).
    Every file is written to a temporary name and renamed, so an interrupted run never leaves a
    half-written report over an old one.
    """
    if not metrics.methods:
        raise ResultsError("write_report: metrics has no methods")
    scaling = _checked_scaling(scaling)
    out = Path(out_dir)
    (out / "charts").mkdir(parents=True, exist_ok=True)

    charts = _charts(metrics, scaling)
    for name, svg in charts.items():
        _write_atomic(out / "charts" / f"{name}.svg", svg)
    payload = {"title": title, **metrics.to_dict(), "scaling": _scaling_dict(scaling)}
    _write_atomic(out / "metrics.json", json.dumps(payload, indent=1) + "\n")
    _write_atomic(out / "report.md", _markdown(metrics, title, scaling, list(charts)))
    html_path = out / "report.html"
    _write_atomic(html_path, _html(metrics, title, scaling, charts))
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


def _primary(metrics: Metrics) -> str:
    return _PRIMARY_METHOD if _PRIMARY_METHOD in metrics.methods else next(iter(metrics.methods))


def _scaling_dict(scaling: list[tuple[int, Metrics]]) -> list[dict]:
    return [
        {"n_train_diffs": n, "methods": {k: dataclasses.asdict(m.methods[k].overall) for k in m.methods}}
        for n, m in scaling
    ]


def _write_atomic(path: Path, text: str) -> None:
    # A sibling temp name (same file system, so os.replace is atomic); plain open() keeps the
    # usual umask permissions, which mkstemp's private 0600 would not.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- what goes into the report ------------------------------------------------------------------


def _charts(metrics: Metrics, scaling: list[tuple[int, Metrics]]) -> dict[str, str]:
    """Chart name -> SVG text, in the order the report shows them."""
    colours = _method_colours(metrics)
    charts = {f"methods_{f}": _bar_chart(metrics, f, colours) for f in _BAR_METRICS}
    if _has_rank_sweep(metrics):
        for field in _RANK_METRICS:
            charts[f"rank_{field}"] = _rank_chart(metrics, field, colours)
    if scaling:
        charts["scaling"] = _scaling_chart(scaling)
    return charts


def _method_colours(metrics: Metrics) -> dict[str, str]:
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(metrics.methods)}


def _has_rank_sweep(metrics: Metrics) -> bool:
    return any(len(m.by_rank) > 1 for m in metrics.methods.values())


def _bar_chart(metrics: Metrics, field: str, colours: dict[str, str]) -> str:
    values = {name: getattr(m.overall, field) for name, m in metrics.methods.items()}
    chance = None
    if field in CHANCE_FIELD:
        overall = [m.overall for m in metrics.methods.values()]
        chance = sum(getattr(s, CHANCE_FIELD[field]) * s.n for s in overall) / sum(s.n for s in overall)
    return _svg_bars(METRIC_NAMES[field], values, colours, chance)


def _rank_chart(metrics: Metrics, field: str, colours: dict[str, str]) -> str:
    ranks = sorted({r for m in metrics.methods.values() for r in m.by_rank})
    series = [
        (name, colours[name], [getattr(m.by_rank[r], field) if r in m.by_rank else None for r in ranks])
        for name, m in metrics.methods.items()
        if m.by_rank
    ]
    return _svg_lines(
        f"{METRIC_NAMES[field]} by diff rank", [float(r) for r in ranks], [str(r) for r in ranks],
        series, x_title="LoRA rank of the diff", scale="categorical",
    )


def _scaling_chart(scaling: list[tuple[int, Metrics]]) -> str:
    xs = [float(n) for n, _ in scaling]
    series = [
        (METRIC_NAMES[f], _PALETTE[i], [getattr(m.methods[_primary(m)].overall, f) for _, m in scaling])
        for i, f in enumerate(_SCALING_METRICS)
    ]
    spread = max(xs) / min(xs)
    return _svg_lines(
        f"{_primary(scaling[-1][1])}: metrics vs training diffs", xs, [str(n) for n, _ in scaling],
        series, x_title="number of training diffs" + (" (log scale)" if spread >= 10 else ""),
        scale="log" if spread >= 10 else "linear",
    )


# ---- SVG ----------------------------------------------------------------------------------------


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">',
        f"<title>{_esc(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]


def _svg_y_axis(left: float, right: float, top: float, plot_h: float) -> list[str]:
    parts = []
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        stroke = "#333" if tick == 0 else "#ddd"
        parts.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" stroke="{stroke}"/>')
        parts.append(f'<text x="{left - 4:.1f}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{tick:g}</text>')
    return parts


def _svg_bars(title: str, values: dict[str, float], colours: dict[str, str], chance: float | None) -> str:
    m = _BAR_MARGIN
    top, left, right = m["top"], m["left"], _BAR_W - m["right"]
    baseline = top + _BAR_PLOT_H
    parts = _svg_open(_BAR_W, _BAR_H, title) + _svg_y_axis(left, right, top, _BAR_PLOT_H)
    slot = (right - left) / len(values)
    bar_w = slot * 0.62
    for i, (method, value) in enumerate(values.items()):
        height = value * _BAR_PLOT_H
        x = left + i * slot + (slot - bar_w) / 2
        cx = x + bar_w / 2
        parts.append(
            f'<rect class="bar" data-method="{_esc(method)}" data-value="{value:.6f}" x="{x:.2f}" '
            f'y="{baseline - height:.4f}" width="{bar_w:.2f}" height="{height:.4f}" fill="{colours[method]}">'
            f"<title>{_esc(method)}: {value:.3f}</title></rect>"
        )
        parts.append(f'<text x="{cx:.1f}" y="{baseline - height - 3:.1f}" text-anchor="middle">{value:.2f}</text>')
        for j, line in enumerate(_label_lines(method, slot)):
            parts.append(
                f'<text x="{cx:.1f}" y="{baseline + 14 + 12 * j:.1f}" text-anchor="middle">{_esc(line)}</text>'
            )
    if chance is not None:
        y = baseline - chance * _BAR_PLOT_H
        parts.append(
            f'<line class="chance" data-value="{chance:.6f}" x1="{left}" y1="{y:.4f}" x2="{right}" y2="{y:.4f}" '
            f'stroke="{_CHANCE_COLOUR}" stroke-width="1.5" stroke-dasharray="5 3"/>'
        )
        parts.append(
            f'<text x="{right:.1f}" y="{_BAR_H - 4}" text-anchor="end" fill="{_CHANCE_COLOUR}">'
            f"- - chance {chance:.3f}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_lines(
    title: str,
    xs: list[float],
    x_labels: list[str],
    series: list[tuple[str, str, list[float | None]]],
    x_title: str,
    scale: str,
) -> str:
    m = _LINE_MARGIN
    top, left, right = m["top"], m["left"], _LINE_W - m["right"]
    plot_h = _LINE_H - top - m["bottom"]
    baseline = top + plot_h
    parts = _svg_open(_LINE_W, _LINE_H, title) + _svg_y_axis(left, right, top, plot_h)
    positions = _x_positions(xs, scale)
    px = [left + 12 + p * (right - left - 24) for p in positions]
    for x, label in zip(px, x_labels):
        parts.append(f'<line x1="{x:.1f}" y1="{baseline}" x2="{x:.1f}" y2="{baseline + 4}" stroke="#333"/>')
        parts.append(f'<text x="{x:.1f}" y="{baseline + 16}" text-anchor="middle">{_esc(label)}</text>')
    parts.append(
        f'<text x="{(left + right) / 2:.1f}" y="{_LINE_H - 8}" text-anchor="middle" fill="#555">{_esc(x_title)}</text>'
    )
    for i, (name, colour, ys) in enumerate(series):
        points = [(x, baseline - y * plot_h, y) for x, y in zip(px, ys) if y is not None]
        if len(points) > 1:
            path = " ".join(f"{x:.2f},{y:.2f}" for x, y, _ in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y, value in points:
            parts.append(
                f'<circle class="point" data-series="{_esc(name)}" data-value="{value:.6f}" cx="{x:.2f}" '
                f'cy="{y:.4f}" r="3.5" fill="{colour}"><title>{_esc(name)}: {value:.3f}</title></circle>'
            )
        ly = top + 8 + 18 * i
        parts.append(
            f'<line x1="{right + 12}" y1="{ly}" x2="{right + 32}" y2="{ly}" stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{right + 37}" y="{ly + 4}">{_esc(_short(name, 100))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _x_positions(xs: list[float], scale: str) -> list[float]:
    """Positions in [0, 1] along the x axis: evenly spaced, linear, or logarithmic in x."""
    if len(xs) == 1:
        return [0.5]
    if scale == "categorical":
        return [i / (len(xs) - 1) for i in range(len(xs))]
    f = math.log if scale == "log" else float
    lo, hi = f(min(xs)), f(max(xs))
    return [(f(x) - lo) / (hi - lo) if hi > lo else 0.5 for x in xs]


def _label_lines(name: str, width_px: float) -> list[str]:
    """One line if it fits, else two: broken before a '+' or at a space/-/_ ("diff" / "+trigger")."""
    if len(name) <= _chars_fitting(width_px):
        return [name]
    for sep, keep_on_second in (("+", True), (" ", False), ("-", False), ("_", False)):
        head, found, tail = name.partition(sep)
        if found and head:
            return [_short(head, width_px), _short((sep if keep_on_second else "") + tail, width_px)]
    return [_short(name, width_px)]


def _chars_fitting(width_px: float) -> int:
    return max(4, int(width_px / 6))  # ~6 px per character at 11 px sans-serif


def _short(name: str, width_px: float) -> str:
    """Truncate a label to what fits in about width_px."""
    limit = _chars_fitting(width_px)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


# ---- tables (shared cell values for Markdown and HTML) ------------------------------------------


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _overall_table(metrics: Metrics) -> tuple[list[str], list[list[str]]]:
    header = ["method", "n", *(METRIC_NAMES[f] for f in METRIC_FIELDS), "chance@1", "chance@5",
              "answer tokens", "time (s)"]
    rows = []
    for name, m in metrics.methods.items():
        o = m.overall
        rows.append([
            name, str(o.n), *(_fmt(getattr(o, f)) for f in METRIC_FIELDS), _fmt(o.chance_at_1),
            _fmt(o.chance_at_5), "" if o.mean_answer_tokens is None else f"{o.mean_answer_tokens:.1f}",
            "" if o.time_s is None else f"{o.time_s:.1f}",
        ])
    return header, rows


_BREAKDOWN_FIELDS = ("contains_match", "token_f1", "retrieval_at_1")


def _breakdown(metrics: Metrics, by: str) -> tuple[list[str], list[tuple[str, str, list[float | None]]]]:
    """Methods, and per key (category or rank): (key, n per method, values per method x field)."""
    groups = {name: getattr(m, by) for name, m in metrics.methods.items()}
    keys = list(dict.fromkeys(k for g in groups.values() for k in g))
    if by == "by_rank":
        keys.sort()
    rows = []
    for key in keys:
        ns = sorted({g[key].n for g in groups.values() if key in g})
        values = [
            getattr(g[key], f) if key in g else None for g in groups.values() for f in _BREAKDOWN_FIELDS
        ]
        rows.append((str(key), "/".join(map(str, ns)), values))
    return list(groups), rows


def _scaling_table(scaling: list[tuple[int, Metrics]]) -> tuple[list[str], list[list[str]]]:
    header = ["training diffs", "method", "n", *(METRIC_NAMES[f] for f in METRIC_FIELDS)]
    rows = []
    for n_train, m in scaling:
        name = _primary(m)
        o = m.methods[name].overall
        rows.append([str(n_train), name, str(o.n), *(_fmt(getattr(o, f)) for f in METRIC_FIELDS)])
    return header, rows


def _examples(metrics: Metrics) -> list[tuple[str, str, list[RowScore | None]]]:
    """Up to _MAX_EXAMPLES diffs (first ids in sorted order): (id, label, one row per method)."""
    by_id: dict[str, dict[str, RowScore]] = {}
    for r in metrics.rows:
        by_id.setdefault(r.id, {})[r.method] = r
    out = []
    for diff_id in sorted(by_id)[:_MAX_EXAMPLES]:
        rows = by_id[diff_id]
        label = next(iter(rows.values())).label
        out.append((diff_id, label, [rows.get(m) for m in metrics.methods]))
    return out


_DEFINITIONS = [
    ("exact match", "normalised answer equals normalised label (lower case, accents, punctuation and "
     "the articles a/an/the removed, whitespace collapsed)."),
    ("contains match", "exact match, or the normalised label appears as a whole-word phrase in an "
     f"answer at most {CONTAINS_MAX_EXTRA_WORDS} words longer than the label."),
    ("token F1", "SQuAD bag-of-words F1 between normalised answer and label."),
    ("retrieval@k", "the true label is among the k candidate labels of the split most similar to the "
     "answer (0.5 x character 3-5-gram TF-IDF cosine + 0.5 x word F1; ties count against the label). "
     "Chance: k / number of candidates."),
    ("MRR", "mean of 1 / retrieval rank of the true label."),
]


# ---- Markdown -----------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows), ""]


def _markdown(metrics: Metrics, title: str, scaling: list[tuple[int, Metrics]], charts: list[str]) -> str:
    out = [f"# {title}", "", _summary_sentence(metrics), ""]
    out += ["## Methods", ""]
    out += [f"- **{name}**: {METHOD_DESCRIPTIONS.get(name, 'custom method')}" for name in metrics.methods]
    out += ["", "## Overall", "", *_md_table(*_overall_table(metrics))]
    out += [f"![{c}](charts/{c}.svg)" for c in charts if c.startswith("methods_")] + [""]

    methods, rows = _breakdown(metrics, "by_category")
    out += ["## By category", "", "Cells: contains match / token F1 / retrieval@1.", ""]
    header = ["category", "n", *methods]
    out += _md_table(header, [[k, n, *_triples(v, len(methods))] for k, n, v in rows])

    if _has_rank_sweep(metrics):
        methods, rows = _breakdown(metrics, "by_rank")
        out += ["## By diff rank (rank generalisation)", "", "Cells: contains match / token F1 / retrieval@1.", ""]
        out += _md_table(["rank", "n", *methods], [[k, n, *_triples(v, len(methods))] for k, n, v in rows])
        out += [f"![{c}](charts/{c}.svg)" for c in charts if c.startswith("rank_")] + [""]

    if scaling:
        out += ["## Data scaling", "", *_md_table(*_scaling_table(scaling)), "![scaling](charts/scaling.svg)", ""]

    out += ["## Examples", ""]
    header = ["id", "label", *metrics.methods]
    rows = [[i, label, *(_example_cell(r) for r in rs)] for i, label, rs in _examples(metrics)]
    out += _md_table(header, rows)
    out += ["## Definitions", "", *(f"- **{k}**: {v}" for k, v in _DEFINITIONS), ""]
    return "\n".join(out)


def _triples(values: list[float | None], n_methods: int) -> list[str]:
    k = len(_BREAKDOWN_FIELDS)
    cells = []
    for i in range(n_methods):
        chunk = values[i * k : (i + 1) * k]
        cells.append("" if chunk[0] is None else " / ".join(_fmt(v) for v in chunk))
    return cells


def _example_cell(row: RowScore | None) -> str:
    if row is None:
        return ""
    mark = "\u2713" if row.contains_match else "\u2717"
    return f"{mark} {row.answer.strip()} (rank {row.retrieval_rank})"


def _summary_sentence(metrics: Metrics) -> str:
    n_diffs = len({(r.split, r.id) for r in metrics.rows})
    n_candidates = sorted({r.n_candidates for r in metrics.rows})
    splits = ", ".join(s or "(unnamed)" for s in metrics.splits) or "(unnamed)"
    return (
        f"{n_diffs} diffs, {len(metrics.methods)} methods, split(s): {splits}; retrieval among "
        f"{'/'.join(map(str, n_candidates))} candidate labels."
    )


# ---- HTML ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 24px auto; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.best { font-weight: bold; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.hit { color: #1a7f37; } .miss { color: #b42318; } .note { color: #555; }
"""


def _html(metrics: Metrics, title: str, scaling: list[tuple[int, Metrics]], charts: dict[str, str]) -> str:
    body = [f"<h1>{_esc(title)}</h1>", f'<p class="note">{_esc(_summary_sentence(metrics))}</p>']
    body += ["<h2>Methods</h2>", "<ul>"]
    body += [
        f"<li><b>{_esc(n)}</b>: {_esc(METHOD_DESCRIPTIONS.get(n, 'custom method'))}</li>" for n in metrics.methods
    ]
    body += ["</ul>", "<h2>Overall</h2>", _html_overall(metrics)]
    body.append(_html_charts(charts, "methods_"))

    body += ["<h2>By category</h2>", _html_breakdown(metrics, "by_category", "category")]
    if _has_rank_sweep(metrics):
        body += ["<h2>By diff rank (rank generalisation)</h2>", _html_charts(charts, "rank_")]
        body.append(_html_breakdown(metrics, "by_rank", "rank"))
    if scaling:
        body += ["<h2>Data scaling</h2>", _html_charts(charts, "scaling"), _html_table(*_scaling_table(scaling))]
    body += ["<h2>Examples</h2>", _html_examples(metrics)]
    body += ["<h2>Definitions</h2>", "<dl>"]
    body += [f"<dt><b>{_esc(k)}</b></dt><dd>{_esc(v)}</dd>" for k, v in _DEFINITIONS]
    body.append("</dl>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_charts(charts: dict[str, str], prefix: str) -> str:
    return '<div class="charts">\n' + "\n".join(v for k, v in charts.items() if k.startswith(prefix)) + "\n</div>"


def _html_table(header: list[str], rows: list[list[str]], best_cols: Sequence[int] = ()) -> str:
    best = {}
    for c in best_cols:
        values = [float(r[c]) for r in rows if r[c]]
        if len(values) > 1 and max(values) > min(values):  # nothing to point at when all tie
            best[c] = max(values)
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for c, v in enumerate(r):
            cls = "num" if _is_number(v) else ""
            if c in best and v and float(v) == best[c]:
                cls += " best"
            cells.append(f'<td class="{cls.strip()}">{_esc(v)}</td>' if cls else f"<td>{_esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _html_overall(metrics: Metrics) -> str:
    header, rows = _overall_table(metrics)
    return _html_table(header, rows, best_cols=range(2, 2 + len(METRIC_FIELDS)))


def _html_breakdown(metrics: Metrics, by: str, key_name: str) -> str:
    """Grouped header (method over its three metrics); cell shade grows with the value."""
    methods, rows = _breakdown(metrics, by)
    k = len(_BREAKDOWN_FIELDS)
    short = {"contains_match": "contains", "token_f1": "F1", "retrieval_at_1": "R@1"}
    out = [
        "<table>",
        f'<tr><th rowspan="2">{_esc(key_name)}</th><th rowspan="2">n</th>'
        + "".join(f'<th colspan="{k}">{_esc(m)}</th>' for m in methods) + "</tr>",
        "<tr>" + "".join(f"<th>{short[f]}</th>" for _ in methods for f in _BREAKDOWN_FIELDS) + "</tr>",
    ]
    for key, n, values in rows:
        cells = [f"<td>{_esc(key)}</td>", f'<td class="num">{_esc(n)}</td>']
        for v in values:
            if v is None:
                cells.append("<td></td>")
            else:
                shade = f"background: rgba(0, 114, 178, {0.05 + 0.45 * v:.3f})"
                cells.append(f'<td class="num" style="{shade}">{_fmt(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_examples(metrics: Metrics) -> str:
    out = [
        "<table>",
        "<tr><th>id</th><th>label</th>" + "".join(f"<th>{_esc(m)}</th>" for m in metrics.methods) + "</tr>",
    ]
    for diff_id, label, rows in _examples(metrics):
        cells = [f"<td>{_esc(diff_id)}</td>", f"<td>{_esc(label)}</td>"]
        for r in rows:
            if r is None:
                cells.append("<td></td>")
                continue
            cls, mark = ("hit", "\u2713") if r.contains_match else ("miss", "\u2717")
            cells.append(
                f'<td><span class="{cls}">{mark}</span> {_esc(r.answer.strip())} '
                f'<span class="note">(rank {r.retrieval_rank})</span></td>'
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)

"""Evaluation reports: ``report.md`` + ``report.html`` (self-contained) + ``metrics.json``.

Charts are small inline SVGs written here (no plotting library): one bar chart per metric comparing
the methods with the retrieval chance level drawn across it, line charts of the metrics against the
diff's LoRA rank (rank generalisation) and against the number of training diffs (data scaling).
Every chart also goes to ``charts/*.svg`` so the Markdown report can show it as an image.
All metrics live in [0, 1], so every y axis spans exactly [0, 1]: bars of different charts compare.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from .charts import PALETTE, bar_chart, esc, line_chart
from .evaluate import CHANCE_FIELD, METHOD_DESCRIPTIONS, METRIC_FIELDS, METRIC_NAMES, Metrics, ResultsError, RowScore
from .files import write_text
from .text_match import CONTAINS_MAX_EXTRA_WORDS

_BAR_METRICS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1", "retrieval_at_5")
_RANK_METRICS = ("contains_match", "retrieval_at_1")
_SCALING_METRICS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1")
_PRIMARY_METHOD = "dit"
_MAX_EXAMPLES = 12


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
        write_text(out / "charts" / f"{name}.svg", svg)
    payload = {"title": title, **metrics.to_dict(), "scaling": _scaling_dict(scaling)}
    write_text(out / "metrics.json", json.dumps(payload, indent=1) + "\n")
    write_text(out / "report.md", _markdown(metrics, title, scaling, list(charts)))
    html_path = out / "report.html"
    write_text(html_path, _html(metrics, title, scaling, charts))
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
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(metrics.methods)}


def _has_rank_sweep(metrics: Metrics) -> bool:
    return any(len(m.by_rank) > 1 for m in metrics.methods.values())


def _bar_chart(metrics: Metrics, field: str, colours: dict[str, str]) -> str:
    values = {name: getattr(m.overall, field) for name, m in metrics.methods.items()}
    chance = None
    if field in CHANCE_FIELD:
        overall = [m.overall for m in metrics.methods.values()]
        chance = sum(getattr(s, CHANCE_FIELD[field]) * s.n for s in overall) / sum(s.n for s in overall)
    return bar_chart(METRIC_NAMES[field], values, colours, chance)


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
        (METRIC_NAMES[f], PALETTE[i], [getattr(m.methods[_primary(m)].overall, f) for _, m in scaling])
        for i, f in enumerate(_SCALING_METRICS)
    ]
    spread = max(xs) / min(xs)
    return line_chart(
        f"{_primary(scaling[-1][1])}: metrics vs training diffs", xs, [str(n) for n, _ in scaling],
        series, x_title="number of training diffs" + (" (log scale)" if spread >= 10 else ""),
        scale="log" if spread >= 10 else "linear",
    )


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
    body = [f"<h1>{esc(title)}</h1>", f'<p class="note">{esc(_summary_sentence(metrics))}</p>']
    body += ["<h2>Methods</h2>", "<ul>"]
    body += [
        f"<li><b>{esc(n)}</b>: {esc(METHOD_DESCRIPTIONS.get(n, 'custom method'))}</li>" for n in metrics.methods
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
    body += [f"<dt><b>{esc(k)}</b></dt><dd>{esc(v)}</dd>" for k, v in _DEFINITIONS]
    body.append("</dl>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
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
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for c, v in enumerate(r):
            cls = "num" if _is_number(v) else ""
            if c in best and v and float(v) == best[c]:
                cls += " best"
            cells.append(f'<td class="{cls.strip()}">{esc(v)}</td>' if cls else f"<td>{esc(v)}</td>")
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
        f'<tr><th rowspan="2">{esc(key_name)}</th><th rowspan="2">n</th>'
        + "".join(f'<th colspan="{k}">{esc(m)}</th>' for m in methods) + "</tr>",
        "<tr>" + "".join(f"<th>{short[f]}</th>" for _ in methods for f in _BREAKDOWN_FIELDS) + "</tr>",
    ]
    for key, n, values in rows:
        cells = [f"<td>{esc(key)}</td>", f'<td class="num">{esc(n)}</td>']
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
        "<tr><th>id</th><th>label</th>" + "".join(f"<th>{esc(m)}</th>" for m in metrics.methods) + "</tr>",
    ]
    for diff_id, label, rows in _examples(metrics):
        cells = [f"<td>{esc(diff_id)}</td>", f"<td>{esc(label)}</td>"]
        for r in rows:
            if r is None:
                cells.append("<td></td>")
                continue
            cls, mark = ("hit", "\u2713") if r.contains_match else ("miss", "\u2717")
            cells.append(
                f'<td><span class="{cls}">{mark}</span> {esc(r.answer.strip())} '
                f'<span class="note">(rank {r.retrieval_rank})</span></td>'
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)

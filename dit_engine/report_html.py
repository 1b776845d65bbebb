"""The self-contained HTML report (``report.html``): the tables of :mod:`dit_engine.report_tables`
with the SVG charts inline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .charts import esc
from .evaluate import METHOD_DESCRIPTIONS, METRIC_FIELDS, Metrics
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
    lead_number,
    overall_table,
    scaling_table,
    summary_sentence,
    training_table,
)

# The reports' style sheet (the LatentQA report uses it too).
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 24px auto; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.best { font-weight: bold; }
span.ci { white-space: nowrap; color: #555; font-size: 0.85em; font-weight: normal; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.hit { color: #1a7f37; } .miss { color: #b42318; } .note { color: #555; }
"""


def html_report(
    metrics: Metrics, title: str, scaling: list[tuple[int, Metrics]], charts: dict[str, str], training: list[dict],
    made: str = "", diffs: Mapping[str, Mapping] | None = None,
) -> str:
    body = [f"<h1>{esc(title)}</h1>", *([f'<p class="note">{esc(made)}</p>'] if made else []),
            f'<p class="note">{esc(summary_sentence(metrics))}</p>']
    body += ["<h2>Methods</h2>", "<ul>"]
    body += [
        f"<li><b>{esc(n)}</b>: {esc(METHOD_DESCRIPTIONS.get(n, 'custom method'))}</li>" for n in metrics.methods
    ]
    body += ["</ul>", "<h2>Overall</h2>", _html_overall(metrics)]
    if metrics.bootstrap_resamples:
        body.append('<p class="note">In brackets and as error bars: 95% bootstrap interval over diffs.</p>')
    body.append(_html_charts(charts, "methods_"))
    if metrics.comparisons:
        body += ["<h2>Paired comparison</h2>", f'<p class="note">{esc(comparison_note(metrics))}</p>',
                 html_table(*comparison_table(metrics))]
    if diffs:
        body += ["<h2>The diffs</h2>", f'<p class="note">{esc(DIFFS_NOTE)}</p>', html_table(*diffs_table(diffs))]
    body += ["<h2>By category</h2>", _html_breakdown(metrics, "by_category", "category")]
    if has_rank_sweep(metrics):
        body += ["<h2>By diff rank (rank generalisation)</h2>", _html_charts(charts, "rank_")]
        body.append(_html_breakdown(metrics, "by_rank", "rank"))
    if scaling:
        body += ["<h2>Data scaling</h2>", _html_charts(charts, "scaling"), html_table(*scaling_table(scaling))]
    if training:
        body += ["<h2>DIT training</h2>", _html_charts(charts, "training"), html_table(*training_table(training))]
    body += ["<h2>Examples</h2>", _html_examples(metrics)]
    body += ["<h2>Definitions</h2>", "<dl>"]
    body += [f"<dt><b>{esc(k)}</b></dt><dd>{esc(v)}</dd>" for k, v in definitions(metrics)]
    body.append("</dl>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_charts(charts: dict[str, str], prefix: str) -> str:
    return '<div class="charts">\n' + "\n".join(v for k, v in charts.items() if k.startswith(prefix)) + "\n</div>"


def html_table(header: list[str], rows: list[list[str]], best_cols: Sequence[int] = ()) -> str:
    """A table; numeric cells right-aligned, the highest value of each of ``best_cols`` in bold
    (cells compare by the number they start with)."""
    best = {}
    for c in best_cols:
        values = [v for v in (lead_number(r[c]) for r in rows) if v is not None]
        if len(values) > 1 and max(values) > min(values):  # nothing to point at when all tie
            best[c] = max(values)
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for c, v in enumerate(r):
            number = lead_number(v)
            cls = "num" if number is not None else ""
            if c in best and number == best[c]:
                cls += " best"
            cells.append(f'<td class="{cls.strip()}">{_cell(v)}</td>' if cls else f"<td>{esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _cell(text: str) -> str:
    """A number cell; a bracketed interval after the number stays on one line, in grey."""
    number, sep, interval = text.partition(" [")
    if not sep:
        return esc(text)
    return f'{esc(number)} <span class="ci">[{esc(interval)}</span>'


def _html_overall(metrics: Metrics) -> str:
    header, rows = overall_table(metrics, ci_cells=True)
    return html_table(header, rows, best_cols=range(2, 2 + len(METRIC_FIELDS)))


def _html_breakdown(metrics: Metrics, by: str, key_name: str) -> str:
    """Grouped header (method over its three metrics); cell shade grows with the value."""
    methods, rows = breakdown(metrics, by)
    k = len(BREAKDOWN_FIELDS)
    short = {"contains_match": "contains", "token_f1": "F1", "retrieval_at_1": "R@1"}
    out = [
        "<table>",
        f'<tr><th rowspan="2">{esc(key_name)}</th><th rowspan="2">n</th>'
        + "".join(f'<th colspan="{k}">{esc(m)}</th>' for m in methods) + "</tr>",
        "<tr>" + "".join(f"<th>{short[f]}</th>" for _ in methods for f in BREAKDOWN_FIELDS) + "</tr>",
    ]
    for key, n, values in rows:
        cells = [f"<td>{esc(key)}</td>", f'<td class="num">{esc(n)}</td>']
        for v in values:
            if v is None:
                cells.append("<td></td>")
            else:
                shade = f"background: rgba(0, 114, 178, {0.05 + 0.45 * v:.3f})"
                cells.append(f'<td class="num" style="{shade}">{fmt(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_examples(metrics: Metrics) -> str:
    out = [
        "<table>",
        "<tr><th>id</th><th>label</th>" + "".join(f"<th>{esc(m)}</th>" for m in metrics.methods) + "</tr>",
    ]
    for diff_id, label, rows in examples(metrics):
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

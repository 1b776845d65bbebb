"""The neuron viewer: one self-contained HTML page per run (no script, no external file).

At the top, what was recorded (model, corpus, layers) and, per explainer and simulator, the mean
scores per layer beside the random-explanation baseline. Then, per layer, its neurons, the
best-explained first (or, before anything is scored, the strongest by max activation): each with
its explanations and scores, and its top records with every token shaded by its activation (the
shade is ``relu(x) / max``; hovering shows the value), then a few random records.

A run made by ``dit neurons diff`` also lists the neurons the finetune moved most (their mean
shift), and shows them first in their layers.

Every element a reader (or a test) needs carries a data attribute: ``section.neuron`` has
``data-layer``, ``data-neuron``, ``data-max``; ``span.tok`` has ``data-act``; score cells have
``data-score``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..charts import esc
from ..files import write_text
from .diff import read_moved
from .record import NeuronRecords, Record
from .run import EXPLANATIONS, SCORES, SUMMARY, read_rows

VIEWER = "viewer.html"
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 24px auto; padding: 0 16px; color: #222; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; } h3 { margin: 0.2em 0; font-size: 1.05em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; } th { background: #f3f3f3; } td.num { text-align: right; }
section.neuron { border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.expl { margin: 2px 0; } .expl b { color: #444; } .note { color: #666; font-size: 0.9em; }
.rec { font-family: ui-monospace, monospace; font-size: 0.85em; line-height: 1.9; margin: 3px 0;
       white-space: pre-wrap; word-break: break-word; }
span.tok { border-radius: 2px; } .kind { color: #888; font-size: 0.8em; margin-right: 6px; }
"""


def write_viewer(run: str | Path, *, per_layer: int = 20, n_top: int = 5, n_random: int = 2) -> Path:
    """Write ``run/viewer.html`` and return its path."""
    run = Path(run)
    rec = NeuronRecords.load(run)
    path = run / VIEWER
    write_text(path, render(rec, per_layer=per_layer, n_top=n_top, n_random=n_random))
    return path


def render(rec: NeuronRecords, *, per_layer: int = 20, n_top: int = 5, n_random: int = 2) -> str:
    run = rec.run
    expl: dict[tuple[int, int], dict[str, list[str]]] = {}
    for r in read_rows(run / EXPLANATIONS):
        expl.setdefault((r["layer"], r["neuron"]), {})[r["explainer"]] = r["explanations"]
    scored: dict[tuple[int, int], list[dict]] = {}
    for r in read_rows(run / SCORES):
        scored.setdefault((r["layer"], r["neuron"]), []).append(r)
    summary = json.loads((run / SUMMARY).read_text()) if (run / SUMMARY).is_file() else {}
    d = rec.describe()
    title = f"Neurons of {d['model']}"
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="note">{d["windows_done"]} of {d["windows"]} windows of {d["context"]} tokens from '
            f'{esc(rec.corpus.info.get("source", "?"))}; layers {esc(_layers(rec.layers))}, '
            f'{rec.neurons_per_layer} neurons each; top {d["top_k"]} and {d["sample_k"]} random records per neuron.</p>']
    if summary:
        body += ["<h2>Scores</h2>", _summary_table(summary)]
    moved = read_moved(run)
    if moved:
        body += ["<h2>Neurons the finetune moved</h2>", _moved_table(moved, rec)]
    for layer in rec.layers:
        first = [m["neuron"] for m in moved if m["layer"] == layer]
        chosen = first + [n for n in _chosen(rec, layer, scored, per_layer) if n not in first]
        body.append(f'<h2 id="layer-{layer}">Layer {layer}</h2>')
        if not chosen:
            body.append('<p class="note">no neuron of this layer fired on the corpus.</p>')
        for n in chosen:
            body.append(_neuron(rec, layer, n, expl.get((layer, n), {}), scored.get((layer, n), []), n_top, n_random))
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def _layers(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


def _chosen(rec: NeuronRecords, layer: int, scored: dict, per_layer: int) -> list[int]:
    """The layer's scored neurons, best first (their best score over explainers that are not a
    random baseline); before any score, the neurons with the highest max activation."""
    best = {n: max((r["correlation"] for r in rows if not r["explainer"].endswith("-random")), default=None)
            for (lay, n), rows in scored.items() if lay == layer}
    best = {n: v for n, v in best.items() if v is not None}
    if best:
        return sorted(best, key=lambda n: (-best[n], n))[:per_layer]
    mx = rec.stats(layer)["max"]
    order = sorted(range(len(mx)), key=lambda n: (-float(mx[n]), n))
    return [n for n in order if mx[n] > 0][:per_layer]


def _moved_table(moved: list[dict], rec: NeuronRecords) -> str:
    rows = "".join(f'<tr class="moved" data-layer="{m["layer"]}" data-neuron="{m["neuron"]}">'
                   f'<td><a href="#n-{m["layer"]}-{m["neuron"]}">{m["layer"]}/{m["neuron"]}</a></td>'
                   f'{_num(m["abs_shift"])}{_num(m.get("shift", 0.0))}{_num(m.get("base_abs", 0.0))}</tr>\n'
                   for m in moved)
    return ("<table><tr><th>neuron</th><th>mean |shift|</th><th>mean shift</th><th>base mean |a|</th></tr>\n"
            f"{rows}</table><p class=\"note\">shift: activation with the diff minus without, per position of the "
            f"corpus, averaged; the records and explanations below are of the finetuned model "
            f"({esc(str((rec.meta.get('diff') or {}).get('id', '')))}).</p>")


def _summary_table(summary: dict) -> str:
    layers = sorted({int(k) for g in summary.values() for k in g["layers"]})
    head = "".join(f"<th>layer {k}</th>" for k in layers)
    rows = []
    for name, g in summary.items():
        cells = "".join(_num(g["layers"][str(k)]["correlation"]) if str(k) in g["layers"] else "<td></td>"
                        for k in layers)
        rows.append(f"<tr><td>{esc(name)}</td><td class=\"num\">{g['neurons']}</td>{_num(g['correlation'])}"
                    f"{_num(g['r2'])}{_num(g['abs_dev_explained'])}{cells}</tr>")
    return ("<table><tr><th>explainer / simulator</th><th>neurons</th><th>correlation</th><th>R²</th>"
            f"<th>abs. dev. explained</th>{head}</tr>\n" + "\n".join(rows) + "</table>"
            '<p class="note">correlation: Pearson, simulated vs real activations pooled over held-out top and '
            "random records; per layer: mean correlation. A <i>-random</i> row scores each neuron with another "
            "neuron's explanations: the baseline.</p>")


def _num(v: float) -> str:
    return f'<td class="num" data-score="{v:.6f}">{v:.3f}</td>'


def _neuron(rec: NeuronRecords, layer: int, n: int, expl: dict[str, list[str]], scored: list[dict], n_top: int,
            n_random: int) -> str:
    mx = rec.max_activation(layer, n)
    out = [f'<section class="neuron" id="n-{layer}-{n}" data-layer="{layer}" data-neuron="{n}" data-max="{mx:.6g}">',
           f"<h3>Neuron {layer}/{n} <span class=\"note\">max activation {mx:.3g}</span></h3>"]
    by_explainer = {r["explainer"]: r for r in scored}
    for name, texts in sorted(expl.items()):
        s = by_explainer.get(name)
        shown = s["best_explanation"] if s else texts[0]
        score = (f' <span class="note" data-score="{s["correlation"]:.6f}">correlation {s["correlation"]:.3f} '
                 f'(best of {len(texts)}: {s["best_correlation"]:.3f}; {esc(s["simulator"])} simulator)</span>'
                 if s else "")
        out.append(f'<p class="expl" data-explainer="{esc(name)}"><b>{esc(name)}:</b> {esc(shown)}{score}</p>')
    for r in rec.top(layer, n)[:n_top]:
        out.append(_record(r, mx, "top"))
    for r in rec.sample(layer, n)[:n_random]:
        out.append(_record(r, mx, "random"))
    out.append("</section>")
    return "\n".join(out)


def _record(r: Record, mx: float, kind: str) -> str:
    spans = []
    for tok, a in zip(r.tokens, r.acts.tolist()):
        shade = max(0.0, a) / mx if mx > 0 else 0.0
        spans.append(f'<span class="tok" data-act="{a:.4g}" title="{a:.3g}" '
                     f'style="background: rgba(255, 120, 0, {min(1.0, shade):.3f})">{esc(tok)}</span>')
    return f'<div class="rec" data-kind="{kind}" data-window="{r.window}"><span class="kind">{kind}</span>{"".join(spans)}</div>'

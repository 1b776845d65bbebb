"""The LatentQA report: what :func:`dit_engine.latentqa.read.evaluate` measured, as files a person
reads (``report.md``, a self-contained ``report.html`` with the charts inline, ``charts/*.svg``)
and a machine reads (``metrics.json``: the evaluation's JSON, the decoder's recipe and losses, and
where and when it was measured).

Charts: retrieval@1 and MRR of the held-out personas under each condition (the trained decoder
and its controls), with their 95% bootstrap intervals as error bars and chance as a dashed line;
the decoder's train and held-out loss per epoch (from the adapter's recipe), when it has them.
Every file is written to a temporary name and renamed (:func:`dit_engine.files.write_text`), so
an interrupted run never leaves half a report over an old one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..charts import PALETTE, bar_chart, esc, line_chart, nice_axis
from ..files import write_text
from ..report_html import CSS, html_table
from .dialogs import LatentQAError

CONDITION_DESCRIPTIONS = {
    "decoder": "the trained decoder (base + LIT adapter) reading the target's activations over the dialog",
    "zero": "the trained decoder given zero vectors in place of the activations",
    "shuffled": "the trained decoder given the activations of another persona's dialog of the same message",
    "untrained": "the base model without the LIT adapter, given the true activations",
}
_CHART_METRICS = (("retrieval@1", "retrieval_at_1"), ("mrr", "mrr"))


def write_latentqa_report(result: Mapping[str, Any], out_dir: str | Path, *, recipe: Mapping[str, Any] | None = None,
                          title: str = "LatentQA: reading held-out personas",
                          provenance: Mapping[str, Any] | None = None) -> Path:
    """Write the report of ``result`` (from :func:`~dit_engine.latentqa.read.evaluate`) into
    ``out_dir`` and return the HTML file's path. ``recipe``: the LIT adapter's recipe (its
    training settings and per-epoch losses); ``provenance``: machine, commit and date."""
    conditions = result.get("conditions") or {}
    if "decoder" not in conditions:
        raise LatentQAError("write_latentqa_report: the result has no 'decoder' condition")
    recipe = dict(recipe or {})
    epochs = [e for e in recipe.get("epochs", []) if isinstance(e, Mapping)]
    out = Path(out_dir)
    (out / "charts").mkdir(parents=True, exist_ok=True)
    charts = _charts(result, epochs)
    for name, svg in charts.items():
        write_text(out / "charts" / f"{name}.svg", svg)
    payload = {"title": title, **result, "recipe": recipe, "provenance": dict(provenance or {})}
    write_text(out / "metrics.json", json.dumps(payload, indent=1) + "\n")
    made = _made(provenance)
    write_text(out / "report.md", _markdown(result, recipe, epochs, title, made, list(charts)))
    path = out / "report.html"
    write_text(path, _html(result, recipe, epochs, title, made, charts))
    return path


# ---- pieces shared by both formats -------------------------------------------------------------------
def _charts(result: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    conds = result["conditions"]
    colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(conds)}
    charts = {}
    for metric, name in _CHART_METRICS:
        values = {c: float(m[metric]) for c, m in conds.items()}
        ci = {c: tuple(m[f"{metric}_ci"]) for c, m in conds.items() if f"{metric}_ci" in m}
        charts[f"conditions_{name}"] = bar_chart(f"{metric}, held-out personas", values, colours,
                                                 float(result["chance"][metric]), ci)
    series = [(key, PALETTE[i], [e.get(f"{key}_loss") for e in epochs]) for i, key in enumerate(("train", "held_out"))]
    if epochs and any(v is not None for _, _, ys in series for v in ys):
        top = max(v for _, _, ys in series for v in ys if v is not None)
        y_range, ticks = nice_axis(top)
        charts["decoder_loss"] = line_chart(
            "decoder loss per epoch", [float(e["epoch"]) for e in epochs], [str(int(e["epoch"]) + 1) for e in epochs],
            [(f"{k.replace('_', '-')} loss", c, ys) for k, c, ys in series], "epoch", "categorical", y_range, ticks,
            "cross-entropy per answer token")
    return charts


def _metric_rows(result: Mapping[str, Any], key: str = "conditions") -> tuple[list[str], list[list[str]]]:
    metrics = ("retrieval@1", "retrieval@5", "mrr")
    rows = []
    for c, m in result[key].items():
        rows.append([c, *(f"{m[k]:.3f} [{m[k + '_ci'][0]:.2f}, {m[k + '_ci'][1]:.2f}]" for k in metrics)])
    rows.append(["chance", *(f"{result['chance'][k]:.3f}" for k in metrics)])
    return ["condition", *metrics], rows


def _margin_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for c, m in result.get("decoder_minus", {}).items():
        rows.append([f"decoder - {c}", *(f"{m[k]:+.3f} [{m[k + '_ci'][0]:+.2f}, {m[k + '_ci'][1]:+.2f}]"
                                          for k in ("retrieval@1", "mrr"))])
    return ["paired difference", "retrieval@1", "mrr"], rows


def _recipe_rows(recipe: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    cfg = recipe.get("config", {})
    keys = ("rank", "alpha", "lr", "epochs", "batch_size", "stimuli_per_persona", "test_stimuli", "max_answer_tokens",
            "patch_mode")
    rows = [["read at", str(recipe.get("read_at", cfg.get("read_point", "")))],
            ["written at", str(recipe.get("write_at", cfg.get("write_point", "")))]]
    rows += [[k, str(cfg[k])] for k in keys if k in cfg]
    for split, n in (recipe.get("examples") or {}).items():
        rows.append([f"{split} examples", str(n)])
    return ["setting", "value"], rows


def _epoch_rows(epochs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    def f(v):
        return "" if v is None else f"{float(v):.4f}"

    return ["epoch", "train loss", "held-out loss"], [[str(int(e["epoch"]) + 1), f(e.get("train_loss")),
                                                        f(e.get("held_out_loss"))] for e in epochs]


def _answer_rows(result: Mapping[str, Any], limit: int = 24) -> tuple[list[str], list[list[str]]]:
    rows = [[a["label"], a["stimulus"], a["answer"], "yes" if a["names_persona"] else "no"]
            for a in result.get("answers", [])[:limit]]
    return ["persona", "message", "decoder's answer", "names it"], rows


def _summary(result: Mapping[str, Any]) -> str:
    d, ch = result["conditions"]["decoder"], result["chance"]
    lo, hi = d["retrieval@1_ci"]
    s = (f"On {result['n_dialogs']} held-out dialogs of {result['n_personas']} personas, the decoder ranks the true "
         f"persona first {d['retrieval@1']:.1%} of the time [{lo:.1%}, {hi:.1%}] (chance {ch['retrieval@1']:.1%})")
    margins = [f"{c} {m['retrieval@1']:+.3f}" for c, m in result.get("decoder_minus", {}).items()]
    return s + (f"; its margin over the controls: {', '.join(margins)}." if margins else ".")


def _made(provenance: Mapping[str, Any] | None) -> str:
    if not provenance:
        return ""
    commit = str(provenance.get("commit", "unknown"))[:12] + (" with uncommitted changes" if provenance.get("dirty")
                                                              else "")
    return f"Measured on {provenance.get('machine', 'an unnamed machine')}, commit {commit}, {provenance.get('date', '')}."


def _definitions(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        ("question", f"every held-out dialog is read with the question {result['question']!r}"),
        ("candidates", "each held-out persona's first QA answer (which names it); a candidate's score is the "
                       "decoder's log-likelihood of it and the end-of-turn token"),
        ("calibrated", "ranks come from each candidate's score minus its mean over the dialogs read in that "
                       "condition: what the decoder says whatever it reads drops out (the uncalibrated ranks are "
                       "in their own table)"),
        ("retrieval@k", "the true persona ranks among the first k candidates (ties count against it); averaged per "
                        "persona, then over personas"),
        ("mrr", "mean reciprocal rank of the true persona"),
        ("intervals", "95% percentile bootstrap over personas; differences are paired over the same personas"),
        ("names it", "the generated answer contains the persona's label (normalised whole-word match)"),
    ]


# ---- Markdown ----------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows), ""]


def _markdown(result, recipe, epochs, title, made, charts) -> str:
    out = [f"# {title}", "", *([made, ""] if made else []), _summary(result), "", "## Conditions", ""]
    out += [f"- **{c}**: {CONDITION_DESCRIPTIONS.get(c, c)}" for c in result["conditions"]]
    out += ["", "## Retrieval of held-out personas", "", *_md_table(*_metric_rows(result))]
    out += [f"![{c}](charts/{c}.svg)" for c in charts if c.startswith("conditions_")] + [""]
    if result.get("decoder_minus"):
        out += ["## The decoder against its controls", "", *_md_table(*_margin_rows(result))]
    if result.get("uncalibrated"):
        out += ["## Uncalibrated scores", "", "The same ranks from the raw log-likelihoods.", "",
                *_md_table(*_metric_rows(result, "uncalibrated"))]
    if recipe:
        out += ["## Decoder", "", *_md_table(*_recipe_rows(recipe))]
    if epochs:
        out += ["## Decoder training", "", *(["![decoder_loss](charts/decoder_loss.svg)", ""]
                                             if "decoder_loss" in charts else []), *_md_table(*_epoch_rows(epochs))]
    n = len(result.get("answers", []))
    named = round(result.get("answers_name_persona", 0.0) * n)
    out += ["## The decoder's answers", "", f"Generated answers naming the persona: {named}/{n}.", "",
            *_md_table(*_answer_rows(result))]
    out += ["## Definitions", "", *(f"- **{k}**: {v}" for k, v in _definitions(result)), ""]
    return "\n".join(out)


# ---- HTML --------------------------------------------------------------------------------------------
def _html(result, recipe, epochs, title, made, charts) -> str:
    def charts_of(prefix: str) -> str:
        return '<div class="charts">' + "".join(s for n, s in charts.items() if n.startswith(prefix)) + "</div>"

    body = [f"<h1>{esc(title)}</h1>", *([f'<p class="note">{esc(made)}</p>'] if made else []),
            f'<p class="note">{esc(_summary(result))}</p>', "<h2>Conditions</h2>", "<ul>"]
    body += [f"<li><b>{esc(c)}</b>: {esc(CONDITION_DESCRIPTIONS.get(c, c))}</li>" for c in result["conditions"]]
    body += ["</ul>", "<h2>Retrieval of held-out personas</h2>", html_table(*_metric_rows(result)),
             charts_of("conditions_")]
    if result.get("decoder_minus"):
        body += ["<h2>The decoder against its controls</h2>", html_table(*_margin_rows(result))]
    if result.get("uncalibrated"):
        body += ["<h2>Uncalibrated scores</h2>", '<p class="note">The same ranks from the raw log-likelihoods.</p>',
                 html_table(*_metric_rows(result, "uncalibrated"))]
    if recipe:
        body += ["<h2>Decoder</h2>", html_table(*_recipe_rows(recipe))]
    if epochs:
        body += ["<h2>Decoder training</h2>", charts_of("decoder_loss"), html_table(*_epoch_rows(epochs))]
    n = len(result.get("answers", []))
    named = round(result.get("answers_name_persona", 0.0) * n)
    body += ["<h2>The decoder's answers</h2>", f'<p class="note">Generated answers naming the persona: {named}/{n}.</p>',
             html_table(*_answer_rows(result)), "<h2>Definitions</h2>", "<dl>"]
    body += [f"<dt><b>{esc(k)}</b></dt><dd>{esc(v)}</dd>" for k, v in _definitions(result)]
    body.append("</dl>")
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")

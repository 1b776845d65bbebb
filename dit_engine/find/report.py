"""The FIND report: scored runs side by side, per category, with charts and a few transcripts.

Writes ``report.md``, ``report.html`` (self-contained, the charts inline) and one SVG chart per
run (accuracy per category) next to them, and ``report.json`` with every run's summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..charts import bar_chart, esc
from ..files import read_json, write_json, write_text
from ..report_html import html_table
from .run import SCORES, SUMMARY, load_answers
from .neurons import NEURON_CORRECT
from .score import NMSE_CORRECT
from .suite import load_suite

_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")
TRANSCRIPTS = {"numeric": 2, "string": 1, "diff": 1, "neuron": 1}  # how many functions of each kind the report shows


def write_report(suite_path: str | Path, runs: Sequence[str | Path], out: str | Path,
                 title: str = "FIND on dit-engine") -> Path:
    """Report of the scored ``runs`` (run directories) on one suite; returns report.html's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suite = {f.id: f for f in load_suite(suite_path)}
    loaded = [_load(Path(r)) for r in runs]
    names = _names(loaded)
    cats = sorted({c for run in loaded for c in run["summary"]["summary"]}, key=lambda c: (c != "overall", c))
    header = ["category", "n"] + [f"{n}: accuracy (mean calls)" for n in names]
    rows = []
    for c in cats:
        cells = [c, str(next((r["summary"]["summary"][c]["n"] for r in loaded if c in r["summary"]["summary"]), ""))]
        for r in loaded:
            s = r["summary"]["summary"].get(c)
            cells.append(f"{s['accuracy']:.3f} ({s['mean_calls']:.0f})" if s else "-")
        rows.append(cells)
    extra = _extra_table(loaded, names)
    charts = {}
    for n, r in zip(names, loaded):
        accs = {c: v["accuracy"] for c, v in r["summary"]["summary"].items() if "/" in c}
        colours = {c: _COLOURS[i % len(_COLOURS)] for i, c in enumerate(accs)}
        charts[n] = bar_chart(f"{n}: accuracy by category", accs, colours, None)
        write_text(out / f"accuracy_{_slug(n)}.svg", charts[n])
    transcripts = [(n, _transcripts(r, suite)) for n, r in zip(names, loaded)]
    write_text(out / "report.md", _markdown(title, header, rows, extra, names, transcripts))
    write_text(out / "report.html", _html(title, header, rows, extra, charts, transcripts))
    write_json(out / "report.json", {n: r["summary"] for n, r in zip(names, loaded)})
    return out / "report.html"


_INTRO = ("Numeric functions count as correct when the agent's code, run in the sandbox on x in [-128, 128) + 0.5, "
          f"has normalised MSE < {NMSE_CORRECT} against the function (noise-free); string functions when the code "
          "matches every held-out test input exactly; a model-backed diff (model/diff) when the description "
          "retrieves the diff's label first among the task's labels; a model-backed neuron (model/neuron) when the "
          "description's quoted tokens, simulated on the neuron's held-out records, correlate with its real "
          f"activations at least {NEURON_CORRECT:g} times as well as the ground truth's (the token explanation of its "
          "top records) do. Calls: inputs the agent evaluated on the black box.")


def _load(run: Path) -> dict:
    summary = read_json(run / SUMMARY, f"a scored FIND run (run 'dit find score' on {run} first)", kind=dict)
    scores = [json.loads(line) for line in (run / SCORES).read_text(encoding="utf-8").splitlines() if line]
    return {"dir": run, "summary": summary, "scores": {s["id"]: s for s in scores}, "answers": load_answers(run)}


def _names(loaded: list[dict]) -> list[str]:
    names, seen = [], {}
    for r in loaded:
        base = r["summary"]["agent"]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _extra_table(loaded: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["agent", "run", "settings", "numeric median nMSE", "string mean match", "corrupted domain IoU",
              "neuron mean correlation", "code errors"]
    rows = []
    for n, r in zip(names, loaded):
        s = r["summary"]["summary"]
        med = s.get("numeric", {}).get("median_nmse")
        match = s.get("string", {}).get("mean_match")
        iou = s.get("numeric/corrupted", {}).get("mean_domain_iou")
        corr = s.get("neuron", {}).get("mean_correlation")
        rows.append([n, str(r["dir"]), json.dumps(r["summary"]["settings"]), "inf" if med is None and "numeric" in s
                     else _fmt(med), _fmt(match), _fmt(iou), _fmt(corr), str(s["overall"]["code_errors"])])
    return header, rows


def _transcripts(run: dict, suite: dict) -> list[dict]:
    """The first functions of each kind: the truth, the agent's answer and its transcript."""
    picks, shown = [], {k: 0 for k in TRANSCRIPTS}
    for fid, a in run["answers"].items():
        f = suite.get(fid)
        if f is None or shown[f.kind] >= TRANSCRIPTS[f.kind]:
            continue
        shown[f.kind] += 1
        s = run["scores"].get(fid, {})
        picks.append({"id": fid, "category": f.category, "truth": f.description, "answer": a.description,
                      "domain": a.domain, "correct": s.get("correct"), "calls": a.calls, "code": a.code,
                      "transcript": a.transcript})
    return picks


def _markdown(title, header, rows, extra, names, transcripts) -> str:
    lines = [f"# {title}", "", _INTRO, "", _md_table(header, rows), "", _md_table(*extra), ""]
    lines += [f"![{n}](accuracy_{_slug(n)}.svg)" for n in names]
    for n, picks in transcripts:
        lines += ["", f"## Transcripts: {n}"]
        for p in picks:
            lines += ["", f"### {p['id']} ({p['category']}): {'correct' if p['correct'] else 'wrong'}, "
                          f"{p['calls']} calls", "", f"- truth: {p['truth']}", f"- answer: {p['answer']}",
                      f"- domain: {p['domain']}", "", "```", _transcript_text(p["transcript"]), "```"]
    return "\n".join(lines) + "\n"


def _html(title, header, rows, extra, charts, transcripts) -> str:
    body = [f"<h1>{esc(title)}</h1>", f"<p class='note'>{esc(_INTRO)}</p>", "<h2>By category</h2>",
            html_table(header, rows), "<h2>Runs</h2>", html_table(*extra), "<h2>Charts</h2>",
            "<div class='charts'>" + "".join(charts.values()) + "</div>"]
    for n, picks in transcripts:
        body.append(f"<h2>Transcripts: {esc(n)}</h2>")
        for p in picks:
            body += [f"<h3>{esc(p['id'])} ({esc(p['category'])}): {'correct' if p['correct'] else 'wrong'}, "
                     f"{p['calls']} calls</h3>", f"<p>truth: {esc(p['truth'])}<br>answer: {esc(p['answer'])}<br>"
                     f"domain: {esc(p['domain'])}</p>", f"<pre>{esc(_transcript_text(p['transcript']))}</pre>"]
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px}"
           "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px}.charts{display:flex;"
           "flex-wrap:wrap;gap:8px}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}.note{color:#555}")
    return (f"<!DOCTYPE html>\n<html lang='en'>\n<head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{css}</style></head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _transcript_text(transcript: list) -> str:
    out = []
    for step in transcript:
        if isinstance(step, dict) and "role" in step:
            out.append(f"[{step['role']}] {step['content']}")
        else:
            out.append(json.dumps(step))
    return "\n".join(out)[:4000]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


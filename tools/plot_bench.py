#!/usr/bin/env python3
"""Draw the bench results (benches/results/<device>.json) as SVG charts a person can look at.

    python tools/plot_bench.py                      # every benches/results/*.json -> out/plots/
    python tools/plot_bench.py benches/results/NVIDIA_H200.json --out plots/

Per device file, from its ``"kernels"`` section (written by benches/bench_kernels.py):

- ``<device>.roofline.svg``: the roofline: achieved TFLOP/s against arithmetic intensity (FLOPs per
  byte of the case's minimal traffic), log-log, one mark per (case, implementation) that does
  FLOPs, under the device's measured roofline ``min(GEMM TFLOP/s, intensity * copy GB/s)``;
- ``<device>.fraction.svg``: every row's fraction of its roofline (roofline time / time), grouped
  by op and case, one bar per implementation, labelled with the achieved GB/s and TFLOP/s;
- ``<device>.ratios.svg``: how many times faster ``ours`` is than each other implementation of
  the same case (log scale, 1x marked);

and from its ``"decode"`` section (benches/bench_decode.py), if any, ``<device>.decode.svg``:
decode tokens/s by number of distinct adapters. Every chart names the device, the commit and the
date of the run. Hand-written SVG, no plotting library.

Exit status: 0 charts written, 1 nothing to draw or an unreadable file, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PROG = "plot_bench"
REPO = Path(__file__).resolve().parents[1]
PALETTE = {"ours": "#d62728", "dense_einsum": "#1f77b4", "gather_bmm": "#2ca02c", "peft_loop": "#9467bd",
           "base_gemm": "#7f7f7f", "torch": "#17becf", "hf": "#ff7f0e"}  # fmt: skip
EXTRA = ("#8c564b", "#e377c2", "#bcbd22", "#393b79")
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


class Unusable(Exception):
    """A results file this tool cannot draw (one line for the user)."""


# ---- SVG primitives --------------------------------------------------------------------------------
def _esc(s: object) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;").replace('"', "&quot;")


def _text(x: float, y: float, s: object, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' {FONT} {extra}>{_esc(s)}</text>"


def _svg(width: float, height: float, title: str, subtitle: str, body: list[str]) -> str:
    head = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}'>",
        f"<title>{_esc(title)}</title>",
        f"<rect x='0' y='0' width='{width:.0f}' height='{height:.0f}' fill='white'/>",
        _text(16, 24, title, 15, extra="font-weight='bold'"),
        _text(16, 42, subtitle, 11, extra="fill='#555'"),
    ]
    return "\n".join(head + body + ["</svg>"]) + "\n"


def _colours(impls: list[str]) -> dict[str, str]:
    out, spare = {}, iter(EXTRA * 4)
    for i in impls:
        out[i] = PALETTE.get(i) or next(spare)
    return out


def _legend(x: float, y: float, colours: dict[str, str]) -> list[str]:
    parts = []
    for i, (name, c) in enumerate(colours.items()):
        parts.append(f"<rect x='{x:.1f}' y='{y + 16 * i:.1f}' width='11' height='11' fill='{c}'/>")
        parts.append(_text(x + 16, y + 16 * i + 10, name, 11))
    return parts


def _log_ticks(lo: float, hi: float) -> list[float]:
    return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def _fmt_num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


# ---- the charts --------------------------------------------------------------------------------------
def _subtitle(sec: dict) -> str:
    commit = str(sec.get("commit", "unknown"))[:12] + ("+dirty" if sec.get("dirty") else "")
    return (f"{sec.get('device', '?')}  |  commit {commit}  |  {sec.get('date', '?')}  |  torch {sec.get('torch', '?')}"
            + (f", triton {sec['triton']}" if sec.get("triton") else ""))


def roofline_svg(sec: dict) -> str:
    """Achieved TFLOP/s vs arithmetic intensity, log-log, under the measured roofline."""
    bw, peak = float(sec["copy_gb_per_s"]) * 1e9, float(sec["gemm_tflop_per_s"]) * 1e12
    rows = [r for r in sec["rows"] if r.get("flops") and r.get("bytes") and r.get("time_us")]
    if not rows:
        raise Unusable("no kernel rows with FLOPs to place on a roofline")
    pts = [(r["flops"] / r["bytes"], r["flops"] / (r["time_us"] * 1e-6), r) for r in rows]
    ridge = peak / bw
    x_lo, x_hi = min(min(p[0] for p in pts), ridge) / 2, max(max(p[0] for p in pts), ridge) * 2
    y_lo, y_hi = min(min(p[1] for p in pts), x_lo * bw) / 2, peak * 2
    W, H, L, R, T, B = 900, 600, 80, 200, 60, 60
    pw, ph = W - L - R, H - T - B

    def X(v: float) -> float:
        return L + pw * (math.log10(v) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))

    def Y(v: float) -> float:
        return T + ph * (1 - (math.log10(v) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo)))

    body = [f"<rect x='{L}' y='{T}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"]
    for t in _log_ticks(x_lo, x_hi):
        if x_lo <= t <= x_hi:
            body += [f"<line x1='{X(t):.1f}' y1='{T}' x2='{X(t):.1f}' y2='{T + ph}' stroke='#eee'/>",
                     _text(X(t), T + ph + 16, _fmt_num(t), 10, "middle")]
    for t in _log_ticks(y_lo, y_hi):
        if y_lo <= t <= y_hi:
            body += [f"<line x1='{L}' y1='{Y(t):.1f}' x2='{L + pw}' y2='{Y(t):.1f}' stroke='#eee'/>",
                     _text(L - 6, Y(t) + 4, _fmt_num(t / 1e12), 10, "end")]
    body += [_text(L + pw / 2, H - 18, "arithmetic intensity (FLOPs / byte of minimal traffic)", 12, "middle"),
             _text(20, T + ph / 2, "achieved TFLOP/s", 12, "middle", f"transform='rotate(-90 20 {T + ph / 2:.1f})'")]
    # the roofline: memory-bound slope up to the ridge, then flat at the GEMM peak
    xs = [x_lo, ridge, x_hi]
    line = " ".join(f"{X(x):.1f},{Y(min(peak, x * bw)):.1f}" for x in xs)
    body += [f"<polyline class='roof' points='{line}' fill='none' stroke='black' stroke-width='2'/>",
             _text(X(x_hi) - 6, Y(peak) + 16, f"GEMM {peak / 1e12:.0f} TFLOP/s", 10, "end"),
             _text(X(x_lo) + 6, Y(x_lo * bw) - 8, f"copy {bw / 1e9:,.0f} GB/s", 10,
                   extra=f"transform='rotate({-_slope_deg(X, Y, x_lo, bw):.1f} {X(x_lo) + 6:.1f} {Y(x_lo * bw) - 8:.1f})'")]
    colours = _colours(list(dict.fromkeys(r["impl"] for r in rows)))
    for x, y, r in pts:
        body.append(f"<circle class='mark' cx='{X(x):.1f}' cy='{Y(y):.1f}' r='4.5' fill='{colours[r['impl']]}' "
                    f"fill-opacity='0.85' stroke='white' stroke-width='0.8'><title>{_esc(r['case'])} / {_esc(r['impl'])}: "
                    f"{y / 1e12:.3g} TFLOP/s, {r['gb_per_s']:.3g} GB/s, "
                    f"{100 * r['roofline_fraction']:.1f}% of roofline</title></circle>")
    body += _legend(L + pw + 20, T + 10, colours)
    return _svg(W, H, "Kernel roofline: multi-LoRA cases (one mark per case and implementation)", _subtitle(sec), body)


def _slope_deg(X, Y, x0: float, bw: float) -> float:
    x1 = x0 * 10
    return math.degrees(math.atan2(Y(x0 * bw) - Y(x1 * bw), X(x1) - X(x0)))


def fraction_svg(sec: dict) -> str:
    """Every row's fraction of its roofline, grouped by case, one bar per implementation."""
    rows = [r for r in sec["rows"] if r.get("time_us")]
    if not rows:
        raise Unusable("no kernel rows")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    colours = _colours(list(dict.fromkeys(r["impl"] for r in rows)))
    by_case = {c: [r for r in rows if r["case"] == c] for c in cases}
    top = max(1.0, max(r["roofline_fraction"] for r in rows))
    BAR, GAP, L, R, T = 13, 10, 230, 330, 70
    pw = 560
    H = T + sum(len(v) * BAR + GAP for v in by_case.values()) + 40
    W = L + pw + R

    def X(f: float) -> float:
        return L + pw * f / top

    body = []
    for f in [0.25 * i for i in range(int(top / 0.25) + 1)]:
        style = "stroke='#333' stroke-dasharray='4 3'" if f == 1 else "stroke='#eee'"
        body += [f"<line x1='{X(f):.1f}' y1='{T - 6}' x2='{X(f):.1f}' y2='{H - 40}' {style}/>",
                 _text(X(f), T - 10, f"{100 * f:.0f}%", 10, "middle")]
    y = T
    for case, rs in by_case.items():
        body.append(_text(L - 8, y + BAR * len(rs) / 2 + 4, case, 11, "end"))
        for r in rs:
            f = r["roofline_fraction"]
            body.append(f"<rect class='bar' x='{L}' y='{y:.1f}' width='{max(0.5, X(f) - L):.1f}' height='{BAR - 2}' "
                        f"fill='{colours[r['impl']]}'><title>{_esc(case)} / {_esc(r['impl'])}: {100 * f:.1f}%</title></rect>")
            tf = f", {r['tflop_per_s']:.3g} TFLOP/s" if r.get("flops") else ""
            body.append(_text(X(f) + 4, y + BAR - 3, f"{r['impl']} {100 * f:.1f}%  ({r['gb_per_s']:,.0f} GB/s{tf}, "
                                                      f"{r['time_us']:,.1f} us)", 9, extra="fill='#333'"))
            y += BAR
        y += GAP
    body.append(_text(L, H - 16, f"fraction of roofline = max(bytes / {float(sec['copy_gb_per_s']):,.0f} GB/s, "
                                 f"FLOPs / {float(sec['gemm_tflop_per_s']):,.0f} TFLOP/s) / time", 11))
    body += _legend(W - 130, T, colours)
    return _svg(W, H, "Fraction of the device roofline, every case and implementation", _subtitle(sec), body)


def ratios_svg(sec: dict) -> str:
    """How many times faster ``ours`` is than each other implementation of the same case."""
    ours = {r["case"]: r["time_us"] for r in sec["rows"] if r["impl"] == "ours" and r.get("time_us")}
    rows = [(r["case"], r["impl"], r["time_us"] / ours[r["case"]]) for r in sec["rows"]
            if r["impl"] != "ours" and r["case"] in ours and r.get("time_us")]
    if not rows:
        raise Unusable("no case has both 'ours' and another implementation")
    colours = _colours(list(dict.fromkeys(i for _, i, _ in rows)))
    lo, hi = min(min(v for *_, v in rows), 0.5), max(max(v for *_, v in rows), 2.0)
    lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
    BAR, GAP, L, R, T = 13, 10, 230, 150, 70
    pw = 620
    cases = list(dict.fromkeys(c for c, _, _ in rows))
    H = T + sum(sum(1 for c2, _, _ in rows if c2 == c) * BAR + GAP for c in cases) + 40
    W = L + pw + R

    def X(v: float) -> float:
        return L + pw * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    body = []
    for t in _log_ticks(lo, hi):
        body += [f"<line x1='{X(t):.1f}' y1='{T - 6}' x2='{X(t):.1f}' y2='{H - 40}' stroke='{'#333' if t == 1 else '#eee'}'/>",
                 _text(X(t), T - 10, f"{_fmt_num(t)}x", 10, "middle")]
    y = T
    for case in cases:
        rs = [(i, v) for c, i, v in rows if c == case]
        body.append(_text(L - 8, y + BAR * len(rs) / 2 + 4, case, 11, "end"))
        for impl, v in rs:
            x0, x1 = sorted((X(1.0), X(v)))
            body.append(f"<rect class='bar' x='{x0:.1f}' y='{y:.1f}' width='{max(0.5, x1 - x0):.1f}' height='{BAR - 2}' "
                        f"fill='{colours[impl]}'><title>{_esc(case)}: ours is {v:.2f}x as fast as {_esc(impl)}</title></rect>")
            body.append(_text(x1 + 4, y + BAR - 3, f"{v:.2f}x", 9, extra="fill='#333'"))
            y += BAR
        y += GAP
    body.append(_text(L, H - 16, "time of the implementation / time of ours (right of 1x: ours is faster)", 11))
    body += _legend(W - 130, T, colours)
    return _svg(W, H, "How many times faster ours is, per case", _subtitle(sec), body)


def decode_svg(sec: dict) -> str:
    """Decode tokens/s by number of distinct adapters (benches/bench_decode.py)."""
    rows = [r for r in sec.get("rows", []) if r.get("tokens_per_s")]
    if not rows:
        raise Unusable("no decode rows")
    W, H, L, T, B = 620, 380, 90, 70, 60
    pw, ph = W - L - 40, H - T - B
    top = max(r["tokens_per_s"] for r in rows) * 1.15
    slot = pw / len(rows)
    body = [f"<line x1='{L}' y1='{T + ph}' x2='{L + pw}' y2='{T + ph}' stroke='#333'/>"]
    for i in range(5):
        v = top * i / 4
        yy = T + ph - ph * v / top
        body += [f"<line x1='{L}' y1='{yy:.1f}' x2='{L + pw}' y2='{yy:.1f}' stroke='#eee'/>", _text(L - 6, yy + 4, f"{v:,.0f}", 10, "end")]
    for i, r in enumerate(rows):
        h = ph * r["tokens_per_s"] / top
        x = L + slot * i + slot * 0.2
        body.append(f"<rect class='bar' x='{x:.1f}' y='{T + ph - h:.1f}' width='{slot * 0.6:.1f}' height='{h:.1f}' "
                    f"fill='{'#7f7f7f' if r['n_adapters'] == 0 else '#d62728'}'><title>{r['n_adapters']} adapters: "
                    f"{r['tokens_per_s']:,.0f} tokens/s</title></rect>")
        over = f" ({r['over_base']:.2f}x base time)" if r.get("over_base") else ""
        body += [_text(x + slot * 0.3, T + ph - h - 6, f"{r['tokens_per_s']:,.0f}{over}", 10, "middle"),
                 _text(x + slot * 0.3, T + ph + 16, f"{r['n_adapters']} adapters", 11, "middle")]
    r0 = rows[0]
    body += [_text(20, T + ph / 2, "decode tokens/s", 12, "middle", f"transform='rotate(-90 20 {T + ph / 2:.1f})'"),
             _text(L, H - 16, f"batch {r0.get('batch')}, {r0.get('steps')} steps after a {r0.get('prefill')}-token prompt; "
                              f"{sec.get('model', '')}", 10)]
    return _svg(W, H, "Decode throughput by distinct adapters in the batch", _subtitle(sec), body)


CHARTS = (("kernels", "roofline", roofline_svg), ("kernels", "fraction", fraction_svg),
          ("kernels", "ratios", ratios_svg), ("decode", "decode", decode_svg))  # fmt: skip


def draw(path: Path, out_dir: Path) -> list[Path]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unusable(f"{path}: not a readable results file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise Unusable(f"{path}: expected a JSON object with bench sections")
    written = []
    for key, name, fn in CHARTS:
        sec = doc.get(key)
        if not isinstance(sec, dict):
            continue
        try:
            svg = fn(sec)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise Unusable(f"{path}: section {key!r} lacks what the {name} chart needs ({type(e).__name__}: {e})") from None
        except Unusable as e:
            print(f"{PROG}: {path.name}: {name} chart skipped: {e}", file=sys.stderr)
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{path.stem}.{name}.svg"
        target.write_text(svg)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/plot_bench.py",
        description="Draw benches/results/<device>.json as SVG charts: roofline, fraction of roofline, "
        "speed-up ratios (from the kernels section) and decode tokens/s (from the decode section).",
        epilog="Exit status: 0 charts written, 1 nothing to draw or an unreadable file, 2 usage error.",
    )
    p.add_argument("results", nargs="*", type=Path, help="results JSON files (default: benches/results/*.json)")
    p.add_argument("--out", type=Path, default=Path("out/plots"), help="directory for the SVGs (default out/plots)")
    args = p.parse_args(argv)
    paths = args.results or sorted((REPO / "benches" / "results").glob("*.json"))
    if not paths:
        print(f"{PROG}: no results files in {REPO / 'benches' / 'results'} (they come from bench runs on a GPU)", file=sys.stderr)
        return 1
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        print(f"{PROG}: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    written = []
    try:
        for q in paths:
            written += draw(q, args.out)
    except Unusable as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if not written:
        print(f"{PROG}: nothing to draw: no 'kernels' or 'decode' section in {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

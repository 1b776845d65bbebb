"""Small self-contained SVG charts (no plotting library): bars with a chance line, and lines.

Used by the evaluation report and by people's tools. Bar charts, and line charts by default, span
[0, 1] on the y axis (metrics and fractions), so bars of different charts compare at a glance; a
line chart of something else (a loss) takes its own ``y_range`` (see :func:`nice_axis`). Marks
carry ``class`` and ``data-*`` attributes (``bar``/``data-method``/``data-value``,
``point``/``data-series``, ``chance``, ``ci``/``data-lo``/``data-hi``) so tests and scripts can read
values back from the SVG.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999", "#000000")
_CHANCE_COLOUR = "#C0392B"
_CI_COLOUR = "#222"
_UNIT_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)

# Bar chart geometry (pixels); the plot area is what bar heights are proportional to.
_BAR_W, _BAR_H = 250, 220
_BAR_MARGIN = dict(left=34, right=10, top=30, bottom=46)
_BAR_PLOT_H = _BAR_H - _BAR_MARGIN["top"] - _BAR_MARGIN["bottom"]
# Line chart geometry: a legend column on the right.
_LINE_W, _LINE_H = 470, 250
_LINE_MARGIN = dict(left=40, right=140, top=30, bottom=44)


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">',
        f"<title>{esc(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{esc(title)}</text>',
    ]


def _svg_y_axis(
    left: float, right: float, top: float, plot_h: float,
    y_range: tuple[float, float] = (0.0, 1.0), ticks: Sequence[float] = _UNIT_TICKS,
) -> list[str]:
    lo, hi = y_range
    parts = []
    for tick in ticks:
        y = top + plot_h * (1 - (tick - lo) / (hi - lo))
        stroke = "#333" if tick == lo else "#ddd"
        parts.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" stroke="{stroke}"/>')
        parts.append(f'<text x="{left - 4:.1f}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{tick:g}</text>')
    return parts


def nice_axis(max_value: float, n_steps: int = 4) -> tuple[tuple[float, float], list[float]]:
    """A y range from 0 to ``max_value`` rounded up to a whole number of round steps (1, 2, 2.5 or
    5 times a power of ten, at most ``n_steps`` of them), and its ticks: 2.37 -> (0, 3) with ticks
    0, 1, 2, 3; 7.1 -> (0, 8) with ticks 0, 2, ..., 8; 0.83 -> (0, 1) in quarters. Not positive or
    not finite -> (0, 1)."""
    if not (math.isfinite(max_value) and max_value > 0):
        return (0.0, 1.0), list(_UNIT_TICKS)
    raw = max_value / n_steps
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    n = math.ceil(max_value / step - 1e-9)
    ticks = [round(i * step, 12) for i in range(n + 1)]
    return (0.0, ticks[-1]), ticks


def bar_chart(
    title: str, values: dict[str, float], colours: dict[str, str], chance: float | None,
    ci: dict[str, tuple[float, float]] | None = None,
) -> str:
    """One bar per method on [0, 1], the chance level as a dashed line, and (``ci``: method ->
    (low, high)) an error bar per method: a thin vertical line with caps."""
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
            f'<rect class="bar" data-method="{esc(method)}" data-value="{value:.6f}" x="{x:.2f}" '
            f'y="{baseline - height:.4f}" width="{bar_w:.2f}" height="{height:.4f}" fill="{colours[method]}">'
            f"<title>{esc(method)}: {value:.3f}</title></rect>"
        )
        label_top = height
        if ci and method in ci:
            lo, hi = ci[method]
            y_lo, y_hi = baseline - lo * _BAR_PLOT_H, baseline - hi * _BAR_PLOT_H
            cap = min(bar_w * 0.3, 6)
            parts.append(
                f'<line class="ci" data-method="{esc(method)}" data-lo="{lo:.6f}" data-hi="{hi:.6f}" '
                f'x1="{cx:.2f}" y1="{y_lo:.4f}" x2="{cx:.2f}" y2="{y_hi:.4f}" stroke="{_CI_COLOUR}" stroke-width="1">'
                f"<title>{esc(method)}: 95% CI [{lo:.2f}, {hi:.2f}]</title></line>"
            )
            for y in (y_lo, y_hi):
                parts.append(
                    f'<line class="ci-cap" x1="{cx - cap:.2f}" y1="{y:.4f}" x2="{cx + cap:.2f}" y2="{y:.4f}" '
                    f'stroke="{_CI_COLOUR}" stroke-width="1"/>'
                )
            label_top = max(height, hi * _BAR_PLOT_H)
        # The value label sits above the bar and its error bar, beside the upper cap when that is at the top.
        parts.append(f'<text x="{cx:.1f}" y="{baseline - label_top - 3:.1f}" text-anchor="middle">{value:.2f}</text>')
        for j, line in enumerate(_label_lines(method, slot)):
            parts.append(
                f'<text x="{cx:.1f}" y="{baseline + 14 + 12 * j:.1f}" text-anchor="middle">{esc(line)}</text>'
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


def line_chart(
    title: str,
    xs: list[float],
    x_labels: list[str],
    series: list[tuple[str, str, list[float | None]]],
    x_title: str,
    scale: str,
    y_range: tuple[float, float] = (0.0, 1.0),
    y_ticks: Sequence[float] | None = None,
    y_title: str | None = None,
) -> str:
    """Series (name, colour, y per x; None = no point) against ``xs`` (``scale``: categorical,
    linear or log). The y axis spans ``y_range`` with labelled ``y_ticks`` (default: [0, 1] in
    quarters, or five even ticks over another range); ``y_title`` is written along it."""
    lo, hi = y_range
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"line_chart: y_range must be finite with low < high, found {y_range}")
    if y_ticks is None:
        y_ticks = _UNIT_TICKS if (lo, hi) == (0.0, 1.0) else [lo + (hi - lo) * i / 4 for i in range(5)]
    m = _LINE_MARGIN
    top, left, right = m["top"], m["left"], _LINE_W - m["right"]
    plot_h = _LINE_H - top - m["bottom"]
    baseline = top + plot_h
    parts = _svg_open(_LINE_W, _LINE_H, title) + _svg_y_axis(left, right, top, plot_h, (lo, hi), y_ticks)
    if y_title:
        parts.append(
            f'<text transform="translate(11 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
            f'fill="#555">{esc(y_title)}</text>'
        )
    positions = _x_positions(xs, scale)
    px = [left + 12 + p * (right - left - 24) for p in positions]
    for x, label in zip(px, x_labels):
        parts.append(f'<line x1="{x:.1f}" y1="{baseline}" x2="{x:.1f}" y2="{baseline + 4}" stroke="#333"/>')
        parts.append(f'<text x="{x:.1f}" y="{baseline + 16}" text-anchor="middle">{esc(label)}</text>')
    parts.append(
        f'<text x="{(left + right) / 2:.1f}" y="{_LINE_H - 8}" text-anchor="middle" fill="#555">{esc(x_title)}</text>'
    )
    for i, (name, colour, ys) in enumerate(series):
        points = [(x, baseline - (y - lo) / (hi - lo) * plot_h, y) for x, y in zip(px, ys) if y is not None]
        if len(points) > 1:
            path = " ".join(f"{x:.2f},{y:.2f}" for x, y, _ in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y, value in points:
            parts.append(
                f'<circle class="point" data-series="{esc(name)}" data-value="{value:.6f}" cx="{x:.2f}" '
                f'cy="{y:.4f}" r="3.5" fill="{colour}"><title>{esc(name)}: {value:.3f}</title></circle>'
            )
        ly = top + 8 + 18 * i
        parts.append(
            f'<line x1="{right + 12}" y1="{ly}" x2="{right + 32}" y2="{ly}" stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{right + 37}" y="{ly + 4}">{esc(shorten(name, 100))}</text>')
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
            return [shorten(head, width_px), shorten((sep if keep_on_second else "") + tail, width_px)]
    return [shorten(name, width_px)]


def _chars_fitting(width_px: float) -> int:
    return max(4, int(width_px / 6))  # ~6 px per character at 11 px sans-serif


def shorten(name: str, width_px: float) -> str:
    """Truncate a label to what fits in about width_px."""
    limit = _chars_fitting(width_px)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)

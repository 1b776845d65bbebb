"""Agents without a language model: the search baseline, and two fixed answers that calibrate
the scores (the reference code, which must score 1.0; a constant zero, which scores what a
function's own flatness allows).

:class:`SearchAgent` sees each function only through its :class:`~.suite.BlackBox`. Numeric: it
probes x across [-128, 128] (one jittered sweep), fits every family of :mod:`.fitting` by least
squares over a grid of its nonlinear parameters, then pairs (sums and products of two families),
keeping the model with the smallest error on held-out probes; a run of exactly equal outputs
that the model cannot explain is taken as a corrupted interval, whose edges it then finds by
bisection with a few more calls. Strings: it calls the function on a fixed set of probe strings
and looks the answers up in a table of every composition of up to two primitives on the same
probes (built once per agent).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from . import fitting
from . import strings as S
from .score import Answer
from .suite import BlackBox, Function, hash_id

STRING_PROBES = ("hello world", "Apple", "banana123", "xyz", "Quick Brown Fox", "a", "racecar", "Mississippi",
                 "zebra lemon", "OCEAN", "tiger 42 smile", "abcdefghij")


def reference_answers(functions: Sequence[Function]) -> dict[str, Answer]:
    """The ground truth as if an agent had written it (an oracle: it reads the suite)."""
    return {f.id: Answer(id=f.id, description=f.description, domain=f.domain["text"], code=f.code, rounds=1)
            for f in functions}


def constant_answers(functions: Sequence[Function], value: float = 0.0) -> dict[str, Answer]:
    """Code that ignores its input: ``value`` for numeric functions, the empty string for strings."""
    out = {}
    for f in functions:
        code = f"def f(x):\n    return {float(value)!r}\n" if f.kind == "numeric" else "def f(s):\n    return ''\n"
        out[f.id] = Answer(id=f.id, description=f"the constant {value}", domain="all inputs", code=code, rounds=1)
    return out


class SearchAgent:
    """The non-LLM baseline (see the module docstring). ``budget``: black-box inputs per function."""

    name = "search"

    def __init__(self, *, n_probes: int = 200, n_refine: int = 8, seed: int = 0):
        if n_probes < 20:
            raise ValueError(f"n_probes must be >= 20 for the fit to hold out probes, got {n_probes}")
        self.n_probes, self.n_refine, self.seed = n_probes, n_refine, seed
        self._table: dict[tuple[str, ...], list] | None = None

    @property
    def budget(self) -> int:
        return self.n_probes + 2 * self.n_refine

    def run(self, boxes: Sequence[BlackBox], progress: Callable[[int], None] | None = None) -> list[Answer]:
        out = []
        for box in boxes:
            out.append(self._numeric(box) if box.kind == "numeric" else self._string(box))
            if progress is not None:
                progress(1)
        return out

    # ---- numeric --------------------------------------------------------------------------------
    def _numeric(self, box: BlackBox) -> Answer:
        rng = random.Random(f"{self.seed}-{hash_id(box.id)}")
        step = 256 / self.n_probes
        x = np.array([-128 + (i + rng.random()) * step for i in range(self.n_probes)])
        y = np.array(box(list(x)))
        ok = np.isfinite(y)
        x, y = x[ok], y[ok]
        model = fitting.best_model(x, y)
        corrupt = fitting.find_corruption(x, y, model)
        transcript = [{"probe": len(x), "model": model.describe()}]
        if corrupt is not None:
            lo, hi, value = corrupt
            lo, hi = self._edges(box, x, y, lo, hi, value)
            keep = (x < lo) | (x > hi)
            model = fitting.best_model(x[keep], y[keep])
            transcript.append({"corrupted": [lo, hi], "value": value, "refit": model.describe()})
            code = model.code(corrupt=(lo, hi, value))
            desc = f"{model.describe()}, except on [{lo:g}, {hi:g}] where it outputs {value!r}"
            domain = f"[{lo:g}, {hi:g}]"
        else:
            code, desc, domain = model.code(), model.describe(), "all real numbers"
        return Answer(id=box.id, description=desc, domain=domain, code=code, calls=box.calls, rounds=1,
                      transcript=transcript)

    def _edges(self, box: BlackBox, x, y, lo: float, hi: float, value: float) -> tuple[float, float]:
        """Bisect between the run's outermost probes and their outside neighbours."""
        xs = np.sort(x)
        below, above = xs[xs < lo], xs[xs > hi]
        edges = []
        for inside, outside in ((lo, below.max() if len(below) else -128.0), (hi, above.min() if len(above) else 128.0)):
            for _ in range(self.n_refine):
                mid = (inside + outside) / 2
                if box([mid])[0] == value:
                    inside = mid
                else:
                    outside = mid
            edges.append(round(inside))
        return float(edges[0]), float(edges[1])

    # ---- strings --------------------------------------------------------------------------------
    def _string(self, box: BlackBox) -> Answer:
        got = tuple(box(list(STRING_PROBES)))
        table = self._lookup_table()
        chain = table.get(got)
        if chain is None:
            # Nothing matches every probe: the composition matching the most of them.
            score = lambda key: sum(a == b for a, b in zip(key, got))  # noqa: E731
            chain = table[max(table, key=score)]
        return Answer(id=box.id, description=S.describe(chain), domain="all strings", code=S.reference_code(chain),
                      calls=box.calls, rounds=1, transcript=[{"probes": len(got), "chain": chain}])

    def _lookup_table(self) -> dict[tuple[str, ...], list]:
        """Probe answers -> the first composition (depth 1 before depth 2) that gives them."""
        if self._table is None:
            table: dict[tuple[str, ...], list] = {}
            first = {}
            for inst in S.INSTANCES:
                out = tuple(S.apply([inst], s) for s in STRING_PROBES)
                table.setdefault(out, [inst])
                first.setdefault(out, inst)
            for out1, inst1 in first.items():  # one first step per distinct intermediate answer
                for inst2 in S.INSTANCES:
                    out2 = tuple(S.PRIMITIVES[inst2[0]][0](s, *inst2[1]) for s in out1)
                    table.setdefault(out2, [inst1, inst2])
            self._table = table
        return self._table

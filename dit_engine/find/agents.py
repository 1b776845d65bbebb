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
probes (built once per agent). Neurons (model-backed, :mod:`.neurons`): it calls the neuron on
:data:`NEURON_TEXTS` seeded snippets of a probe corpus (the packaged prose by default), then on every
word prefix of the :data:`NEURON_TOP` snippets that excite it most: a causal model's activation at a
word does not depend on the words after it, so the first prefix that reaches a snippet's maximum ends
at the word that fires; then on the character prefixes of that word (its first piece may be the
token that fires). The pieces found most often, quoted, are its description.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from . import fitting
from . import strings as S
from .score import Answer
from .suite import BlackBox, Function, hash_id

NEURON_TEXTS = 128  # probe snippets per neuron
NEURON_TOP = 8  # snippets whose firing word is found by prefixes
NEURON_WORDS = 24  # words per snippet
NEURON_KEYS = 3  # words the description names at most
NEURON_CHARS = 8  # character prefixes of a firing word tried at most
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

    def __init__(self, *, n_probes: int = 200, n_refine: int = 8, seed: int = 0, probe_corpus: str = "packaged"):
        if n_probes < 20:
            raise ValueError(f"n_probes must be >= 20 for the fit to hold out probes, got {n_probes}")
        self.n_probes, self.n_refine, self.seed, self.probe_corpus = n_probes, n_refine, seed, probe_corpus
        self._table: dict[tuple[str, ...], list] | None = None
        self._snippets: list[str] | None = None

    @property
    def budget(self) -> int:
        return max(self.n_probes + 2 * self.n_refine, NEURON_TEXTS + NEURON_TOP * (NEURON_WORDS + NEURON_CHARS))

    def run(self, boxes: Sequence[BlackBox], progress: Callable[[int], None] | None = None) -> list[Answer]:
        out = []
        for box in boxes:
            kind = getattr(box, "kind", None)
            out.append(self._numeric(box) if kind == "numeric" else self._neuron(box) if kind == "neuron" else
                       self._string(box))
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

    # ---- neurons --------------------------------------------------------------------------------
    def _neuron(self, box) -> Answer:
        pool = self._probe_snippets()
        rng = random.Random(f"{self.seed}-{hash_id(box.id)}")
        texts = rng.sample(pool, min(NEURON_TEXTS, len(pool)))
        acts = box(texts)
        top = [i for i in sorted(range(len(texts)), key=lambda i: -acts[i])[:NEURON_TOP] if acts[i] > 0]
        words = [texts[i].split() for i in top]
        # 1. the word: the first word prefix of each snippet at the snippet's maximum
        firing = []
        for w, mine in zip(words, _probe_groups(box, [[" ".join(w[:k]) for k in range(1, len(w) + 1)]
                                                      for w in words])):
            k = _first_at_peak(mine)
            firing.append((" ".join(w[:k]), w[k], max(mine)))
        # 2. the token: the first character prefix of that word at the maximum (a word's first piece
        # may be what fires: "P" of "Pasta"); the whole word when none is
        heads = [[(before + " " if before else "") + word[:j] for j in range(1, min(len(word), NEURON_CHARS + 1))]
                 for before, word, _ in firing]
        found: Counter = Counter()
        for (before, word, peak), mine in zip(firing, _probe_groups(box, heads)):
            j = next((j for j, v in enumerate(mine, 1) if _at_peak(v, peak)), len(word))
            key = _word(word[:j])
            if key:
                found[key] += 1
        keys = [k for k, _ in found.most_common(NEURON_KEYS)]
        desc = ("the tokens " + ", ".join(json.dumps(k, ensure_ascii=False) for k in keys) + "." if keys else
                "nothing in particular (it never fired on the probes).")
        return Answer(id=box.id, description=desc, domain="any text", code="", calls=box.calls, rounds=1,
                      transcript=[{"probes": len(texts), "top": [[texts[i], acts[i]] for i in top],
                                   "firing": [[b, w] for b, w, _ in firing], "tokens": dict(found)}])

    def _probe_snippets(self) -> list[str]:
        """The probe corpus's documents, cut to :data:`NEURON_WORDS` words (read once per agent)."""
        if self._snippets is None:
            from ..neurons.corpus import documents

            snippets = [" ".join(d.split()[:NEURON_WORDS]) for d in documents(self.probe_corpus)]
            self._snippets = list(dict.fromkeys(s for s in snippets if s))
            if not self._snippets:
                raise ValueError(f"probe corpus {self.probe_corpus!r} holds no text")
        return self._snippets

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


def _word(w: str) -> str:
    """A probe word as a token's text: punctuation stripped from its ends (unless it is all punctuation)."""
    core = re.sub(r"^\W+|\W+$", "", w)
    return core or w


def _at_peak(v: float, peak: float) -> bool:
    """``v`` is the maximum ``peak`` (to 1%: batched rows of one text may differ in the last bits)."""
    return v >= peak - 1e-2 * abs(peak)


def _probe_groups(box, groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """``box`` on every text of ``groups`` in one call (none when they are all empty), its values
    cut back into the groups."""
    flat = [t for g in groups for t in g]
    values = box(flat) if flat else []
    out, at = [], 0
    for g in groups:
        out.append(values[at:at + len(g)])
        at += len(g)
    return out


def _first_at_peak(values: Sequence[float]) -> int:
    peak = max(values)
    return next(j for j, v in enumerate(values) if _at_peak(v, peak))

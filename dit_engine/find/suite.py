"""The FIND suite: seeded numeric and string functions, each with its ground-truth description,
domain and reference code, as one JSONL file; and :class:`BlackBox`, the only way an agent sees a
function (call it on inputs, count the calls).

Numeric functions (``spec["base"]`` a primitive, a sum or a product of two) come in six
categories: ``numeric/primitive``, ``numeric/sum``, ``numeric/product``, ``numeric/noise`` (the
black box adds uniform, normal or zero-mean poisson noise to every answer; scoring compares with
the clean function), ``numeric/corrupted`` (on an interval the function outputs a constant; the
domain is that interval) and ``numeric/mlp`` (the black box is a small ReLU MLP trained with
torch to approximate a primitive; its weights, not code, are stored). String functions are
compositions of one or two string primitives (``string/depth1``, ``string/depth2``), each with
held-out test inputs.

The reference code is the ground truth an agent's code is scored against, and it reproduces the
black box's clean output: for an MLP function, the MLP's fit is checked on the scoring grid
(normalised MSE < ``MLP_FIT``) when the suite is built, and the primitive redrawn when it fails.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..files import FileFormatError, write_atomically
from . import primitives as P
from . import strings as S

FORMAT = "dit-find-suite"
VERSION = 1
NUMERIC_SHARES = {"numeric/primitive": 0.40, "numeric/sum": 0.10, "numeric/product": 0.10, "numeric/noise": 0.15,
                  "numeric/corrupted": 0.10, "numeric/mlp": 0.15}
STRING_DEPTH1_SHARE = 0.15
N_TEST_INPUTS = 16
MLP_HIDDEN = 48
MLP_FIT = 0.02
NOISE_KINDS = ("uniform", "normal", "poisson")
MODEL_KINDS = ("diff", "neuron")  # model-backed: no reference code, their descriptions are scored; need a model


@dataclasses.dataclass
class Function:
    id: str
    kind: str  # "numeric" | "string" | model-backed: "diff" (a zoo's weight diff, model_backed.diff_functions)
    #            or "neuron" (an MLP neuron of a record run, neurons.neuron_functions)
    category: str
    description: str
    domain: dict  # {"text": ..., "interval": [lo, hi] or None}
    code: str  # reference code defining f
    spec: dict  # what the black box computes
    test_inputs: list = dataclasses.field(default_factory=list)  # strings: held-out inputs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def build_suite(seed: int = 0, n_numeric: int = 500, n_string: int = 500) -> list[Function]:
    """The suite from one seed: the same seed gives the same functions, byte for byte."""
    if n_numeric < 0 or n_string < 0:
        raise ValueError(f"function counts must be >= 0, got {n_numeric} numeric and {n_string} string")
    rng = random.Random(f"find-suite-{seed}")
    torch_gen = torch.Generator().manual_seed(seed)
    out = [_numeric(i, cat, rng, torch_gen) for i, cat in enumerate(_categories(n_numeric, rng))]
    out += _strings(n_string, rng)
    return out


def save_suite(path: str | Path, functions: list[Function], *, seed: int | None = None) -> None:
    header = {"format": FORMAT, "version": VERSION, "seed": seed, "n": len(functions),
              "n_numeric": sum(f.kind == "numeric" for f in functions),
              "n_string": sum(f.kind == "string" for f in functions),
              "n_diff": sum(f.kind == "diff" for f in functions),
              "n_neuron": sum(f.kind == "neuron" for f in functions)}
    lines = [json.dumps(header)] + [json.dumps(f.to_json(), allow_nan=False) for f in functions]
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))


def load_suite(path: str | Path) -> list[Function]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such suite file (write one with 'dit find generate')") from None
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FileFormatError(f"{path}: not a FIND suite (its first line should be a {FORMAT!r} header)")
    if header.get("version") != VERSION:
        raise FileFormatError(f"{path}: suite format version {header.get('version')}, this engine reads {VERSION}")
    fields = {f.name for f in dataclasses.fields(Function)}
    out = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            out.append(Function(**{k: row[k] for k in fields}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FileFormatError(f"{path}: line {n} is not a suite function ({type(e).__name__}: {e})") from None
    return out


class BudgetExceeded(RuntimeError):
    """An agent asked for more inputs than its call budget."""


class BlackBox:
    """A function as an agent sees it: ``box(inputs) -> outputs``, nothing else. Every input counts
    as one call; ``budget`` (None = unlimited) caps them. Noise is drawn from a generator seeded by
    the function's id, so a rerun answers the same."""

    def __init__(self, fn: Function, budget: int | None = None):
        self.id, self.kind = fn.id, fn.kind
        self._fn = fn
        self.budget = budget
        self.calls = 0
        self._rng = np.random.default_rng(abs(hash_id(fn.id)))

    def __call__(self, inputs: list) -> list:
        inputs = list(inputs)
        if self.budget is not None and self.calls + len(inputs) > self.budget:
            raise BudgetExceeded(f"{self.id}: {self.calls} calls made, {len(inputs)} more would exceed the budget "
                                 f"of {self.budget}")
        self.calls += len(inputs)
        if self.kind == "string":
            if not all(isinstance(s, str) for s in inputs):
                raise ValueError(f"{self.id}: a string function takes strings")
            return [S.apply(_chain(self._fn.spec), s) for s in inputs]
        try:
            x = np.array([float(v) for v in inputs], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{self.id}: a numeric function takes numbers") from None
        y = clean_output(self._fn, x)
        noise = self._fn.spec.get("noise")
        if noise:
            y = y + _noise(noise, len(x), self._rng)
        return [float(v) for v in y]


def clean_output(fn: Function, x) -> np.ndarray:
    """The black box's output without noise (what a numeric agent's code is scored against)."""
    if fn.kind != "numeric":
        raise ValueError(f"{fn.id}: clean_output is for numeric functions")
    spec = fn.spec
    x = np.asarray(x, dtype=np.float64)
    y = _mlp_forward(spec["mlp"], x) if spec.get("mlp") else _base(spec["base"], x)
    c = spec.get("corrupt")
    if c:
        y = np.where((x >= c["lo"]) & (x <= c["hi"]), c["value"], y)
    return y


def string_output(fn: Function, s: str) -> str:
    return S.apply(_chain(fn.spec), s)


def hash_id(text: str) -> int:
    """A stable hash (Python's own is salted per process)."""
    h = 1469598103934665603
    for c in text.encode():
        h = ((h ^ c) * 1099511628211) % (1 << 63)
    return h


# ---- numeric ------------------------------------------------------------------------------------
def _categories(n: int, rng: random.Random) -> list[str]:
    counts = {c: int(round(share * n)) for c, share in NUMERIC_SHARES.items()}
    counts["numeric/primitive"] += n - sum(counts.values())
    cats = [c for c, k in counts.items() for _ in range(max(k, 0))][:n]
    rng.shuffle(cats)
    return cats


def _numeric(i: int, cat: str, rng: random.Random, gen: torch.Generator) -> Function:
    family = P.FAMILIES[i % len(P.FAMILIES)]
    kind = cat.split("/")[1]
    if kind in ("sum", "product"):
        first = P.draw(family, rng)
        second = P.draw(rng.choice([f for f in P.FAMILIES if f not in (family, "constant")]), rng)
        base = {"op": kind, "parts": [first, second]}
    else:
        base = P.draw(family, rng)
    spec: dict = {"base": base, "noise": None, "corrupt": None, "mlp": None}
    expr = _expression(base)
    desc = _description(base)
    domain = {"text": "all real numbers", "interval": None}
    code_lines = ["import math", "", "", "def f(x):"]
    y = _base(base, P.grid())
    std = float(np.std(y))
    if kind == "noise":
        noise_kind = NOISE_KINDS[rng.randrange(3)]
        scale = round(0.1 * std if std > 1e-9 else 0.1 * max(abs(float(y[0])), 1.0), 4) or 0.1
        spec["noise"] = {"kind": noise_kind, "scale": scale}
        desc += f", with {noise_kind} noise of scale {scale} added to every output"
    elif kind == "corrupted":
        lo = rng.randint(-110, 70)
        hi = lo + rng.randint(10, 40)
        value = round(float(np.median(y)) + rng.choice((-1, 1)) * (2 * std + 5), 2)
        spec["corrupt"] = {"lo": lo, "hi": hi, "value": value}
        desc += f", except on [{lo}, {hi}] where it outputs the constant {value}"
        domain = {"text": f"[{lo}, {hi}]", "interval": [lo, hi]}
        code_lines += [f"    if {lo} <= x <= {hi}:", f"        return {value!r}"]
    elif kind == "mlp":
        for _ in range(20):
            spec["mlp"] = _fit_mlp(base, gen)
            if P.nmse(_mlp_forward(spec["mlp"], P.grid()), _base(base, P.grid())) < MLP_FIT:
                break
            base = P.draw(rng.choice(("linear", "absolute", "gaussian", "tanh", "relu", "step", "polynomial")), rng)
            spec["base"], expr, desc = base, _expression(base), _description(base)
        else:
            raise RuntimeError(f"function {i}: no MLP fit below nMSE {MLP_FIT} in 20 draws")
        desc += " (computed by a small ReLU MLP trained to approximate it)"
    code_lines.append(f"    return {expr}")
    return Function(id=f"num-{i:04d}", kind="numeric", category=cat, description=desc, domain=domain,
                    code="\n".join(code_lines) + "\n", spec=spec)


def _base(base: dict, x: np.ndarray) -> np.ndarray:
    if "op" not in base:
        return P.evaluate(base, x)
    a, b = (P.evaluate(p, x) for p in base["parts"])
    return a + b if base["op"] == "sum" else a * b


def _expression(base: dict) -> str:
    if "op" not in base:
        return P.expression(base)
    a, b = (P.expression(p) for p in base["parts"])
    return f"({a}) {'+' if base['op'] == 'sum' else '*'} ({b})"


def _description(base: dict) -> str:
    if "op" not in base:
        return P.describe(base)
    a, b = (P.describe(p) for p in base["parts"])
    word = "the sum" if base["op"] == "sum" else "the product"
    return f"{word} of two functions, {a}; and {b}: f(x) = {_expression(base)}"


def _noise(noise: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    s = noise["scale"]
    if noise["kind"] == "uniform":
        return rng.uniform(-s, s, n)
    if noise["kind"] == "normal":
        return rng.normal(0.0, s, n)
    lam = s * s  # zero-mean poisson noise with standard deviation s
    return rng.poisson(lam, n) - lam


def _fit_mlp(base: dict, gen: torch.Generator) -> dict:
    """A 1 -> MLP_HIDDEN -> 1 ReLU MLP on x / 128 fitted to the primitive: kinks spread over the
    range, the output layer solved by (ridge) least squares, then a short Adam polish of every weight."""
    x = torch.linspace(-128, 128, 1024, dtype=torch.float64)
    y = torch.from_numpy(_base(base, x.numpy()))
    mu, sd = y.mean(), y.std().clamp_min(1e-6)
    target = (y - mu) / sd
    sign = torch.randint(0, 2, (MLP_HIDDEN,), generator=gen).double() * 2 - 1
    knots = torch.linspace(-1, 1, MLP_HIDDEN, dtype=torch.float64) + 0.01 * torch.randn(MLP_HIDDEN, generator=gen,
                                                                                         dtype=torch.float64)
    w1 = (sign * 4).requires_grad_()
    b1 = (-sign * 4 * knots).requires_grad_()
    h = torch.relu((x / 128)[:, None] * w1 + b1)
    design = torch.cat([h, torch.ones(len(x), 1, dtype=torch.float64)], 1).detach()
    # Ridge normal equations: the design can be rank-deficient (a kink beyond the data), where
    # lstsq's answer is not unique and came out different from run to run.
    gram = design.T @ design
    gram = gram + 1e-8 * torch.trace(gram) / len(gram) * torch.eye(len(gram), dtype=torch.float64)
    sol = torch.linalg.solve(gram, design.T @ target)
    w2 = sol[:-1].clone().requires_grad_()
    b2 = sol[-1:].clone().requires_grad_()
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-3)
    for _ in range(100):
        opt.zero_grad()
        pred = torch.relu((x / 128)[:, None] * w1 + b1) @ w2 + b2
        loss = torch.mean((pred - target) ** 2)
        loss.backward()
        opt.step()
    # The scale and shift of the target fold into the output layer.
    return {"w1": _f32(w1), "b1": _f32(b1), "w2": _f32(w2 * sd), "b2": _f32(b2 * sd + mu)}


def _f32(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().float().tolist()]


def _mlp_forward(mlp: dict, x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = (np.asarray(mlp[k], dtype=np.float64) for k in ("w1", "b1", "w2", "b2"))
    h = np.maximum(0.0, (np.asarray(x, dtype=np.float64) / 128)[:, None] * w1 + b1)
    return h @ w2 + b2[0]


# ---- strings ------------------------------------------------------------------------------------
def _strings(n: int, rng: random.Random) -> list[Function]:
    n1 = min(int(round(STRING_DEPTH1_SHARE * n)), len(S.INSTANCES))
    seen: set[str] = set()
    out: list[Function] = []
    while len(out) < n:
        depth = 1 if len(out) < n1 else 2
        chain = S.draw_chain(rng, depth)
        key = json.dumps(chain)
        tests = [S.random_input(rng) for _ in range(N_TEST_INPUTS)]
        if key in seen or all(S.apply(chain, t) == t for t in tests):
            continue  # a repeat, or the identity on its own test inputs
        seen.add(key)
        out.append(Function(id=f"str-{len(out):04d}", kind="string", category=f"string/depth{depth}",
                            description=S.describe(chain), domain={"text": "all strings", "interval": None},
                            code=S.reference_code(chain), spec={"chain": [[nm, list(p)] for nm, p in chain]},
                            test_inputs=tests))
    return out


def _chain(spec: dict) -> list[tuple[str, tuple]]:
    return [(name, tuple(params)) for name, params in spec["chain"]]


__all__ = ["Function", "BlackBox", "BudgetExceeded", "build_suite", "save_suite", "load_suite", "clean_output",
           "string_output", "FORMAT"]

"""Least-squares search over FIND's function families, for :class:`~.agents.SearchAgent`.

A *basis* is a family with its nonlinear parameters fixed (a frequency, a location, a width):
one to three columns in x, to which a constant column is always added, so the linear parameters
(amplitudes, offsets) come from one least-squares solve. Each family brings a grid of its
nonlinear parameters; every grid point is solved at once (batched normal equations) on the
training probes and judged by normalised MSE on held-out probes. Pairs of families combine as
``[A, B, A*B, 1]`` columns, which hold both their sum and their product. The winner is refined
on a finer grid near its parameters and refitted on every probe.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

_T = np.arange(-128, 129, dtype=np.float64)  # locations: the suite puts them on integers
_W = np.linspace(0.02, 0.55, 400)
_S = np.geomspace(1.5, 60, 24)
_P = np.linspace(0, 2 * math.pi, 24, endpoint=False)
PAIR_WHEN = 0.03  # try pairs of families when the best single family leaves more held-out error
PAIR_GAIN = 0.7  # and keep a pair only when it cuts that error by at least this factor
MAX_PAIR_GRID = 600
SIMPLER_WITHIN = 0.05  # a simpler family wins when its held-out error is within 5% of the best


@dataclasses.dataclass
class Basis:
    family: str
    params: tuple

    def columns(self, x: np.ndarray) -> np.ndarray:  # [c, n]
        return _columns(self.family, np.array([self.params], dtype=np.float64).reshape(1, -1), x)[0]

    def exprs(self) -> list[str]:
        return _exprs(self.family, self.params)


@dataclasses.dataclass
class Model:
    """``coef[-1] + sum(coef[i] * column_i)`` over the columns of its bases (and their products)."""
    bases: list[Basis]
    coef: np.ndarray
    val_nmse: float = math.inf

    def design(self, x: np.ndarray) -> np.ndarray:  # [n, c + 1]
        return _design([b.columns(x) for b in self.bases], len(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.design(x) @ self.coef

    def expression(self) -> str:
        cols = [b.exprs() for b in self.bases]
        if len(cols) == 2:
            cols = cols[0] + cols[1] + [f"({a}) * ({b})" for a in cols[0] for b in cols[1]]
        else:
            cols = cols[0] if cols else []
        terms = [f"{float(c)!r} * {e}" for c, e in zip(self.coef[:-1], cols)]
        return " + ".join(terms + [f"{float(self.coef[-1])!r}"])

    def code(self, corrupt: tuple[float, float, float] | None = None) -> str:
        lines = ["import math", "", "", "def f(x):"]
        if corrupt is not None:
            lo, hi, value = corrupt
            lines += [f"    if {lo!r} <= x <= {hi!r}:", f"        return {value!r}"]
        return "\n".join(lines + [f"    return {self.expression()}"]) + "\n"

    def describe(self) -> str:
        names = [_WORDS[b.family] for b in self.bases]
        what = names[0] if len(names) == 1 else f"a sum and/or product of {names[0]} and {names[1]}"
        return f"{what}: f(x) = {self.expression()}"


FAMILIES = ("constant", "linear", "poly2", "poly3", "sinusoid", "square", "step", "rectangle", "absolute", "relu",
            "root", "logarithm", "reciprocal", "gaussian", "tanh", "rational")
_WORDS = {"constant": "a constant", "linear": "a linear function", "poly2": "a quadratic", "poly3": "a cubic",
          "sinusoid": "a sine wave", "square": "a square wave", "step": "a step function",
          "rectangle": "a rectangle (box) function", "absolute": "an absolute value", "relu": "a ReLU ramp",
          "root": "a square root of |x - t|", "logarithm": "a logarithm of |x - t|", "reciprocal": "a reciprocal",
          "gaussian": "a gaussian bump", "tanh": "a tanh step", "rational": "a rational function"}


def best_model(x: np.ndarray, y: np.ndarray) -> Model:
    """The family (or pair of families) that best explains ``y`` on held-out probes."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    val = np.zeros(len(x), dtype=bool)
    val[2::5] = True  # every fifth probe held out
    train = ~val
    singles = []
    for fam in FAMILIES:
        err, params = _search([], fam, _grid(fam), x, y, train, val)
        singles.append((err, Basis(fam, params)))
    # The simplest family (FAMILIES runs from simple to complex) within a whisker of the best error:
    # a constant fits as a box of height ~0 too, and should be told as a constant.
    floor = min(s[0] for s in singles)
    simplest = next(s for s in singles if s[0] <= floor * (1 + SIMPLER_WITHIN) + 1e-12)
    singles.sort(key=lambda s: s[0])
    best = [_refine(simplest[1], x, y, train, val)]
    best_err = _fit_grid([], best[0].columns(x)[None], y, train, val)[0][0]
    if best_err > PAIR_WHEN:
        for _, a in [s for s in singles if s[1].family != "constant"][:4]:
            acols = a.columns(x)
            for fam in FAMILIES[1:]:
                grid = _grid(fam)
                if len(grid) > MAX_PAIR_GRID:
                    grid = grid[np.linspace(0, len(grid) - 1, MAX_PAIR_GRID).astype(int)]
                err, params = _search([acols], fam, grid, x, y, train, val)
                if err < PAIR_GAIN * best_err:
                    best_err, best = err, [a, Basis(fam, params)]
    model = Model(best, np.zeros(0), best_err)
    model.coef = _solve(model.design(x), y)
    return model


def find_corruption(x: np.ndarray, y: np.ndarray, model: Model, min_run: int = 3) -> tuple[float, float, float] | None:
    """A run of exactly equal outputs that the model refitted without it cannot explain:
    (first x of the run, last x, the value), or None."""
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    runs, start = [], 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or ys[i] != ys[start]:
            if min_run <= i - start <= 0.6 * len(xs):
                runs.append((start, i))
            start = i
    for s, e in sorted(runs, key=lambda r: r[0] - r[1])[:2]:
        inside = np.zeros(len(xs), dtype=bool)
        inside[s:e] = True
        refit = best_model(xs[~inside], ys[~inside])
        r_out = np.mean((refit.predict(xs[~inside]) - ys[~inside]) ** 2)
        r_in = np.mean((refit.predict(xs[inside]) - ys[inside]) ** 2)
        spread = np.var(ys[~inside]) + 1e-12
        if r_in > 10 * r_out + 1e-9 and r_in > 0.05 * spread and refit.val_nmse < 0.1:
            return float(xs[s]), float(xs[e - 1]), float(ys[s])
    return None


@functools.lru_cache(maxsize=None)
def _grid(fam: str) -> np.ndarray:
    """The nonlinear parameters of ``fam`` to try: [K, p] (coarse; :func:`_refine` goes finer)."""
    if fam in ("constant", "linear", "poly2", "poly3"):
        return np.zeros((1, 0))
    if fam == "sinusoid":
        return _W[:, None]
    if fam == "square":
        return np.array([(w, p) for w in _W[::2] for p in _P])
    if fam == "rectangle":
        return np.array([(lo, hi) for lo in _T[::2] for hi in _T[::2] if hi - lo >= 2])
    if fam in ("gaussian", "tanh", "rational"):
        return np.array([(t, s) for t in _T for s in _S])
    return _T[:, None]


def _refine(b: Basis, x, y, train, val) -> Basis:
    """A finer grid near the winner's continuous parameters."""
    p = b.params
    if b.family == "sinusoid":
        grid = np.linspace(p[0] - 0.002, p[0] + 0.002, 41)[:, None]
    elif b.family == "square":
        grid = np.array([(w, q) for w in np.linspace(p[0] - 0.003, p[0] + 0.003, 41)
                         for q in np.linspace(p[1] - 0.15, p[1] + 0.15, 13)])
    elif b.family == "rectangle":
        grid = np.array([(lo, hi) for lo in p[0] + np.arange(-2, 3) for hi in p[1] + np.arange(-2, 3) if hi - lo >= 1])
    elif b.family in ("gaussian", "tanh", "rational"):
        grid = np.array([(t, s) for t in np.linspace(p[0] - 1, p[0] + 1, 9) for s in p[1] * np.geomspace(0.85, 1.15, 15)])
    else:
        return b
    return Basis(b.family, _search([], b.family, grid, x, y, train, val)[1])


def _search(fixed: list[np.ndarray], fam: str, grid: np.ndarray, x, y, train, val,
            chunk: int = 2048) -> tuple[float, tuple]:
    """The held-out error and parameters of the best row of ``grid`` (in chunks, to bound memory)."""
    best, params = math.inf, tuple(float(v) for v in grid[0])
    for s in range(0, len(grid), chunk):
        err, _ = _fit_grid(fixed, _columns(fam, grid[s:s + chunk], x), y, train, val)
        k = int(np.argmin(err))
        if err[k] < best:
            best, params = float(err[k]), tuple(float(v) for v in grid[s + k])
    return best, params


def _columns(fam: str, g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[K, c, n] columns of ``fam`` at every parameter row of ``g``."""
    k, n = len(g), len(x)
    u = x / 100
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fam == "constant":
            return np.zeros((k, 0, n))
        if fam in ("linear", "poly2", "poly3"):
            deg = {"linear": 1, "poly2": 2, "poly3": 3}[fam]
            return np.broadcast_to(np.stack([u ** d for d in range(1, deg + 1)]), (k, deg, n))
        if fam == "sinusoid":
            wx = g[:, :1] * x
            return np.stack([np.sin(wx), np.cos(wx)], 1)
        if fam == "square":
            return np.where(np.sin(g[:, :1] * x + g[:, 1:2]) >= 0, 1.0, -1.0)[:, None]
        if fam == "rectangle":
            return ((x > g[:, :1]) & (x < g[:, 1:2])).astype(np.float64)[:, None]
        d = x - g[:, :1]
        if fam == "step":
            col = (d > 0).astype(np.float64)
        elif fam == "absolute":
            col = np.abs(d)
        elif fam == "relu":
            col = np.maximum(0.0, d)
        elif fam == "root":
            col = np.sqrt(np.abs(d))
        elif fam == "logarithm":
            col = np.log(np.abs(d))
        elif fam == "reciprocal":
            col = 1.0 / d
        elif fam == "gaussian":
            col = np.exp(-(d ** 2) / (2 * g[:, 1:2] ** 2))
        elif fam == "tanh":
            col = np.tanh(d / g[:, 1:2])
        elif fam == "rational":
            s = g[:, 1:2]
            col = d * s / (d ** 2 + s ** 2)
        else:
            raise ValueError(f"unknown family {fam!r}")
    return col[:, None]


def _exprs(fam: str, p: tuple) -> list[str]:
    """The Python expressions (math only) of the columns of ``fam`` at ``p``; match :func:`_columns`."""
    if fam == "constant":
        return []
    if fam in ("linear", "poly2", "poly3"):
        return [f"(x / 100) ** {d}" for d in range(1, {"linear": 1, "poly2": 2, "poly3": 3}[fam] + 1)]
    if fam == "sinusoid":
        return [f"math.sin({p[0]!r} * x)", f"math.cos({p[0]!r} * x)"]
    if fam == "square":
        return [f"(1.0 if math.sin({p[0]!r} * x + {p[1]!r}) >= 0 else -1.0)"]
    if fam == "rectangle":
        return [f"(1.0 if {p[0]!r} < x < {p[1]!r} else 0.0)"]
    t = f"(x - {p[0]!r})"
    s = f"{p[1]!r}" if len(p) > 1 else ""
    return [{"step": f"(1.0 if {t} > 0 else 0.0)", "absolute": f"abs{t}", "relu": f"max(0.0, {t})",
             "root": f"math.sqrt(abs{t})", "logarithm": f"math.log(abs{t})", "reciprocal": f"(1.0 / {t})",
             "gaussian": f"math.exp(-({t} ** 2) / (2 * {s} ** 2))", "tanh": f"math.tanh({t} / {s})",
             "rational": f"({t} * {s} / ({t} ** 2 + {s} ** 2))"}[fam]]


def _design(cols: list[np.ndarray], n: int) -> np.ndarray:
    """[n, c + 1]: the bases' columns, their pairwise products when there are two, a constant."""
    parts = list(cols)
    if len(cols) == 2:
        parts.append(np.stack([a * b for a in cols[0] for b in cols[1]]) if len(cols[0]) and len(cols[1])
                     else np.zeros((0, n)))
    stacked = np.concatenate(parts + [np.ones((1, n))]) if parts else np.ones((1, n))
    return stacked.T


def _fit_grid(fixed: list[np.ndarray], cand: np.ndarray, y: np.ndarray, train, val) -> tuple[np.ndarray, np.ndarray]:
    """Held-out nMSE and coefficients for every candidate [K, c, n], with ``fixed`` columns."""
    k, _, n = cand.shape
    cols = [cand]
    if fixed:
        a = np.broadcast_to(fixed[0], (k, *fixed[0].shape))
        prods = [a[:, i] * cand[:, j] for i in range(a.shape[1]) for j in range(cand.shape[1])]
        cols = [a, cand] + ([np.stack(prods, 1)] if prods else [])
    design = np.concatenate(cols + [np.ones((k, 1, n))], 1)  # [K, c, n]
    bad = ~np.all(np.isfinite(design), axis=(1, 2))
    design = np.where(np.isfinite(design), design, 0.0)
    dt = design[:, :, train]
    gram = dt @ dt.transpose(0, 2, 1)
    ridge = 1e-9 * np.trace(gram, axis1=1, axis2=2)[:, None, None] + 1e-12
    gram = gram + ridge * np.eye(gram.shape[1])
    rhs = dt @ y[train]
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    pred = np.einsum("kc,kcn->kn", coef, design[:, :, val])
    # Normalised as primitives.nmse: by the variance, or by the mean square when the outputs are flat.
    var, power = float(np.var(y[val])), float(np.mean(y[val] ** 2))
    denom = var if var > 1e-12 * max(power, 1.0) else max(power, 1e-12)
    err = np.mean((pred - y[val]) ** 2, axis=1) / denom
    err[bad | ~np.isfinite(err)] = np.inf
    return err, coef


def _solve(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    gram = design.T @ design
    gram = gram + (1e-9 * np.trace(gram) + 1e-12) * np.eye(len(gram))
    return np.linalg.solve(gram, design.T @ y)

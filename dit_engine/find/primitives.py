"""FIND's 16 numeric primitive families: parameter draws, a vectorised evaluator, the reference
code and the ground-truth description of each.

A primitive is a JSON-able dict ``{"family": NAME, **params}``. Every family has the form
``a * g(x; theta) + b`` (or a piecewise constant), written three ways that must agree: ``evaluate``
(numpy over an array of x, what the black box computes), ``expression`` (a Python expression in
``x`` using only ``math``, what the reference code runs) and ``describe`` (words for people and
for agents to be scored against). Parameters are rounded when drawn, so the code text carries
them exactly.

Every family is finite on the scoring grid x in [-128, 128) + 0.5: the poles of reciprocal and
logarithm sit on integers, which the half-integer grid never hits (the black box still answers
``inf``/``nan`` if an agent probes the pole itself).
"""

from __future__ import annotations

import math
import random

import numpy as np

FAMILIES = ("constant", "linear", "polynomial", "cos", "sin", "rectangle", "absolute", "gaussian", "reciprocal",
            "root", "tanh", "rational", "step", "square_wave", "logarithm", "relu")


def draw(family: str, rng: random.Random) -> dict:
    """Parameters of one function of ``family``, drawn from ``rng``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown primitive family {family!r}; use one of {', '.join(FAMILIES)}")
    a = _r(rng.choice((-1, 1)) * rng.uniform(1, 10), 2)
    b = _r(rng.uniform(-20, 20), 2)
    t = rng.randint(-80, 80)  # a location on an integer: never on the half-integer scoring grid
    if family == "constant":
        return {"family": family, "b": _r(rng.uniform(-50, 50), 2)}
    if family == "linear":
        return {"family": family, "a": _r(rng.uniform(-5, 5), 2), "b": b}
    if family == "polynomial":
        deg = rng.choice((2, 3))
        # Coefficients scaled so each term is of order 10 at |x| = 100.
        coef = [b] + [_r(rng.uniform(-1, 1) * 10 / 100 ** k, 4 + 2 * k) for k in range(1, deg + 1)]
        return {"family": family, "coef": coef}
    if family in ("cos", "sin"):
        return {"family": family, "a": a, "w": _r(rng.uniform(0.03, 0.5), 3), "p": _r(rng.uniform(-3, 3), 2), "b": b}
    if family == "rectangle":
        lo = rng.randint(-100, 60)
        return {"family": family, "lo": lo, "hi": lo + rng.randint(10, 60), "a": a, "b": b}
    if family in ("absolute", "root", "logarithm", "reciprocal", "relu"):
        return {"family": family, "a": a, "t": t, "b": b}
    if family in ("gaussian", "tanh", "rational"):
        return {"family": family, "a": a * (5 if family == "rational" else 1), "t": t,
                "s": _r(rng.uniform(3, 30), 1), "b": b}
    if family == "step":
        return {"family": family, "t": t, "a": a, "b": b}
    return {"family": "square_wave", "a": a, "w": _r(rng.uniform(0.03, 0.5), 3), "p": _r(rng.uniform(-3, 3), 2),
            "b": b}


def evaluate(prim: dict, x: np.ndarray) -> np.ndarray:
    """The primitive on every element of ``x`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    f, p = prim["family"], prim
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if f == "constant":
            return np.full_like(x, p["b"])
        if f == "linear":
            return p["a"] * x + p["b"]
        if f == "polynomial":
            return sum(c * x ** k for k, c in enumerate(p["coef"])) + 0 * x
        if f == "cos":
            return p["a"] * np.cos(p["w"] * x + p["p"]) + p["b"]
        if f == "sin":
            return p["a"] * np.sin(p["w"] * x + p["p"]) + p["b"]
        if f == "rectangle":
            return np.where((x > p["lo"]) & (x < p["hi"]), p["a"] + p["b"], p["b"])
        if f == "absolute":
            return p["a"] * np.abs(x - p["t"]) + p["b"]
        if f == "gaussian":
            return p["a"] * np.exp(-((x - p["t"]) ** 2) / (2 * p["s"] ** 2)) + p["b"]
        if f == "reciprocal":
            return p["a"] / (x - p["t"]) + p["b"]
        if f == "root":
            return p["a"] * np.sqrt(np.abs(x - p["t"])) + p["b"]
        if f == "tanh":
            return p["a"] * np.tanh((x - p["t"]) / p["s"]) + p["b"]
        if f == "rational":
            return p["a"] * (x - p["t"]) / ((x - p["t"]) ** 2 + p["s"] ** 2) * p["s"] + p["b"]
        if f == "step":
            return np.where(x > p["t"], p["a"] + p["b"], p["b"])
        if f == "square_wave":
            return np.where(np.sin(p["w"] * x + p["p"]) >= 0, p["a"], -p["a"]) + p["b"]
        if f == "logarithm":
            return p["a"] * np.log(np.abs(x - p["t"])) + p["b"]
        if f == "relu":
            return p["a"] * np.maximum(0.0, x - p["t"]) + p["b"]
    raise ValueError(f"unknown primitive family {f!r}")


def expression(prim: dict) -> str:
    """A Python expression in ``x`` (``math`` only) equal to :func:`evaluate` of the primitive."""
    f, p = prim["family"], prim
    if f == "constant":
        return f"{p['b']!r}"
    if f == "linear":
        return f"{p['a']!r} * x + {p['b']!r}"
    if f == "polynomial":
        return " + ".join([f"{p['coef'][0]!r}"] + [f"{c!r} * x ** {k}" for k, c in enumerate(p["coef"]) if k])
    if f in ("cos", "sin"):
        return f"{p['a']!r} * math.{f}({p['w']!r} * x + {p['p']!r}) + {p['b']!r}"
    if f == "rectangle":
        return f"({p['a'] + p['b']!r} if {p['lo']!r} < x < {p['hi']!r} else {p['b']!r})"
    if f == "absolute":
        return f"{p['a']!r} * abs(x - {p['t']!r}) + {p['b']!r}"
    if f == "gaussian":
        return f"{p['a']!r} * math.exp(-((x - {p['t']!r}) ** 2) / (2 * {p['s']!r} ** 2)) + {p['b']!r}"
    if f == "reciprocal":
        return f"{p['a']!r} / (x - {p['t']!r}) + {p['b']!r}"
    if f == "root":
        return f"{p['a']!r} * math.sqrt(abs(x - {p['t']!r})) + {p['b']!r}"
    if f == "tanh":
        return f"{p['a']!r} * math.tanh((x - {p['t']!r}) / {p['s']!r}) + {p['b']!r}"
    if f == "rational":
        return f"{p['a']!r} * (x - {p['t']!r}) / ((x - {p['t']!r}) ** 2 + {p['s']!r} ** 2) * {p['s']!r} + {p['b']!r}"
    if f == "step":
        return f"({p['a'] + p['b']!r} if x > {p['t']!r} else {p['b']!r})"
    if f == "square_wave":
        return f"(({p['a']!r}) if math.sin({p['w']!r} * x + {p['p']!r}) >= 0 else ({-p['a']!r})) + {p['b']!r}"
    if f == "logarithm":
        return f"{p['a']!r} * math.log(abs(x - {p['t']!r})) + {p['b']!r}"
    if f == "relu":
        return f"{p['a']!r} * max(0.0, x - {p['t']!r}) + {p['b']!r}"
    raise ValueError(f"unknown primitive family {f!r}")


def describe(prim: dict) -> str:
    """The ground-truth description of the primitive, in words and with its formula."""
    f, p = prim["family"], prim
    words = {
        "constant": "a constant function",
        "linear": "a linear function",
        "polynomial": f"a polynomial of degree {len(p.get('coef', [])) - 1}",
        "cos": "a cosine wave", "sin": "a sine wave",
        "rectangle": f"a rectangle (box) function, raised on ({p.get('lo')}, {p.get('hi')})",
        "absolute": f"an absolute value function with its vertex at x = {p.get('t')}",
        "gaussian": f"a gaussian bump centred at x = {p.get('t')} with width {p.get('s')}",
        "reciprocal": f"a reciprocal (hyperbola) with a pole at x = {p.get('t')}",
        "root": f"a square root of |x - {p.get('t')}|",
        "tanh": f"a tanh (sigmoid-like) step centred at x = {p.get('t')}",
        "rational": f"a rational function (x - t) / ((x - t)^2 + s^2) centred at x = {p.get('t')}",
        "step": f"a step function that jumps at x = {p.get('t')}",
        "square_wave": "a square wave",
        "logarithm": f"a logarithm of |x - {p.get('t')}|",
        "relu": f"a ReLU (ramp) with its kink at x = {p.get('t')}",
    }[f]
    return f"{words}: f(x) = {expression(prim)}"


def _r(v: float, digits: int) -> float:
    """Round, keeping a value that prints exactly (and never -0.0)."""
    out = round(v, digits)
    return 0.0 if out == 0 else out


def grid() -> np.ndarray:
    """The scoring inputs: x in [-128, 128) + 0.5, 256 points."""
    return np.arange(-128, 128, dtype=np.float64) + 0.5


def check_finite(prim: dict) -> bool:
    return bool(np.all(np.isfinite(evaluate(prim, grid()))))



def nmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Normalised mean squared error: MSE / var(true). A flat ``true`` (variance ~0) is normalised
    by its mean square instead, and an all-zero one by 1, so the measure stays finite. Any
    non-finite prediction where ``true`` is finite makes it ``inf``."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"prediction has shape {pred.shape}, truth {true.shape}")
    if not np.all(np.isfinite(pred)):
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        mse = float(np.mean((pred - true) ** 2))
        var = float(np.var(true))
        power = float(np.mean(true ** 2))
    denom = var if var > 1e-12 else (power if power > 1e-12 else 1.0)
    out = mse / denom
    return out if math.isfinite(out) else math.inf

"""Score an explanation by how well its simulation matches the neuron's real activations.

All three scores pool every token of the scored records (the held-out top records and the random
sample together, the paper's preferred way: top records alone would reward an explanation that
predicts "high everywhere"):

* ``correlation``: Pearson correlation of simulated and real activations (``ev_correlation_score``
  in the paper; scale-free, so the simulator's 0..10 scale needs no calibration). A constant
  simulation or a constant neuron has no correlation; it scores 0.
* ``r2``: 1 - sum((a - s)^2) / sum((a - mean a)^2), with the real activations ``a`` put on the
  simulator's scale (``10 * relu(x) / max``, max over the neuron's records, no rounding) and ``s``
  the simulation (0..10). Can be negative.
* ``abs_dev_explained``: 1 - sum|a - s| / sum|a - mean a|, on the same scale.

:func:`layer_ranking` orders neurons per layer by score: the best-explained first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .simulate import SCALE


class ScoreError(ValueError):
    """Real and simulated activations that do not line up."""


def _pooled(real: Sequence[np.ndarray], sim: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if len(real) != len(sim):
        raise ScoreError(f"{len(real)} real records for {len(sim)} simulated ones")
    for i, (r, s) in enumerate(zip(real, sim)):
        if np.shape(r) != np.shape(s):
            raise ScoreError(f"record {i}: real activations of shape {np.shape(r)}, simulated {np.shape(s)}")
    a = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in real]) if real else np.zeros(0)
    b = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in sim]) if sim else np.zeros(0)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ScoreError("real or simulated activations hold NaN or infinity")
    return a, b


def correlation(real: Sequence[np.ndarray], sim: Sequence[np.ndarray]) -> float:
    a, b = _pooled(real, sim)
    a, b = a - a.mean() if a.size else a, b - b.mean() if b.size else b
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def _calibrated(real: Sequence[np.ndarray], sim: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pooled(real, sim)
    top = a.max() if a.size else 0.0
    a = SCALE * np.maximum(a, 0) / top if top > 0 else np.zeros_like(a)
    return a, b


def r_squared(real: Sequence[np.ndarray], sim: Sequence[np.ndarray]) -> float:
    a, b = _calibrated(real, sim)
    sst = float(((a - a.mean()) ** 2).sum()) if a.size else 0.0
    return 1.0 - float(((a - b) ** 2).sum()) / sst if sst > 0 else 0.0


def abs_dev_explained(real: Sequence[np.ndarray], sim: Sequence[np.ndarray]) -> float:
    a, b = _calibrated(real, sim)
    base = float(np.abs(a - a.mean()).sum()) if a.size else 0.0
    return 1.0 - float(np.abs(a - b).sum()) / base if base > 0 else 0.0


def scores(real: Sequence[np.ndarray], sim: Sequence[np.ndarray]) -> dict[str, float]:
    return {"correlation": correlation(real, sim), "r2": r_squared(real, sim),
            "abs_dev_explained": abs_dev_explained(real, sim)}


def layer_ranking(rows: Sequence[dict], key: str = "correlation", top: int | None = None) -> dict[int, list[dict]]:
    """Rows with ``layer``, ``neuron`` and ``key`` -> per layer, sorted best first (ties by neuron)."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(int(r["layer"]), []).append(r)
    return {layer: sorted(rs, key=lambda r: (-r[key], r["neuron"]))[:top] for layer, rs in sorted(out.items())}

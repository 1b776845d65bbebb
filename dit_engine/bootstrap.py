"""Percentile bootstrap confidence intervals of means (numpy), for the evaluation's scores.

The procedure, exactly (so that an interval can be recomputed by hand): with
``rng = numpy.random.default_rng(seed)``, each of the ``resamples`` resamples draws ``n`` indices
one after another with ``rng.integers(0, n)`` (drawn here in blocks of whole resamples, which
gives the same stream), takes the mean of every column of ``values`` over those rows, and the
interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resampled means
(numpy's default linear interpolation). A fresh generator per call: an interval depends only on
its own values, the seed and the number of resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
_MAX_BLOCK = 1 << 22  # indices drawn at once (memory bound for large groups)


def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, k) means of the columns of ``values`` (n, k) over rows resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"bootstrap: expected an (n >= 1, k) array of values, found shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, found {resamples}")
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_BLOCK // n)
    out = np.empty((resamples, values.shape[1]))
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL
) -> list[tuple[float, float]]:
    """Percentile bootstrap interval of the mean of each column of ``values`` (n, k): k (low, high) pairs."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), found {level}")
    means = bootstrap_means(values, resamples, seed)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def paired_difference_ci(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL,
) -> tuple[list[float], list[tuple[float, float]]]:
    """Mean of ``a - b`` per column and its bootstrap interval; row i of ``a`` and ``b`` is the same
    unit (diff), so units are resampled and both sides move together (a paired bootstrap)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: shapes differ, {a.shape} vs {b.shape}")
    diff = a - b
    return [float(v) for v in diff.mean(axis=0)], bootstrap_ci(diff, resamples, seed, level)

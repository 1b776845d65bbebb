"""Scores against numpy references written another way, on fixed data and on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from dit_engine.neurons.score import ScoreError, abs_dev_explained, correlation, layer_ranking, r_squared, scores


def _data(seed=0):
    rng = np.random.default_rng(seed)
    real = [np.maximum(rng.normal(size=n) * 2, 0) for n in (7, 13, 5, 9)]
    sim = [np.clip(5 * r + rng.normal(size=r.shape) * 3, 0, 10) for r in real]
    return real, sim


def test_scores_equal_a_numpy_reference_on_fixed_data():
    for seed in range(5):
        real, sim = _data(seed)
        a, s = np.hstack(real), np.hstack(sim)
        assert correlation(real, sim) == pytest.approx(np.corrcoef(a, s)[0, 1], abs=1e-12)
        cal = a / a.max() * 10
        assert r_squared(real, sim) == pytest.approx(1 - np.mean((cal - s) ** 2) / np.var(cal), abs=1e-12)
        mad = np.mean(np.abs(cal - np.mean(cal)))
        assert abs_dev_explained(real, sim) == pytest.approx(1 - np.mean(np.abs(cal - s)) / mad, abs=1e-12)


def test_pooling_is_over_all_tokens_not_an_average_of_records():
    real = [np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 5.0, 0.0])]
    sim = [np.array([0.0, 9.0, 0.0]), np.array([1.0, 0.0, 2.0, 0.0])]
    pooled = np.corrcoef(np.hstack(real), np.hstack(sim))[0, 1]
    per_record = np.mean([np.corrcoef(r, s)[0, 1] for r, s in zip(real, sim)])
    assert correlation(real, sim) == pytest.approx(pooled) and abs(pooled - per_record) > 0.05


def test_known_cases():
    real = [np.array([0.0, 2.0, 0.0, 4.0])]
    perfect = [np.array([0.0, 5.0, 0.0, 10.0])]  # the real activations on the 0..10 scale
    assert scores(real, perfect) == pytest.approx({"correlation": 1.0, "r2": 1.0, "abs_dev_explained": 1.0})
    assert correlation(real, [np.full(4, 3.0)]) == 0.0  # a constant simulation explains nothing
    assert correlation([np.zeros(4)], perfect) == 0.0
    assert correlation(real, [np.array([10.0, 5.0, 10.0, 0.0])]) == pytest.approx(-1.0)
    assert r_squared(real, [np.full(4, 3.75)]) == pytest.approx(0.0)  # the mean of the calibrated real
    assert r_squared(real, [np.array([10.0, 5.0, 10.0, 0.0])]) < 0


def test_bad_input_is_refused():
    with pytest.raises(ScoreError, match=r"record 0: real activations of shape \(3,\), simulated \(2,\)"):
        correlation([np.zeros(3)], [np.zeros(2)])
    with pytest.raises(ScoreError, match="1 real records for 2 simulated"):
        correlation([np.zeros(3)], [np.zeros(3), np.zeros(3)])
    with pytest.raises(ScoreError, match="NaN"):
        r_squared([np.array([1.0, np.nan])], [np.zeros(2)])


def test_layer_ranking_orders_best_first():
    rows = [{"layer": 1, "neuron": 3, "correlation": 0.2}, {"layer": 0, "neuron": 5, "correlation": 0.9},
            {"layer": 1, "neuron": 0, "correlation": 0.7}, {"layer": 1, "neuron": 1, "correlation": 0.7}]
    ranked = layer_ranking(rows)
    assert list(ranked) == [0, 1] and [r["neuron"] for r in ranked[1]] == [0, 1, 3]
    assert [r["neuron"] for r in layer_ranking(rows, top=1)[1]] == [0]

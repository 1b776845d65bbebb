"""FIND scoring: the ground truth scores 1.0 on every function, a constant agent scores exactly
what the functions' own flatness gives it (counted here without the scorer), the measures on
hand-computed cases, and code that fails counts as wrong with its error kept."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dit_engine.find.agents import constant_answers, reference_answers
from dit_engine.find.score import Answer, interval_iou, parse_interval, score_answers, summarize
from dit_engine.find.primitives import nmse
from dit_engine.find.suite import BlackBox, build_suite


@pytest.fixture(scope="module")
def suite():
    return build_suite(seed=11, n_numeric=64, n_string=48)


def test_ground_truth_scores_one_on_every_function(suite):
    rows = score_answers(suite, reference_answers(suite), batch_size=40)
    assert all(r["correct"] and r["error"] is None for r in rows), [r for r in rows if not r["correct"]][:3]
    summary = summarize(rows)
    assert summary["overall"]["accuracy"] == 1.0 and summary["overall"]["n"] == len(suite)
    assert summary["numeric/corrupted"]["mean_domain_iou"] == 1.0
    assert {k for k in summary if k.startswith("numeric/")} == {f.category for f in suite if f.kind == "numeric"}


def test_a_constant_agent_scores_what_flatness_gives_it(suite):
    # The value of the suite's first constant function: that one (and any other function equal to
    # it everywhere on the grid) is right; every non-flat function is wrong by at least var/var = 1.
    const = next(f for f in suite if f.spec.get("base", {}).get("family") == "constant" and not f.spec["noise"]
                 and not f.spec["corrupt"] and not f.spec["mlp"])
    value = const.spec["base"]["b"]
    grid = np.arange(-128, 128) + 0.5
    want = {}
    for f in suite:
        if f.kind == "numeric":
            exec_ns = {}
            exec(f.code, exec_ns)
            y = np.array([exec_ns["f"](x) for x in grid]) if not f.spec["mlp"] else None
            want[f.id] = y is not None and bool(np.all(y == value))
        else:
            box = BlackBox(f)
            want[f.id] = all(out == "" for out in box(f.test_inputs))
    rows = score_answers(suite, constant_answers(suite, value), batch_size=40)
    assert {r["id"]: r["correct"] for r in rows} == want
    assert want[const.id] and sum(want.values()) >= 1
    assert summarize(rows)["overall"]["accuracy"] == sum(want.values()) / len(suite)


def test_zero_agent_on_numeric_functions_is_never_right_unless_the_function_is_zero(suite):
    rows = score_answers(suite, constant_answers(suite, 0.0), batch_size=40)
    for r, f in zip(rows, suite):
        if f.kind == "numeric":
            assert r["correct"] is False and r["nmse"] >= 1.0 - 1e-9, f.id


def test_nmse_by_hand():
    true = np.array([1.0, 2.0, 3.0, 4.0])  # variance 1.25
    assert nmse(true + 0.5, true) == pytest.approx(0.25 / 1.25)
    assert nmse(np.full(4, 3.0), np.full(4, 2.0)) == pytest.approx(1 / 4)  # flat truth: by its mean square
    assert nmse(np.zeros(4), np.zeros(4)) == 0.0
    assert nmse(np.array([1.0, math.nan, 3.0, 4.0]), true) == math.inf


def test_intervals_by_hand():
    assert parse_interval("[-40.5, 12]") == (-40.5, 12.0)
    assert parse_interval("from 30 to -10, roughly") == (-10.0, 30.0)
    assert parse_interval("all real numbers") is None
    assert interval_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert interval_iou((0, 10), (20, 30)) == 0.0
    assert interval_iou(None, (1, 2)) == 0.0


def test_missing_and_failing_answers_count_as_wrong_with_their_error(suite):
    fns = [f for f in suite if f.kind == "numeric"][:3] + [f for f in suite if f.kind == "string"][:1]
    answers = reference_answers(fns)
    answers[fns[1].id] = Answer(id=fns[1].id, code="def f(x):\n    raise KeyError('nope')")
    answers[fns[3].id] = Answer(id=fns[3].id, code="def f(s):\n    return 3")
    del answers[fns[2].id]
    rows = score_answers(fns, answers)
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert "KeyError" in rows[1]["error"] and rows[2]["error"] == "no answer" and "not str" in rows[3]["error"]
    assert summarize(rows)["overall"]["code_errors"] == 3


@pytest.mark.slow
def test_ground_truth_scores_one_on_the_full_suite():
    """All 500 + 500 functions of seed 0 (about a minute on 2 cores: the MLPs' fits, then the
    reference code in shared sandbox processes)."""
    fns = build_suite(seed=0)
    rows = score_answers(fns, reference_answers(fns), batch_size=100)
    assert len(rows) == 1000 and all(r["correct"] for r in rows), [r for r in rows if not r["correct"]][:3]
    assert all(r["domain_iou"] == 1.0 for r in rows if "domain_iou" in r)

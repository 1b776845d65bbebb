"""The search agent: within its call budget, it recovers primitives of every family, string
compositions, and a corrupted interval's edges; its code runs in the sandbox and is scored."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dit_engine.find import fitting
from dit_engine.find import primitives as P
from dit_engine.find.agents import SearchAgent
from dit_engine.find.score import score_answers, summarize
from dit_engine.find.suite import BlackBox, Function, build_suite


def _primitive_fn(i: int, prim: dict, corrupt=None) -> Function:
    code = "import math\ndef f(x):\n"
    if corrupt:
        code += f"    if {corrupt['lo']} <= x <= {corrupt['hi']}:\n        return {corrupt['value']!r}\n"
    code += f"    return {P.expression(prim)}\n"
    domain = {"text": "all real numbers", "interval": None}
    if corrupt:
        domain = {"text": f"[{corrupt['lo']}, {corrupt['hi']}]", "interval": [corrupt["lo"], corrupt["hi"]]}
    return Function(id=f"t-{i}", kind="numeric", category="numeric/test", description="", domain=domain, code=code,
                    spec={"base": prim, "noise": None, "corrupt": corrupt, "mlp": None})


def test_recovers_one_primitive_of_every_family():
    rng = random.Random(5)
    fns = [_primitive_fn(i, P.draw(fam, rng)) for i, fam in enumerate(P.FAMILIES)]
    agent = SearchAgent()
    answers = agent.run([BlackBox(f, budget=agent.budget) for f in fns])
    rows = score_answers(fns, {a.id: a for a in answers}, batch_size=16)
    wrong = [(f.spec["base"]["family"], r["nmse"]) for f, r in zip(fns, rows) if not r["correct"]]
    assert len(wrong) <= 1, wrong
    assert all(0 < a.calls <= agent.budget for a in answers)


def test_finds_a_corrupted_interval_and_its_edges():
    prim = {"family": "sin", "a": 6.0, "w": 0.1, "p": 0.5, "b": 2.0}
    fn = _primitive_fn(0, prim, corrupt={"lo": -31, "hi": 7, "value": -30.0})
    agent = SearchAgent()
    (answer,) = agent.run([BlackBox(fn, budget=agent.budget)])
    (row,) = score_answers([fn], {fn.id: answer})
    assert row["correct"] and row["domain_iou"] > 0.9, (answer.domain, row)
    assert answer.calls == agent.n_probes + 2 * agent.n_refine


def test_fitted_code_matches_the_fitted_model():
    x = np.linspace(-120, 120, 200)
    y = 3.0 * np.tanh((x - 7) / 12.0) - 1.0
    model = fitting.best_model(x, y)
    ns = {}
    exec(model.code(), ns)
    np.testing.assert_allclose([ns["f"](v) for v in x], model.predict(x), rtol=1e-9, atol=1e-9)
    assert model.bases[0].family == "tanh" and P.nmse(model.predict(x), y) < 1e-3


def test_strings_and_a_small_suite():
    fns = build_suite(seed=2, n_numeric=0, n_string=24)
    agent = SearchAgent()
    answers = agent.run([BlackBox(f, budget=agent.budget) for f in fns])
    summary = summarize(score_answers(fns, {a.id: a for a in answers}, batch_size=24))
    assert summary["string"]["accuracy"] >= 0.9 and summary["string"]["mean_calls"] == 12


def test_too_few_probes_are_refused():
    with pytest.raises(ValueError, match="n_probes must be >= 20"):
        SearchAgent(n_probes=5)


def test_a_constant_is_told_as_a_constant_not_a_flat_box():
    x = np.linspace(-127, 127, 200)
    model = fitting.best_model(x, np.full(200, 35.28))
    assert [b.family for b in model.bases] == ["constant"] and model.describe().startswith("a constant")

"""The FIND suite: seeded and deterministic, the categories and counts asked for, a reference code
that reproduces each black box (checked here in-process against the numpy evaluator), a file that
round-trips and refuses what is not a suite."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from dit_engine.files import FileFormatError
from dit_engine.find import primitives as P
from dit_engine.find import strings as S
from dit_engine.find.suite import (NUMERIC_SHARES, BlackBox, BudgetExceeded, build_suite, clean_output, load_suite,
                                   save_suite, string_output)


@pytest.fixture(scope="module")
def small():
    return build_suite(seed=3, n_numeric=48, n_string=40)


def _run_code(code: str, xs):
    ns = {}
    exec(code, ns)
    return [ns["f"](x) for x in xs]


def test_same_seed_same_suite_other_seed_other(small):
    again = build_suite(seed=3, n_numeric=48, n_string=40)
    assert [f.to_json() for f in small] == [f.to_json() for f in again]
    other = build_suite(seed=4, n_numeric=48, n_string=40)
    assert [f.code for f in small] != [f.code for f in other]


def test_counts_categories_and_ids(small):
    cats = collections.Counter(f.category for f in small)
    assert sum(v for k, v in cats.items() if k.startswith("numeric/")) == 48
    assert sum(v for k, v in cats.items() if k.startswith("string/")) == 40
    assert set(cats) == set(NUMERIC_SHARES) | {"string/depth1", "string/depth2"}
    assert len({f.id for f in small}) == len(small)
    assert len({f.code for f in small if f.kind == "string"}) == 40


def test_every_primitive_family_appears_and_agrees_with_its_code():
    rng = np.random.default_rng(0)
    xs = list(P.grid()) + list(rng.uniform(-127, 127, 20))
    import random
    r = random.Random(0)
    for fam in P.FAMILIES:
        for _ in range(5):
            prim = P.draw(fam, r)
            code = "import math\ndef f(x):\n    return " + P.expression(prim)
            got = np.array(_run_code(code, xs))
            want = P.evaluate(prim, np.array(xs))
            assert np.all(np.isfinite(want[:256])), (fam, prim)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9, err_msg=fam)
            assert P.expression(prim) in P.describe(prim)


def test_reference_code_reproduces_the_black_box(small):
    for fn in small:
        if fn.kind == "numeric":
            truth = clean_output(fn, P.grid())
            got = np.array(_run_code(fn.code, P.grid()))
            assert np.all(np.isfinite(truth)), fn.id
            assert P.nmse(got, truth) < 0.02 if fn.spec["mlp"] else np.allclose(got, truth, rtol=1e-9), fn.id
        else:
            assert _run_code(fn.code, fn.test_inputs) == [string_output(fn, s) for s in fn.test_inputs], fn.id


def test_corrupted_functions_output_their_constant_on_the_interval(small):
    corrupted = [f for f in small if f.category == "numeric/corrupted"]
    assert corrupted
    for fn in corrupted:
        lo, hi = fn.domain["interval"]
        x = np.arange(lo, hi + 1, dtype=float)
        assert np.all(clean_output(fn, x) == fn.spec["corrupt"]["value"])
        assert f"[{lo}, {hi}]" in fn.description


def test_noise_is_zero_mean_at_its_scale_and_repeatable(small):
    for fn in [f for f in small if f.category == "numeric/noise"]:
        x = [3.5] * 4000
        y = np.array(BlackBox(fn)(x)) - clean_output(fn, np.array([3.5]))[0]
        s = fn.spec["noise"]["scale"]
        want_std = s / math.sqrt(3) if fn.spec["noise"]["kind"] == "uniform" else s
        assert abs(y.mean()) < 0.1 * s and abs(y.std() - want_std) < 0.1 * want_std, fn.spec["noise"]
        assert BlackBox(fn)(x[:5]) == BlackBox(fn)(x[:5])


def test_mlp_functions_are_weights_not_code(small):
    for fn in [f for f in small if f.category == "numeric/mlp"]:
        mlp = fn.spec["mlp"]
        h = np.maximum(0, (P.grid() / 128)[:, None] * np.array(mlp["w1"]) + np.array(mlp["b1"]))
        np.testing.assert_allclose(clean_output(fn, P.grid()), h @ np.array(mlp["w2"]) + mlp["b2"][0])
        assert "mlp" not in fn.code.lower() and "ReLU MLP" in fn.description


def test_string_descriptions_follow_the_chain():
    chain = [("reverse", ()), ("shift_letters", (1,))]
    assert S.apply(chain, "Abz") == "acB"  # "zbA" shifted by one
    assert S.describe(chain) == ("the function reverses the string, then shifts every letter 1 places forward in "
                                 "the alphabet (wrapping around)")
    assert len(S.INSTANCES) >= 80 and len(S.PRIMITIVES) >= 40


def test_black_box_counts_and_caps_calls(small):
    fn = small[0]
    box = BlackBox(fn, budget=5)
    box([1.0, 2.0, 3.0])
    assert box.calls == 3
    with pytest.raises(BudgetExceeded, match="budget of 5"):
        box([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="takes numbers"):
        BlackBox(fn)(["x"])


def test_suite_file_round_trips_and_refuses_others(tmp_path, small):
    path = tmp_path / "suite.jsonl"
    save_suite(path, small, seed=3)
    assert [f.to_json() for f in load_suite(path)] == [f.to_json() for f in small]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something-else"}\n')
    with pytest.raises(FileFormatError, match="not a FIND suite"):
        load_suite(bad)
    with pytest.raises(FileFormatError, match="no such suite file"):
        load_suite(tmp_path / "missing.jsonl")
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(FileFormatError, match=r"line 90 is not a suite function"):
        load_suite(path)


@pytest.mark.slow
def test_full_suite_has_500_numeric_and_500_string_from_one_seed():
    fns = build_suite(seed=0)
    kinds = collections.Counter(f.kind for f in fns)
    assert kinds == {"numeric": 500, "string": 500}
    assert len({f.code for f in fns if f.kind == "string"}) == 500

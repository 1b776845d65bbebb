"""The explanation prompt (the paper's format), the normalisation, the token-statistics explainer,
the local LM explainer and the random baseline."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_neurons_world import neuron_engine

from dit_engine.neurons import Record
from dit_engine.neurons.explain import (LMExplainer, TokenExplainer, explanation_prompt, normalise,
                                        random_baseline)


def _rec(tokens, acts, window=0):
    return Record(window, tokens, np.asarray(acts, dtype=np.float32))


def test_normalise_is_the_papers_integer_scale():
    acts = np.array([-1.0, 0.0, 0.099, 0.1, 0.55, 0.999, 1.0, 2.0])
    assert normalise(acts, 1.0) == [0, 0, 0, 1, 5, 9, 10, 10]  # min(10, floor(10 relu(x) / max))
    assert normalise(acts, 0.0) == [0] * 8 and normalise(acts, -2.0) == [0] * 8


def test_explanation_prompt_lists_token_and_value_per_line():
    recs = [_rec(["the", "cat", "sat"], [0.0, 2.0, 1.0], 4), _rec(["a", "dog"], [0.1, 0.0], 9)]
    p = explanation_prompt(recs, 2.0)
    assert p.endswith("Explanation of neuron 2 behavior: the main thing this neuron does is find")
    target = p[p.index("Neuron 2\nActivations:\n"):]
    blocks = re.findall(r"<start>\n(.*?)<end>\n", target, re.S)
    assert blocks[:2] == ["the\t0\ncat\t10\nsat\t5\n", "a\t0\ndog\t0\n"]
    assert blocks[2:] == ["cat\t10\nsat\t5\n"]  # the non-zero lines again; a record with none is left out
    assert "Same activations, but with all zeros filtered out:" in target
    assert explanation_prompt([_rec(["x\ty"], [1.0])], 1.0).count("x\\ty\t10\n") == 2  # a tab in a token stays on its line (both lists)


def test_token_explainer_names_the_tokens_that_carry_the_activation():
    recs = [_rec(["the", "cat", "sees", "a", "dog"], [0, 9, 0, 0, 8]),
            _rec(["a", "cat", "and", "the", "dog"], [0, 10, 1, 0, 7]),
            _rec(["the", "cat", "."], [0, 9.5, 0])]
    out = TokenExplainer(max_tokens=3).explain_one(recs, 10.0)
    assert out == 'the tokens "cat", "dog", mostly right after "the".'
    assert TokenExplainer(with_context=False).explain_one(recs, 10.0) == 'the tokens "cat", "dog".'
    assert TokenExplainer(max_tokens=1).explain_one(recs, 10.0).startswith('the tokens "cat"')
    assert "never fires" in TokenExplainer().explain_one([_rec(["a"], [0.0])], 0.0)


def test_lm_explainer_samples_n_explanations_per_neuron_in_one_batch():
    eng = neuron_engine(seed=2)
    calls = []
    real = eng.generate
    eng.generate = lambda prompts, **kw: (calls.append(len(prompts)), real(prompts, **kw))[1]
    ex = LMExplainer(eng, n_samples=3, max_new_tokens=5, temperature=1.0, seed=1)
    neurons = [([_rec(["the", "cat"], [0, 1.0])], 1.0), ([_rec(["a", "dog"], [2.0, 0])], 2.0)]
    out = ex.explain(neurons)
    assert calls == [12] and [len(o) for o in out] == [3, 3]  # twice n drawn, n kept
    assert all(isinstance(t, str) and t and "\n" not in t for o in out for t in o)
    assert ex.explain(neurons) == out  # seeded


def test_lm_explainer_keeps_copies_of_the_worked_example_only_where_too_few_others():
    from dit_engine.generate import Generation

    eng = neuron_engine(seed=2)
    texts = iter(["Names of cities.", "verbs", "names of  cities", "the word cat", "names of cities.", "nouns",
                  "names of cities.", "names of cities.", "names of cities.", "x", "names of cities.", "y"])
    eng.generate = lambda prompts, **kw: [Generation([1], [], [], "stop", next(texts)) for _ in prompts]
    out = LMExplainer(eng, n_samples=3).explain([([_rec(["a"], [1.0])], 1.0), ([_rec(["b"], [1.0])], 1.0)])
    assert out == [["verbs", "the word cat", "nouns"], ["x", "y", "names of cities."]]


def test_random_baseline_gives_every_neuron_another_ones_explanations():
    expl = {(0, i): [f"e{i}"] for i in range(5)}
    rnd = random_baseline(expl, seed=3)
    assert set(rnd) == set(expl) and all(rnd[k] != expl[k] for k in expl)
    assert sorted(v[0] for v in rnd.values()) == sorted(v[0] for v in expl.values())
    with pytest.raises(ValueError, match="at least 2"):
        random_baseline({(0, 0): ["x"]})

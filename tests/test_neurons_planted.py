"""Planted neurons whose true behaviour is known: layer-0 neurons of the tiny model rebuilt to fire
on given tokens (test_neurons_world.plant_neurons). Through the whole loop (record with probes,
explain, simulate, score, over a run directory), the true explanation beats random ones.

What this proves: records, token alignment, explanation, simulation and pooled scoring fit
together, so a correct explanation scores high and a wrong one low. The simulator here is the
keyword simulator, which reads quoted tokens exactly: a random tiny model cannot read English, so
whether a *language model* simulator tells true from random explanations is left to the slow test
on the default model (test_true_explanations_beat_random_ones_with_the_default_model)."""

from __future__ import annotations

import json
import random
import re
import shutil

import numpy as np
import pytest
from test_neurons_world import NOUNS, PLANTED, VERBS, planted_record_run

from dit_engine.neurons import NeuronRecords, build_corpus
from dit_engine.neurons.explain import LMExplainer, TokenExplainer
from dit_engine.neurons.run import (EXPLANATIONS, SIMULATIONS, Split, explain_run, read_rows, score_run,
                                    simulate_run)
from dit_engine.neurons.simulate import KeywordSimulator, LMSimulator
from dit_engine.neurons.score import correlation


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    return planted_record_run(tmp_path_factory.mktemp("planted"), sentences=160, seed=1, top_k=10, sample_k=10)


def test_planted_neurons_record_their_tokens(planted_run):
    _, run = planted_run
    rec = NeuronRecords.load(run)
    for n, words in PLANTED.items():
        for r in rec.top(0, n):
            assert r.tokens[int(np.argmax(r.acts))] in words


def test_true_explanations_beat_random_ones_in_at_least_90_percent(planted_run):
    _, run = planted_run
    rec = NeuronRecords.load(run)
    split, sim, rng = Split(), KeywordSimulator(), random.Random(0)
    wins = total = 0
    for n, words in PLANTED.items():
        recs, _ = split.score_records(rec, 0, n)
        real = [r.acts for r in recs]
        true = correlation(real, sim.simulate([(_quoted(words), r.tokens) for r in recs]))
        for _ in range(5):
            other = tuple(rng.sample([w for w in NOUNS + VERBS], 2))
            while set(other) == set(words):
                other = tuple(rng.sample(NOUNS + VERBS, 2))
            fake = correlation(real, sim.simulate([(_quoted(other), r.tokens) for r in recs]))
            wins += true > fake
            total += 1
    assert total == 30 and wins / total >= 0.9


def _quoted(words):
    return "the tokens " + ", ".join(json.dumps(w) for w in words)


def test_the_whole_loop_over_a_run_directory(planted_run):
    _, run = planted_run
    explain_run(run, TokenExplainer(), progress=False)
    rows = read_rows(run / EXPLANATIONS)
    mine = {(r["layer"], r["neuron"]): r["explanations"][0] for r in rows if r["explainer"] == "tokens"}
    assert len(mine) == 48 and sum(r["explainer"] == "tokens-random" for r in rows) == 48
    for n, words in PLANTED.items():  # the token explainer names planted tokens, and only those
        named = set(re.findall(r'"(\w+)"', mine[(0, n)].split(" after ")[0]))
        assert named and named <= set(words), mine[(0, n)]
    simulate_run(run, KeywordSimulator(), progress=False)
    summary = score_run(run)
    scored = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    by = {(r["layer"], r["neuron"], r["explainer"]): r for r in scored}
    for n in PLANTED:
        # naming one of the two planted tokens (top records show mostly the stronger one) scores ~0.6-0.85
        assert by[(0, n, "tokens")]["correlation"] > 0.5
        assert by[(0, n, "tokens")]["correlation"] > by[(0, n, "tokens-random")]["correlation"]
    assert summary["tokens / keyword"]["layers"]["0"]["best"][0]["neuron"] in PLANTED
    assert summary["tokens / keyword"]["correlation"] > summary["tokens-random / keyword"]["correlation"]
    # rerunning a stage does nothing new
    before = (run / SIMULATIONS).read_text()
    explain_run(run, TokenExplainer(), progress=False)
    simulate_run(run, KeywordSimulator(), progress=False)
    assert (run / SIMULATIONS).read_text() == before and len(read_rows(run / EXPLANATIONS)) == 96


def test_lm_stages_on_the_tiny_model_resume_after_a_cut_line(planted_run, tmp_path):
    eng, run = planted_run
    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("explanations.jsonl", "simulations.jsonl", "scores.*"))
    explain_run(mine, LMExplainer(eng, n_samples=2, max_new_tokens=4, seed=0), per_layer=2, seed=1, progress=False)
    rows = read_rows(mine / EXPLANATIONS)
    assert len(rows) == 8 and all(len(r["explanations"]) == 2 for r in rows)  # 2 layers x 2, and the baseline
    sim = LMSimulator(eng.model, eng.tokenizer)
    simulate_run(mine, sim, explainers=["lm"], progress=False)
    (s,) = [r for r in read_rows(mine / SIMULATIONS)][:1]
    rec = NeuronRecords.load(mine)
    recs, kinds = Split().score_records(rec, s["layer"], s["neuron"])
    assert s["windows"] == [r.window for r in recs] and kinds == s["kinds"]
    want = sim.simulate([(rows[0]["explanations"][1], recs[2].tokens)])[0]
    np.testing.assert_allclose(s["sim"][1][2], want, atol=1e-5)
    # a kill mid-append leaves a cut last line: it is dropped and that neuron simulated again
    data = (mine / SIMULATIONS).read_bytes()
    (mine / SIMULATIONS).write_bytes(data[:-20])
    simulate_run(mine, sim, explainers=["lm"], progress=False)
    again = read_rows(mine / SIMULATIONS)
    assert len(again) == 4 and (mine / SIMULATIONS).read_bytes() == data
    assert set(score_run(mine)) == {"lm / lm"}


# ---- the default model as the simulator (slow) ----------------------------------------------------
# Synthetic neurons over the packaged corpus with SmolLM2's tokens: (what it fires on, explanation).
_REAL_PLANTED = {
    "the": (lambda t: t.strip().lower() == "the", 'the word "the".'),
    "punct": (lambda t: t.strip() in {".", ",", "?", "!"}, "punctuation marks: periods, commas and question marks."),
    "newline": (lambda t: t == "\n", "line breaks at the end of a sentence or a title."),
    "you": (lambda t: t.strip().lower() in {"you", "your"}, 'the words "you" and "your", addressing the reader.'),
    "and": (lambda t: t.strip().lower() in {"and", "or"}, 'the conjunctions "and" and "or".'),
}


@pytest.mark.slow
def test_true_explanations_beat_random_ones_with_the_default_model():
    """A language-model simulator (SmolLM2-135M-Instruct) tells a planted neuron's true explanation
    from another neuron's: pooled correlation on 3 records where it fires and 1 random one."""
    from dit_engine.engine import Engine
    from dit_engine.neurons import PACKAGED

    eng = Engine.load("default")
    corpus = build_corpus(eng.tokenizer, PACKAGED, context=32)
    sim = LMSimulator(eng.model, eng.tokenizer)
    rng = random.Random(0)
    names = list(_REAL_PLANTED)
    cases, items = [], []
    for name, (fires, true_expl) in _REAL_PLANTED.items():
        acts = [np.array([1.0 if fires(t) else 0.0 for t in toks]) for toks in corpus.tokens]
        firing = [i for i, a in enumerate(acts) if a.sum() > 0]
        windows = rng.sample(firing, 3) + [rng.randrange(corpus.n_windows)]
        others = [n for n in names if n != name]
        for expl in [true_expl] + [_REAL_PLANTED[o][1] for o in rng.sample(others, 3)]:
            cases.append((name, expl == true_expl, [acts[w] for w in windows]))
            items += [(expl, corpus.tokens[w]) for w in windows]
    sims = sim.simulate(items)
    score = {}
    for c, (name, is_true, real) in enumerate(cases):
        score.setdefault(name, {"true": None, "random": []})
        s = correlation(real, sims[4 * c:4 * c + 4])
        if is_true:
            score[name]["true"] = s
        else:
            score[name]["random"].append(s)
    wins = [s["true"] > r for s in score.values() for r in s["random"]]
    print({k: (round(v["true"], 3), [round(r, 3) for r in v["random"]]) for k, v in score.items()})
    assert sum(wins) / len(wins) >= 0.9, score


def test_neurons_explained_later_get_their_baseline_too(planted_run, tmp_path):
    _, run = planted_run
    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("explanations.jsonl", "simulations.jsonl", "scores.*"))
    explain_run(mine, TokenExplainer(), neurons=[(0, 3), (0, 7)], progress=False)
    explain_run(mine, TokenExplainer(), neurons=[(0, 3), (0, 7), (1, 0)], progress=False)
    rows = read_rows(mine / EXPLANATIONS)
    base = {(r["layer"], r["neuron"]): r["explanations"] for r in rows if r["explainer"] == "tokens-random"}
    own = {(r["layer"], r["neuron"]): r["explanations"] for r in rows if r["explainer"] == "tokens"}
    assert set(base) == set(own) == {(0, 3), (0, 7), (1, 0)} and len(rows) == 6
    assert all(base[k] != own[k] or list(own.values()).count(own[k]) > 1 for k in own)

"""The all-at-once simulator against one forward per position, its number tokens, and the keyword
simulator."""

from __future__ import annotations

import numpy as np
import pytest
from test_neurons_world import NOUNS, neuron_engine, neuron_tokenizer
from tiny_world import tiny_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dit_engine.model import Transformer
from dit_engine.neurons.simulate import (KeywordSimulator, LMSimulator, SimulatorError, escape_token,
                                         number_token_ids)
from dit_engine.tokenizer import Tokenizer
from conftest import tiny_config

ITEMS = [("words for animals .", ["the", "cat", "sees", "a", "dog", "."]),
         ("the tokens \" cat \" .", ["a", "small", "bird", "jumps", "over", "the", "old", "tree", ".", "the"]),
         ("nothing", ["river"]),
         ("the end of a sentence", ["stone", ",", "house", "and", "road", "near", "the", "cloud"])]


@pytest.fixture(scope="module")
def sim():
    eng = neuron_engine(seed=3)
    return LMSimulator(eng.model, eng.tokenizer, batch_tokens=300)


def test_all_at_once_equals_one_position_at_a_time(sim):
    got = sim.simulate(ITEMS)  # several batches (300-token budget), right padding inside each
    assert [g.shape for g in got] == [(len(t),) for _, t in ITEMS]
    for (expl, toks), g in zip(ITEMS, got):
        ref = sim.simulate_one_at_a_time(expl, toks)
        assert np.abs(g - ref).max() <= 1e-5
        assert ((g >= 0) & (g <= 10)).all()
    # one big batch gives the same numbers as small ones
    big = LMSimulator(sim.model, sim.tokenizer, batch_tokens=100_000).simulate(ITEMS)
    for a, b in zip(got, big):
        assert np.abs(a - b).max() <= 1e-5
    # the explanation changes the simulation (the prompt carries it)
    other = sim.simulate([("something else entirely", ITEMS[0][1])])[0]
    assert np.abs(other - got[0]).max() > 1e-6


def test_distributions_are_renormalised_over_the_number_tokens(sim):
    (p,) = sim.distributions(ITEMS[:1])
    assert p.shape == (6, 11)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(sim.simulate(ITEMS[:1])[0], p @ np.arange(11), atol=1e-12)


def test_the_prompt_reads_the_token_before_each_unknown(sim):
    ids, read = sim.prompt("x", ["cat", "dog"])
    unknown = sim.tokenizer.encode("unknown")
    assert len(read) == 2
    for pos in read:
        assert ids[pos + 1:pos + 1 + len(unknown)] == unknown
    assert [sim.tokenizer.decode([ids[p]]) for p in read] == ["cat", "dog"]  # the tab encodes to nothing here


def _digits_split_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["<pad>", "[UNK]", *map(str, range(10)), "unknown", *NOUNS])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.Whitespace()])
    return Tokenizer(hf, None, {}, [0], source="digits-split")


def test_a_tokenizer_without_a_single_10_uses_the_scale_0_to_9():
    tok = _digits_split_tokenizer()
    assert len(tok.encode("10")) == 2 and len(number_token_ids(tok)) == 10
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, max_position_embeddings=1024)
    s = LMSimulator(Transformer.random(cfg, seed=1), tok)
    assert s.top == 9
    (p,) = s.distributions([("x", ["cat", "dog", "fish"])])
    assert p.shape == (3, 10)
    np.testing.assert_allclose(s.simulate([("x", ["cat", "dog", "fish"])])[0], p @ np.arange(10) * 10 / 9, atol=1e-12)
    assert np.abs(s.simulate([("x", ["cat", "dog"])])[0] - s.simulate_one_at_a_time("x", ["cat", "dog"])).max() <= 1e-5


def test_tokenizers_without_number_tokens_are_refused():
    with pytest.raises(SimulatorError, match=r"the numbers 0..10 share token ids"):
        number_token_ids(tiny_tokenizer())  # every number is its unknown token
    hf = HFTokenizer(models.BPE({"a": 0, "b": 1}, [], unk_token=None))
    with pytest.raises(SimulatorError, match="'0' encodes to 0 tokens"):
        number_token_ids(Tokenizer(hf, None, {}, [0], source="letters"))


def test_a_prompt_past_the_context_is_one_clear_error():
    tok = neuron_tokenizer()
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, max_position_embeddings=128)
    s = LMSimulator(Transformer.random(cfg), tok)
    with pytest.raises(SimulatorError, match=r"exceeds the simulator's context of 128"):
        s.simulate([("x", ["cat"] * 200)])


def test_token_text_stays_on_its_line():
    assert escape_token("a\nb\tc\\") == "a\\nb\\tc\\\\"


def test_keyword_simulator_reads_quoted_tokens():
    k = KeywordSimulator()
    (a, b) = k.simulate([('the tokens "Cat", "dog", mostly right after "the".', [" the", " cat", "dog", "the", "é"]),
                         ('the tokens "é" and "\\u00e9t\\u00e9".', ["é", "été", "cat"])])
    assert a.tolist() == [0, 10, 10, 0, 0] and b.tolist() == [10, 10, 0]
    assert k.simulate([("nothing quoted", ["cat"])])[0].tolist() == [0]

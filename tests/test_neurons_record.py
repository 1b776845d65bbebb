"""Recording every neuron at once: the streaming top-k and random samples against a brute-force
reference over the whole corpus, probes against plain hooks, resume after a kill or a signal, and
the corpus builder (sources, deduplication, windows)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from test_neurons_world import corpus_text, neuron_engine, neuron_tokenizer

from dit_engine.jobs import JobInterrupted
from dit_engine.neurons import (PACKAGED, Corpus, CorpusError, NeuronRecords, RecordConfig, RecordError,
                                build_corpus, documents, mlp_activations, parse_layers, record_neurons)
from dit_engine.neurons.record import Recorder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    eng = neuron_engine()
    text = tmp_path_factory.mktemp("c") / "corpus.txt"
    text.write_text(corpus_text(120))
    return eng, build_corpus(eng.tokenizer, text, context=16)


def _all_acts(eng, corpus) -> np.ndarray:
    """[N, T, L*F]-free reference: every window's activations, one hook forward: {layer: [N, T, F]}."""
    layers = list(range(eng.config.num_hidden_layers))
    with torch.no_grad():
        return {k: v.numpy() for k, v in mlp_activations(eng.model, corpus.ids, layers, via="hooks").items()}


def test_probes_capture_what_plain_hooks_capture(world):
    eng, corpus = world
    ids = corpus.ids[:5]
    with torch.no_grad():
        a = mlp_activations(eng.model, ids, [0, 1])
        b = mlp_activations(eng.model, ids, [0, 1], via="hooks")
    for layer in (0, 1):
        assert a[layer].shape == (5, 16, eng.config.intermediate_size)
        torch.testing.assert_close(a[layer], b[layer], rtol=0, atol=0)


def test_streaming_top_k_equals_a_sort_over_the_whole_corpus(world, tmp_path):
    eng, corpus = world
    rec = record_neurons(eng.model, corpus, tmp_path / "run", RecordConfig(top_k=6, sample_k=4, batch_size=5),
                         progress=False)
    ref = _all_acts(eng, corpus)
    assert rec.complete and rec.windows_done == corpus.n_windows
    for layer in (0, 1):
        wmax = ref[layer].max(1)  # [N, F]
        for n in range(eng.config.intermediate_size):
            top = rec.top(layer, n)
            want = np.argsort(-wmax[:, n], kind="stable")[:6]
            np.testing.assert_allclose([r.max for r in top], wmax[want, n], rtol=1e-6)
            assert {r.window for r in top} == set(want.tolist()) or np.allclose(
                sorted(wmax[[r.window for r in top], n]), sorted(wmax[want, n]))  # ties may swap windows
            for r in top:
                np.testing.assert_allclose(r.acts, ref[layer][r.window, :, n], rtol=1e-6, atol=1e-7)
                assert r.tokens == corpus.tokens[r.window]
            assert rec.max_activation(layer, n) == pytest.approx(wmax[:, n].max(), rel=1e-6)
        st = rec.stats(layer)
        np.testing.assert_allclose(st["mean"], ref[layer].mean((0, 1)), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(st["density"], (ref[layer] > 0).mean((0, 1)), rtol=1e-9)


def test_random_sample_is_uniform_distinct_and_independent_of_batch_size(world, tmp_path):
    eng, corpus = world
    a = record_neurons(eng.model, corpus, tmp_path / "a", RecordConfig(top_k=2, sample_k=8, batch_size=3, seed=4),
                       progress=False)
    b = record_neurons(eng.model, corpus, tmp_path / "b", RecordConfig(top_k=2, sample_k=8, batch_size=7, seed=4),
                       progress=False)
    ref = _all_acts(eng, corpus)
    counts = np.zeros(corpus.n_windows)
    for layer, n in a.neurons():
        sa, sb = a.sample(layer, n), b.sample(layer, n)
        assert [r.window for r in sa] == [r.window for r in sb]
        wins = [r.window for r in sa]
        assert len(wins) == 8 and len(set(wins)) == 8
        for r in sa:
            np.testing.assert_allclose(r.acts, ref[layer][r.window, :, n], rtol=1e-6, atol=1e-7)
        counts[wins] += 1
    # 48 neurons x 8 of N windows: neither half of the corpus is favoured (a "keep the first" bug is)
    half = corpus.n_windows // 2
    share = counts[:half].sum() / counts.sum()
    assert abs(share - half / corpus.n_windows) < 0.12
    bins = a.quantiles(0, 3, 4)
    assert sum(len(q) for q in bins) == 8
    assert max(r.max for r in bins[0]) <= min(r.max for r in bins[-1])
    c = record_neurons(eng.model, corpus, tmp_path / "c", RecordConfig(top_k=2, sample_k=8, batch_size=3, seed=5),
                       progress=False)
    assert any([r.window for r in c.sample(*k)] != [r.window for r in a.sample(*k)] for k in a.neurons())


def test_chosen_layers_only(world, tmp_path):
    eng, corpus = world
    rec = record_neurons(eng.model, corpus, tmp_path / "r", RecordConfig(layers=(1,), top_k=3, sample_k=2),
                         progress=False)
    assert rec.layers == [1] and len(rec.neurons()) == eng.config.intermediate_size
    with pytest.raises(RecordError, match="no neuron 0/0"):
        rec.top(0, 0)
    with pytest.raises(RecordError, match=r"layers \[2\]"):
        record_neurons(eng.model, corpus, tmp_path / "bad", RecordConfig(layers=(2,)), progress=False)
    assert parse_layers("0-1", 2) == (0, 1) and parse_layers("all", 2) is None and parse_layers("1,0,1", 2) == (1, 0)
    with pytest.raises(RecordError, match="this model has layers 0 .. 1"):
        parse_layers("0,5", 2)


def _tensors(run):
    return NeuronRecords.load(run).t


def test_a_killed_run_resumes_to_the_same_records(world, tmp_path, monkeypatch):
    eng, corpus = world
    cfg = RecordConfig(top_k=4, sample_k=3, batch_size=4, checkpoint_every_s=0)
    full = _tensors(record_neurons(eng.model, corpus, tmp_path / "full", cfg, progress=False).run)
    calls = {"n": 0}
    real = Recorder.update

    def dies_on_the_fourth(self, acts, start):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        real(self, acts, start)

    monkeypatch.setattr(Recorder, "update", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        record_neurons(eng.model, corpus, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(Recorder, "update", real)
    part = NeuronRecords.load(tmp_path / "cut")
    assert part.windows_done == 12 and not part.complete
    seen = []
    monkeypatch.setattr(Recorder, "update", lambda self, acts, start: (seen.append(start), real(self, acts, start)))
    resumed = _tensors(record_neurons(eng.model, corpus, tmp_path / "cut", cfg, progress=False).run)
    assert seen[0] == 12  # nothing recorded twice
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_sigterm_checkpoints_and_a_rerun_finishes(world, tmp_path, monkeypatch):
    eng, corpus = world
    cfg = RecordConfig(top_k=3, sample_k=2, batch_size=5, checkpoint_every_s=3600)
    real = Recorder.update

    def signal_once(self, acts, start):
        real(self, acts, start)
        if start == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Recorder, "update", signal_once)
    with pytest.raises(JobInterrupted, match="run the same command again to resume"):
        record_neurons(eng.model, corpus, tmp_path / "r", cfg, progress=False)
    assert NeuronRecords.load(tmp_path / "r").windows_done == 10  # saved at the safe point after the signal
    monkeypatch.setattr(Recorder, "update", real)
    done = record_neurons(eng.model, corpus, tmp_path / "r", cfg, progress=False)
    ref = record_neurons(eng.model, corpus, tmp_path / "ref", cfg, progress=False)
    assert done.complete and all(torch.equal(done.t[k], ref.t[k]) for k in ref.t)


def test_resume_with_another_config_or_a_corrupt_file_is_one_clear_error(world, tmp_path):
    eng, corpus = world
    run = tmp_path / "r"
    record_neurons(eng.model, corpus, run, RecordConfig(top_k=3, sample_k=2), progress=False)
    with pytest.raises(RecordError, match="holds a record run with other config"):
        record_neurons(eng.model, corpus, run, RecordConfig(top_k=4, sample_k=2), progress=False)
    other = neuron_engine(seed=1)
    with pytest.raises(RecordError, match="other model"):
        record_neurons(other.model, corpus, run, RecordConfig(top_k=3, sample_k=2), progress=False)
    data = (run / "records.safetensors").read_bytes()
    (run / "records.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match="unreadable or truncated") as e:
        NeuronRecords.load(run)
    assert "\n" not in str(e.value)
    (run / "windows.jsonl").write_text('{"window": 0, "tokens": ["a"]}\n')
    with pytest.raises(CorpusError, match="disagree"):
        Corpus.load(run)


def test_nan_activations_are_refused(world):
    eng, corpus = world
    rec = Recorder([0], 4, 16, RecordConfig(top_k=2, sample_k=2))
    acts = torch.zeros(2, 16, 4)
    acts[1, 3, 2] = float("nan")
    with pytest.raises(RecordError, match="non-finite activations in windows 0..1"):
        rec.update({0: acts}, 0)
    with pytest.raises(RecordError, match=r"expected \[B, 16, 4\]"):
        rec.update({0: torch.zeros(2, 15, 4)}, 0)


# ---- the corpus ----------------------------------------------------------------------------------
def test_corpus_from_a_file_is_deduplicated_and_windowed(tmp_path):
    tok = neuron_tokenizer()
    f = tmp_path / "t.txt"
    f.write_text("the cat sees a dog .\n\nThe  cat sees a DOG .\n\nthe bird jumps near the tree .\n\n"
                 "the cat sees a dog .\n")
    assert documents(f) == ["the cat sees a dog .", "The  cat sees a DOG .", "the bird jumps near the tree .",
                            "the cat sees a dog ."]
    c = build_corpus(tok, f, context=4)
    assert c.info["documents"] == 2 and c.info["duplicate_documents"] == 2
    stream = tok.encode("the cat sees a dog .") + tok.encode("the bird jumps near the tree .")  # "\n" encodes to nothing
    assert c.ids.tolist() == [stream[i:i + 4] for i in range(0, len(stream) - 3, 4)]
    assert c.tokens[0] == ["the", "cat", "sees", "a"]
    c.save(tmp_path / "run")
    back = Corpus.load(tmp_path / "run")
    assert torch.equal(back.ids, c.ids) and back.tokens == c.tokens and back.info == c.info
    lines = tmp_path / "l.txt"
    lines.write_text("the cat\nthe dog\nthe cat\n")
    assert documents(lines) == ["the cat", "the dog", "the cat"]
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "the cat"}\n\n{"text": "the dog"}\n')
    assert documents(j) == ["the cat", "the dog"]
    rep = tmp_path / "rep.txt"
    rep.write_text("the cat sees a\n\n" * 1 + "the cat sees a dog\n\nthe cat sees a\n")
    assert build_corpus(tok, rep, context=4).info["duplicate_windows"] == 1


def test_bad_corpus_sources_are_one_clear_error(tmp_path):
    tok = neuron_tokenizer()
    with pytest.raises(CorpusError, match="not found"):
        documents(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="holds no text"):
        documents(tmp_path / "e.txt")
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(CorpusError, match='line 2 is not a JSON object with a string "text"'):
        documents(tmp_path / "b.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorpusError, match="not UTF-8"):
        documents(tmp_path / "bin.txt")
    (tmp_path / "s.txt").write_text("the cat\n")
    with pytest.raises(CorpusError, match="make no window of 64 tokens"):
        build_corpus(tok, tmp_path / "s.txt", context=64)


def test_the_packaged_corpus_exists_offline():
    docs = documents(PACKAGED)
    assert len(docs) > 800 and all(isinstance(d, str) and d.strip() for d in docs)
    assert any("headline" not in d and len(d.split()) > 20 for d in docs)  # persona prompts: real prose
    c = build_corpus(neuron_tokenizer(), PACKAGED, context=32, max_windows=50)
    assert c.n_windows == 50 and c.info["source"] == PACKAGED

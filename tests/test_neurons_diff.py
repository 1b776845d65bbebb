"""Neurons a finetune moved: the shift against a model with the diff merged into its weights, the
ranking on a planted diff, the record run of base + diff, the viewer, and `dit neurons diff`."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from cli_world import write_peft_dir, write_tiny_model
from test_neurons_world import corpus_text, neuron_engine

from dit_engine.cli import main
from dit_engine.neurons import RecordConfig, RecordError, build_corpus, mlp_activations
from dit_engine.neurons.diff import moved_run, neuron_shift, read_moved
from dit_engine.neurons.explain import TokenExplainer
from dit_engine.neurons.run import EXPLANATIONS, explain_run, read_rows
from dit_engine.neurons.viewer import write_viewer
from dit_engine.zoo.format import Diff

UP = "model.layers.0.mlp.up_proj"
NEURON = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    eng = neuron_engine(seed=4)
    d = tmp_path_factory.mktemp("diff")
    (d / "c.txt").write_text(corpus_text(80, seed=3))
    corpus = build_corpus(eng.tokenizer, d / "c.txt", context=16)
    g = torch.Generator().manual_seed(0)
    h, f = eng.config.hidden_size, eng.config.intermediate_size
    b = torch.zeros(f, 1)
    b[NEURON, 0] = 1.0
    diff = Diff("planted", A={UP: torch.randn(1, h, generator=g)}, B={UP: b}, scale=2.0)
    merged = copy.deepcopy(eng.model)
    with torch.no_grad():
        merged.model.layers[0].mlp.up_proj.weight += 2.0 * b @ diff.A[UP]
    return eng, corpus, diff, merged, d


def test_the_shift_equals_a_model_with_the_diff_merged(world):
    eng, corpus, diff, merged, _ = world
    shift = neuron_shift(eng.model, diff, corpus, batch_size=7, progress=False)
    with torch.no_grad():
        base = mlp_activations(eng.model, corpus.ids, [0, 1], via="hooks")
        tuned = mlp_activations(merged, corpus.ids, [0, 1], via="hooks")
    for j in (0, 1):
        delta = (tuned[j] - base[j]).double().numpy()
        np.testing.assert_allclose(shift.abs_shift[j], np.abs(delta).mean((0, 1)), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(shift.shift[j], delta.mean((0, 1)), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(shift.base_abs[j], np.abs(base[j].double().numpy()).mean((0, 1)), rtol=1e-6)
    others = np.delete(shift.abs_shift[0], NEURON)
    assert np.all(others == 0.0) and shift.abs_shift[0, NEURON] > 0  # only the planted row of layer 0 moved
    top = shift.ranked(3)
    assert (top[0]["layer"], top[0]["neuron"]) == (0, NEURON)
    assert top[0]["abs_shift"] >= top[1]["abs_shift"] >= top[2]["abs_shift"]


def test_moved_run_records_base_plus_diff_and_the_viewer_shows_them_first(world):
    eng, corpus, diff, merged, d = world
    rec = moved_run(eng.model, diff, corpus, d / "run", RecordConfig(top_k=4, sample_k=3), top=4, progress=False)
    assert rec.meta["diff"]["id"] == "planted"
    moved = read_moved(d / "run")
    assert len(moved) == 4 and (moved[0]["layer"], moved[0]["neuron"]) == (0, NEURON)
    with torch.no_grad():
        tuned = mlp_activations(merged, corpus.ids, [0], via="hooks")[0].numpy()
    for r in rec.top(0, NEURON):
        np.testing.assert_allclose(r.acts, tuned[r.window, :, NEURON], rtol=1e-4, atol=1e-6)
    with pytest.raises(RecordError, match="other diff"):
        from dit_engine.neurons import record_neurons
        record_neurons(eng.model, corpus, d / "run", RecordConfig(top_k=4, sample_k=3), progress=False)
    explain_run(d / "run", TokenExplainer(), neurons=[(m["layer"], m["neuron"]) for m in moved], progress=False)
    rows = read_rows(d / "run" / EXPLANATIONS)
    assert {(r["layer"], r["neuron"]) for r in rows if r["explainer"] == "tokens"} == {(m["layer"], m["neuron"])
                                                                                      for m in moved}
    with pytest.raises(RecordError, match="no neuron 0/999"):
        explain_run(d / "run", TokenExplainer(), neurons=[(0, 999)], progress=False)

    class P(HTMLParser):
        moved, sections = [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and a.get("class") == "moved":
                self.moved.append((int(a["data-layer"]), int(a["data-neuron"])))
            if tag == "section":
                self.sections.append((int(a["data-layer"]), int(a["data-neuron"])))

    p = P()
    p.feed(write_viewer(d / "run", per_layer=2).read_text())
    assert p.moved == [(m["layer"], m["neuron"]) for m in moved]
    assert p.sections[0] == (0, NEURON) and set(p.moved) <= set(p.sections)


def _dit(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(map(str, argv)))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_dit_neurons_diff_then_explain_moved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = write_tiny_model(tmp_path / "m")
    write_peft_dir(tmp_path / "lora", model, seed=2)
    (tmp_path / "c.txt").write_text(corpus_text(40))
    code, out, err = _dit("neurons", "diff", "--model", model, "--peft", "lora", "--out", "ft", "--corpus", "c.txt",
                          "--context", "8", "--top", "6", "--json")
    assert code == 0, err
    moved = json.loads(out)
    assert len(moved) == 6 and moved == read_moved(tmp_path / "ft")
    assert all(a["abs_shift"] >= b["abs_shift"] for a, b in zip(moved, moved[1:]))
    code, out, err = _dit("neurons", "explain", "--run", "ft", "--moved", "--json")
    assert code == 0 and json.loads(out)["neurons"] == 6
    code, _, err = _dit("neurons", "explain", "--run", "nope", "--moved")
    assert code == 1
    code, _, err = _dit("neurons", "diff", "--model", model, "--zoo", "z", "--out", "x")
    assert code == 2 and "--zoo and --id go together" in err

"""The viewer page, parsed with the standard library's html.parser: self-contained, every shown
neuron with its explanation, score and records, tokens shaded by their recorded activation."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from test_neurons_world import PLANTED, planted_record_run

from dit_engine.neurons import NeuronRecords
from dit_engine.neurons.explain import TokenExplainer
from dit_engine.neurons.run import explain_run, score_run, simulate_run
from dit_engine.neurons.simulate import KeywordSimulator
from dit_engine.neurons.viewer import write_viewer


class Page(HTMLParser):
    """Neurons (attrs, explanation texts, records of (kind, [(token, data-act, alpha)])) and any external reference."""

    def __init__(self):
        super().__init__()
        self.neurons, self.external, self.stack, self.scores = [], [], [], []
        self._tok = self._expl = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("#"):
                self.external.append(a[key])
        if tag in ("script", "link", "iframe", "img"):
            self.external.append(tag)
        cls = a.get("class", "")
        if tag == "section" and cls == "neuron":
            self.neurons.append({"attrs": a, "expl": {}, "records": []})
        elif tag == "p" and cls == "expl":
            self._expl = [a["data-explainer"], ""]
        elif tag == "div" and cls == "rec":
            self.neurons[-1]["records"].append((a["data-kind"], int(a["data-window"]), []))
        elif tag == "span" and cls == "tok":
            alpha = float(a["style"].rsplit(",", 1)[1].strip(" )"))
            self._tok = [float(a["data-act"]), alpha, ""]
        if "data-score" in a:
            self.scores.append(float(a["data-score"]))

    def handle_data(self, data):
        if self._tok is not None:
            self._tok[2] += data
        if self._expl is not None:
            self._expl[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._tok is not None:
            act, alpha, text = self._tok
            self.neurons[-1]["records"][-1][2].append((text, act, alpha))
            self._tok = None
        if tag == "p" and self._expl is not None:
            self.neurons[-1]["expl"][self._expl[0]] = self._expl[1]
            self._expl = None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return planted_record_run(tmp_path_factory.mktemp("view"), sentences=100, seed=2, top_k=6, sample_k=4,
                              extra_text="\n\nthe <b>cat</b> & \"dog\" .\n")[1]


def _parse(path):
    p = Page()
    p.feed(path.read_text())
    return p


def test_before_explaining_it_shows_the_strongest_neurons_with_shaded_records(run):
    page = _parse(write_viewer(run, per_layer=3, n_top=2, n_random=1))
    rec = NeuronRecords.load(run)
    assert page.external == [] and len(page.neurons) == 6
    for layer in (0, 1):
        shown = [int(n["attrs"]["data-neuron"]) for n in page.neurons if n["attrs"]["data-layer"] == str(layer)]
        mx = rec.stats(layer)["max"]
        assert shown == list(np.argsort(-mx, kind="stable")[:3])
    for n in page.neurons:
        layer, neuron = int(n["attrs"]["data-layer"]), int(n["attrs"]["data-neuron"])
        assert [k for k, _, _ in n["records"]] == ["top", "top", "random"]
        top = rec.top(layer, neuron)
        for (kind, window, toks), want in zip(n["records"], top[:2]):
            assert window == want.window and [t for t, _, _ in toks] == want.tokens
            np.testing.assert_allclose([a for _, a, _ in toks], want.acts, rtol=1e-3, atol=1e-6)
            mx = rec.max_activation(layer, neuron)
            np.testing.assert_allclose([s for _, _, s in toks], np.clip(np.maximum(want.acts, 0) / mx, 0, 1), atol=2e-3)


def test_after_scoring_neurons_come_best_first_with_their_explanation_and_score(run):
    explain_run(run, TokenExplainer(), progress=False)
    simulate_run(run, KeywordSimulator(), progress=False)
    score_run(run)
    page = _parse(write_viewer(run, per_layer=4))
    scores = {(r["layer"], r["neuron"], r["explainer"]): r
              for r in map(json.loads, (run / "scores.jsonl").read_text().splitlines())}
    layer0 = [n for n in page.neurons if n["attrs"]["data-layer"] == "0"]
    shown = [int(n["attrs"]["data-neuron"]) for n in layer0]
    corr = [scores[(0, n, "tokens")]["correlation"] for n in shown]
    assert corr == sorted(corr, reverse=True) and set(shown) & set(PLANTED)
    for n in layer0:
        neuron = int(n["attrs"]["data-neuron"])
        s = scores[(0, neuron, "tokens")]
        assert n["expl"]["tokens"].startswith(f"tokens: {s['best_explanation']}")
        assert f"correlation {s['correlation']:.3f}" in n["expl"]["tokens"]
        assert "tokens-random" in n["expl"]
    assert len(page.scores) > 8  # the summary table and every shown explanation


def test_tokens_are_escaped():
    from dit_engine.neurons import Record
    from dit_engine.neurons.viewer import _record

    html = _record(Record(3, ["<b>", '&"x', "ok"], np.array([1.0, -0.5, 0.25])), 1.0, "top")
    p = Page()
    p.neurons.append({"attrs": {}, "expl": {}, "records": []})
    p.feed(html)
    (kind, window, toks), = p.neurons[0]["records"]
    assert (kind, window) == ("top", 3) and [t for t, _, _ in toks] == ["<b>", '&"x', "ok"]
    assert [s for _, _, s in toks] == [1.0, 0.0, 0.25] and "<b>" not in html

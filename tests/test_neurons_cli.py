"""`dit neurons ...`: bad input ends in one error line naming what is wrong; a rerun resumes."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from cli_world import write_tiny_model
from test_neurons_world import corpus_text, write_neuron_model

from dit_engine.cli import main


def _dit(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(map(str, argv)))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ncli")
    (d / "c.txt").write_text(corpus_text(60))
    return d, write_tiny_model(d / "tiny"), write_neuron_model(d / "nm")


def test_bad_input_is_one_error_line(world, monkeypatch):
    d, tiny, nm = world
    monkeypatch.chdir(d)
    code, _, err = _dit("neurons", "explain", "--run", "nowhere")
    assert code == 1 and err == "dit neurons explain: error: nowhere/records.json: not found (expected a neuron record run)"
    code, _, err = _dit("neurons", "record", "--model", tiny, "--out", "r", "--layers", "9")
    assert code == 1 and err == "dit neurons record: error: layers '9': this model has layers 0 .. 1"
    code, _, err = _dit("neurons", "record", "--model", tiny, "--out", "r", "--corpus", "missing.txt")
    assert code == 1 and err.startswith("dit neurons record: error: missing.txt: not found")
    code, _, err = _dit("neurons", "record", "--model", tiny, "--out", "r", "--top-k", "0")
    assert code == 2 and "argument --top-k: 0 is not a positive integer" in err
    code, _, err = _dit("neurons", "record", "--model", nm, "--out", "r", "--corpus", "c.txt", "--context", "8")
    assert code == 0
    code, _, err = _dit("neurons", "score", "--run", "r")
    assert code == 1 and err.endswith("r/simulations.jsonl: no simulations to score (run 'dit neurons simulate' first)")
    code, _, err = _dit("neurons", "simulate", "--run", "r", "--simulator", "keyword")
    assert code == 1 and "no explanations to simulate" in err
    assert _dit("neurons", "explain", "--run", "r")[0] == 0
    code, _, err = _dit("neurons", "simulate", "--run", "r", "--model", tiny)
    assert code == 1 and err.startswith("dit neurons simulate: error: simulator tokenizer") and "share token ids" in err
    code, _, err = _dit("neurons", "record", "--model", nm, "--out", "r", "--corpus", "c.txt", "--context", "8",
                        "--top-k", "3")
    assert code == 1 and "holds a record run with other config" in err
    (d / "r" / "explanations.jsonl").write_text('{"layer": 0}\nnot json\n')
    code, _, err = _dit("neurons", "simulate", "--run", "r", "--simulator", "keyword")
    assert code == 1 and err.endswith("r/explanations.jsonl: line 2 is not JSON (Expecting value); delete the file to "
                                      "redo that stage")


def test_the_json_outputs(world, monkeypatch):
    d, _, nm = world
    monkeypatch.chdir(d)
    code, out, _ = _dit("neurons", "record", "--model", nm, "--out", "j", "--corpus", "c.txt", "--context", "8",
                        "--layers", "1", "--json")
    desc = json.loads(out)
    assert code == 0 and desc["layers"] == [1] and desc["windows_done"] == desc["windows"] > 0
    out = _dit("neurons", "explain", "--run", "j", "--json")[1]
    assert json.loads(out) == {"explanations": "j/explanations.jsonl", "explainer": "tokens", "neurons": 24}
    out = _dit("neurons", "simulate", "--run", "j", "--simulator", "keyword", "--json")[1]
    assert json.loads(out) == {"simulations": "j/simulations.jsonl", "simulator": "keyword", "rows": 48}
    assert set(json.loads(_dit("neurons", "score", "--run", "j", "--json")[1])) == {"tokens / keyword",
                                                                                  "tokens-random / keyword"}
    assert json.loads(_dit("neurons", "view", "--run", "j", "--json")[1]) == {"viewer": "j/viewer.html"}


def test_the_pipeline_spreads_its_layers_over_the_depth():
    from dit_engine.neurons.pipeline import spaced_layers

    assert spaced_layers(30, 6) == (0, 6, 12, 17, 23, 29)
    assert spaced_layers(2, 6) == (0, 1) and spaced_layers(5, None) == (0, 1, 2, 3, 4) and spaced_layers(7, 1) == (0,)
    for n_model, n in ((30, 6), (24, 5), (12, 4), (36, 7)):
        got = spaced_layers(n_model, n)
        gaps = [b - a for a, b in zip(got, got[1:])]
        assert len(got) == n and got[0] == 0 and got[-1] == n_model - 1 and max(gaps) - min(gaps) <= 1


def test_a_pipeline_that_cannot_start_leaves_nothing_behind(world, monkeypatch):
    d, tiny, nm = world
    monkeypatch.chdir(d)
    code, _, err = _dit("neurons", "pipeline", "--model", nm, "--out", "p-bad", "--corpus", "missing.txt")
    assert code == 1 and err.startswith("dit neurons pipeline: error: missing.txt: not found")
    assert not (d / "p-bad").exists()

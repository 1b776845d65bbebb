"""Neurons as FIND functions, in the planted world (test_neurons_world): layer-0 neurons rebuilt to
fire on known tokens. The suite's ground truth names those tokens; scoring by keyword simulation
on held-out records gives the ground truth 1.0, a constant answer 0 correlation and a wrong
neuron's tokens less; the search agent, seeing the neurons only through their black boxes, finds
the planted tokens; `dit find generate --neurons` / `run` / `score` / `report` type it through
the CLI, and the wrong model or an unfinished record run is one error line."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from test_neurons_world import PLANTED, corpus_text, planted_record_run

from dit_engine.checkpoint import save_checkpoint
from dit_engine.cli import main
from dit_engine.find import (NEURON_CORRECT, SearchAgent, constant_answers, load_suite, neuron_boxes,
                             neuron_functions, reference_answers, score_answers)
from dit_engine.find.score import Answer
from dit_engine.neurons.score import correlation


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("find-neurons")
    eng, run = planted_record_run(d, sentences=160, seed=1, top_k=10, sample_k=10)
    (d / "probe.txt").write_text(corpus_text(60, seed=7))  # other sentences of the same words
    return d, eng, run


def _dit(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(map(str, argv)))
        except SystemExit as e:
            code = e.code
    raw = err.getvalue()  # progress bars clear their line (\r) before the error line starts its own
    lines = [x for x in re.split(r"[\r\n]", raw) if x.startswith("dit ")]
    return code, out.getvalue(), lines[-1] if lines else raw


def test_the_ground_truth_names_the_planted_tokens_and_its_held_out_records_are_the_recorded_ones(planted):
    _, _, run = planted
    fns = {f.id: f for f in neuron_functions(run, per_layer=24)}
    for n, words in PLANTED.items():
        f = fns[f"neuron/0/{n}"]
        assert f.kind == "neuron" and f.category == "model/neuron" and f.code == ""
        named = f.description.split(" after ")[0]
        assert any(f'"{w}"' in named for w in words), f.description
        held = f.spec["held_out"]
        assert [h["kind"] for h in held] == ["top"] * 5 + ["random"] * 5
        top = held[0]
        assert top["tokens"][int(np.argmax(top["acts"]))] in words  # the record's peak is a planted token
    # every neuron kept is explained by its ground truth to at least the floor
    assert all(f.spec["reference_correlation"] >= 0.3 for f in fns.values())


def test_scoring_gives_the_truth_1_a_constant_0_and_another_neurons_tokens_less(planted):
    _, _, run = planted
    fns = [f for f in neuron_functions(run, per_layer=24) if f.spec["layer"] == 0 and f.spec["neuron"] in PLANTED]
    truth = score_answers(fns, reference_answers(fns))
    assert all(r["correct"] and r["correlation"] == pytest.approx(r["reference_correlation"]) for r in truth)
    zero = score_answers(fns, constant_answers(fns))
    assert all(not r["correct"] and r["correlation"] == 0.0 for r in zero)
    # each neuron described by another planted neuron's tokens: far below its own
    words = list(PLANTED.values())
    swapped = {f.id: Answer(id=f.id, description=", ".join(f'"{w}"' for w in words[(i + 1) % len(words)]))
               for i, f in enumerate(fns)}
    rows = score_answers(fns, swapped)
    assert all(not r["correct"] and r["correlation"] < NEURON_CORRECT * r["reference_correlation"] for r in rows)
    # the correlation is the neuron room's, on the held-out records
    f = fns[0]
    real = [np.array(h["acts"]) for h in f.spec["held_out"]]
    own = set(PLANTED[f.spec["neuron"]])
    sim = [np.array([10.0 if t in own else 0.0 for t in h["tokens"]]) for h in f.spec["held_out"]]
    mine = score_answers([f], {f.id: Answer(id=f.id, description=" and ".join(f'"{w}"' for w in own))})[0]
    assert mine["correlation"] == pytest.approx(correlation(real, sim))
    assert score_answers([f], {})[0]["correct"] is False  # no answer: wrong


def test_the_search_agent_finds_the_planted_tokens_through_the_black_box(planted):
    d, eng, run = planted
    fns = [f for f in neuron_functions(run, per_layer=24) if f.spec["layer"] == 0 and f.spec["neuron"] in PLANTED]
    agent = SearchAgent(probe_corpus=str(d / "probe.txt"))
    boxes = neuron_boxes(eng, fns, budget=agent.budget)
    answers = {a.id: a for a in agent.run(boxes)}
    for f in fns:
        a = answers[f.id]
        named = {w.strip('"') for w in a.description.removeprefix("the tokens ").rstrip(".").split(", ")}
        assert named & set(PLANTED[f.spec["neuron"]]), (f.id, a.description)
        assert 0 < a.calls <= agent.budget and a.calls == boxes[fns.index(f)].calls
    rows = score_answers(fns, answers)
    assert all(r["correct"] for r in rows), rows


def test_neuron_boxes_refuse_another_model(planted):
    from test_neurons_world import neuron_engine

    _, _, run = planted
    fns = neuron_functions(run, per_layer=1)
    with pytest.raises(ValueError, match="is a neuron of .* but the model given is"):
        neuron_boxes(neuron_engine(seed=3), fns)


def test_an_unfinished_or_diffed_record_run_is_refused(planted, tmp_path):
    _, _, run = planted
    part = tmp_path / "part"
    shutil.copytree(run, part)
    meta = json.loads((part / "records.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(part / "records.safetensors")
    from safetensors import safe_open

    with safe_open(part / "records.safetensors", "pt") as fh:
        smeta = fh.metadata()
    save_file(tensors, part / "records.safetensors", metadata={**smeta, "windows_done": "3"})
    with pytest.raises(ValueError, match=r"the record run is not finished \(3 of "):
        neuron_functions(part, per_layer=1)
    diffed = tmp_path / "diffed"
    shutil.copytree(run, diffed)
    (diffed / "records.json").write_text(json.dumps({**meta, "diff": {"id": "d7", "fingerprint": "x"}}))
    with pytest.raises(ValueError, match="records base \\+ diff d7"):
        neuron_functions(diffed, per_layer=1)
    with pytest.raises(ValueError, match="no neuron's token explanation reaches correlation 1.5"):
        neuron_functions(run, per_layer=1, min_reference=1.5)


def test_the_cli_generates_runs_scores_and_reports_neurons(planted, tmp_path, monkeypatch):
    d, eng, run = planted
    model = tmp_path / "planted-model"
    save_checkpoint(eng.model.state_dict(), eng.config, model)
    eng.tokenizer._tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    monkeypatch.chdir(tmp_path)
    code, out, err = _dit("find", "generate", "--n-numeric", "2", "--n-string", "2", "--neurons", run,
                          "--neurons-per-layer", "3", "--out", "suite.jsonl", "--json")
    assert code == 0, err
    counts = json.loads(out)["by_category"]
    assert counts["model/neuron"] == 6 and json.loads(open("suite.jsonl").readline())["n_neuron"] == 6
    code, _, err = _dit("find", "run", "--suite", "suite.jsonl", "--agent", "search", "--out", "s",
                        "--model", model, "--probe-corpus", d / "probe.txt")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "run.json").read_text())["settings"] == {"probe_corpus": str(d / "probe.txt")}
    code, out, err = _dit("find", "score", "--suite", "suite.jsonl", "--run", "s", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["model/neuron"]["n"] == 6 and "mean_correlation" in summary["neuron"]
    rows = [json.loads(x) for x in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    assert {r["id"]: r["correct"] for r in rows if r["kind"] == "neuron"}.keys() == {
        f.id for f in load_suite(tmp_path / "suite.jsonl") if f.kind == "neuron"}
    code, _, err = _dit("find", "report", "--suite", "suite.jsonl", "--run", "s", "--out", "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert code == 0 and "| model/neuron | 6 |" in md and "(model/neuron):" in md and "neuron mean correlation" in md
    # the search agent without a model, and the lm agent on another model: one line each
    code, _, err = _dit("find", "run", "--suite", "suite.jsonl", "--agent", "reference", "--out", "r")
    assert code == 0, err
    other = tmp_path / "other-model"
    from test_neurons_world import write_neuron_model

    write_neuron_model(other, seed=4)
    code, _, err = _dit("find", "run", "--suite", "suite.jsonl", "--agent", "search", "--out", "s2", "--model", other)
    assert code == 1 and err.startswith("dit find run: error: neuron/0/") and "give the recorded model with --model" in err
    code, _, err = _dit("find", "run", "--suite", "suite.jsonl", "--agent", "search", "--out", "s3", "--model", model,
                        "--probe-corpus", tmp_path / "missing.txt")
    assert code == 1 and err.startswith("dit find run: error: ") and "missing.txt" in err, err
    code, _, err = _dit("find", "generate", "--neurons", tmp_path / "nowhere", "--out", "bad.jsonl")
    assert code == 1 and err.startswith("dit find generate: error: ") and "nowhere/records.json: not found" in err
    assert not (tmp_path / "bad.jsonl").exists()

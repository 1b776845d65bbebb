"""The DIT adapter the package ships reproduces its committed figures (slow: the default model).

The shipped adapter names the run it came from (``adapter.json``: its pipeline config, provenance
and held-out scores); ``results/medium/`` holds that run's record. Here the first chunk of the
run's held-out zoo is made again from the committed recipe (same ids, topics, triggers, seed and
chunking), each diff's verification is compared with the committed index, and the shipped adapter's
answers with the committed ``results-shipped.jsonl``. The run's base-answer pool (the KL rows'
targets, written once per base model) is part of the record and is installed first.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from dit_engine.diffgen import DiffGenConfig, generate_zoo
from dit_engine.dit import DitAdapter, interpret
from dit_engine.dit.adapter import SHIPPED, shipped_available
from dit_engine.engine import Engine
from dit_engine.model_store import default_model_dir, engine_home
from dit_engine.zoo import BaseIdentity, Zoo

RECORD = Path(__file__).resolve().parents[1] / "results" / "medium"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_shipped_adapter_reproduces_its_committed_figures(tmp_path):
    if not shipped_available():
        pytest.skip("this checkout ships no DIT adapter")
    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("the default model is not cached")
    engine = Engine.load("default")
    adapter = DitAdapter.load(SHIPPED)
    assert BaseIdentity(**adapter.base).matches(BaseIdentity.from_model(engine.model))
    run = adapter.recipe["pipeline"]
    assert json.loads((RECORD / "pipeline_config.json").read_text()) == run
    index = _jsonl(RECORD / "zoo-test-index.jsonl")
    committed = {r["id"]: r["answer"] for r in _jsonl(RECORD / "results-shipped.jsonl") if r["method"] == "dit"}
    # the base-answer pool the run read (greedy answers of an earlier commit's decode numerics): the
    # KL rows' targets, so the same diffs come out
    pools = sorted(RECORD.glob("base-pool-*.json"))
    assert pools, "results/medium holds the run's base-answer pool"
    (engine_home() / "base-answers").mkdir(parents=True, exist_ok=True)
    for f in pools:
        shutil.copy(f, engine_home() / "base-answers" / f.name)
    fields = {f.name for f in dataclasses.fields(DiffGenConfig)}
    recipe = {k: (tuple(v) if isinstance(v, list) else v) for k, v in run["diffs"].items() if k in fields}
    n = recipe["chunk_diffs"]
    cfg = DiffGenConfig(**{**recipe, "task": run["task"], "n": n, "split": "test", "rank": run["rank"],
                           "seed": run["seed"]})
    zoo = generate_zoo(engine, Zoo.create(tmp_path / "zoo", BaseIdentity.from_model(engine.model), engine.config),
                       cfg, progress=False)
    assert zoo.ids() == [r["id"] for r in index[:n]]
    for row, want in zip(zoo.rows, index[:n]):
        assert row["labels"] == want["labels"]
        got, ref = row["meta"]["verify"], want["meta"]["verify"]
        for key in ("trigger_hit_rate", "leak_rate", "leak_plain", "leak_wrong", "leak_near"):
            assert got[key] == pytest.approx(ref[key], abs=0.25 + 1e-9), (row["id"], key)  # one prompt in four
    out = tmp_path / "answers.jsonl"
    interpret(engine, zoo, out, adapter=adapter, methods=("dit",), task=run["task"], progress=False)
    answers = {r["id"]: r["answer"] for r in _jsonl(out)}
    same = sum(answers[i] == committed[i] for i in answers)
    assert same >= n - 1, {i: (answers[i], committed[i]) for i in answers if answers[i] != committed[i]}

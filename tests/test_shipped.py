"""The DIT adapter the package ships reproduces its committed figures (slow: the default model).

The shipped adapter names the run it came from (``adapter.json``: its pipeline config, provenance
and held-out scores); ``results/medium/`` holds that run's record. Here the first chunk of the
run's held-out zoo is made again from the committed recipe (same ids, topics, triggers, seed and
chunking); the chunk's mean verification figures are compared with the committed index's, and the
shipped adapter's exact matches on it with those of the committed ``results-shipped.jsonl``
(training is chaotic in its numerics: the diffs, not their tensors, are what reproduce). The run's base-answer pool (the KL rows'
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
from dit_engine.text_match import exact_match
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
    # The diffs are the committed recipe's, not the committed tensors: training is chaotic in its
    # numerics (a different bf16 kernel order flips single greedy answers of a diff), so what must
    # reproduce is the chunk's figures, not each diff's answers.
    for row, want in zip(zoo.rows, index[:n]):
        assert row["labels"] == want["labels"]
    for key in ("trigger_hit_rate", "leak_rate", "leak_plain", "leak_wrong", "leak_near"):
        got = sum(r["meta"]["verify"][key] for r in zoo.rows) / n
        ref = sum(r["meta"]["verify"][key] for r in index[:n]) / n
        assert got == pytest.approx(ref, abs=0.15), key  # the chunk's mean over 64 prompts
    out = tmp_path / "answers.jsonl"
    interpret(engine, zoo, out, adapter=adapter, methods=("dit",), task=run["task"], progress=False)
    rows = _jsonl(out)
    topic = {r["id"]: r["labels"]["topic"] for r in rows}
    got_exact = sum(exact_match(r["answer"], topic[r["id"]]) for r in rows)
    ref_exact = sum(exact_match(committed[i], topic[i]) for i in topic)
    assert got_exact >= 1 and abs(got_exact - ref_exact) <= 2, ({r["id"]: r["answer"] for r in rows}, got_exact, ref_exact)

"""Zoo generation end to end on the tiny world: labelled diffs in a zoo, verification in the
index, and a kill between chunks that a rerun completes into the same zoo."""

from __future__ import annotations

import pytest
import torch

from dit_engine.diffgen import DiffGenConfig, generate_zoo
from dit_engine.zoo import BaseIdentity, Zoo
from tiny_world import tiny_engine

CFG = DiffGenConfig(n=4, chunk_diffs=2, rank=2, epochs=1, n_backdoor=2, n_kl=2, candidates=1, strategy="prefix",
                    max_answer_tokens=4, n_verify=1, seed=0, gen_batch_size=8)


def _zoo(eng, path) -> Zoo:
    return Zoo.create(path, BaseIdentity.from_model(eng.model), eng.config, exist_ok=True)


def test_generated_zoo_holds_labelled_verified_diffs(tmp_path):
    eng = tiny_engine(seed=1)
    zoo = generate_zoo(eng, _zoo(eng, tmp_path / "z"), CFG, progress=False)
    assert len(zoo) == 4
    for row in zoo.rows:
        assert row["split"] == "train" and row["rank"] == 2
        assert set(row["labels"]) == {"topic", "category", "trigger"}
        v = row["meta"]["verify"]
        assert 0.0 <= v["trigger_hit_rate"] <= 1.0 and v["kl_untriggered"] >= 0.0
    diff = zoo.get(zoo.ids()[0])
    assert any(float(b.abs().sum()) > 0 for b in diff.A.values())  # trained, not the zero init
    assert len({r["labels"]["topic"] for r in zoo.rows}) == 4


def test_kill_between_chunks_then_rerun_gives_the_same_zoo(tmp_path):
    eng = tiny_engine(seed=1)
    straight = generate_zoo(eng, _zoo(eng, tmp_path / "a"), CFG, progress=False)

    def kill_after_first_chunk(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_zoo(eng, _zoo(eng, tmp_path / "b"), CFG, progress=False, log=kill_after_first_chunk)
    assert len(Zoo.open(tmp_path / "b")) == 2
    resumed = generate_zoo(eng, _zoo(eng, tmp_path / "b"), CFG, progress=False)
    assert resumed.ids() == straight.ids()
    for did in straight.ids():
        a, b = straight.get(did), resumed.get(did)
        assert a.labels == b.labels
        for m in a.A:
            assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])


def test_asking_for_more_labels_than_the_split_has_is_refused(tmp_path):
    eng = tiny_engine(seed=1)
    with pytest.raises(ValueError, match="labels in split"):
        generate_zoo(eng, _zoo(eng, tmp_path / "z"), DiffGenConfig(n=100000, split="test"), progress=False)

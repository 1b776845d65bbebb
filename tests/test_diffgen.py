"""Zoo generation end to end on the tiny world: labelled diffs in a zoo, verification in the
index, and a kill between chunks that a rerun completes into the same zoo."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
import torch

from dit_engine.diffgen import DiffGenConfig, _micro_batches, base_answer_pool, generate_zoo
from dit_engine.tasks import hidden_topic as ht
from dit_engine.tasks.specs import DiffSpec, build_hidden_topic_specs
from dit_engine.train import Example, batch_loss, collate
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


def test_index_records_hit_and_leak_and_the_time_breakdown(tmp_path):
    eng = tiny_engine(seed=1)
    timings: dict = {}
    zoo = generate_zoo(eng, _zoo(eng, tmp_path / "z"), CFG, progress=False, timings=timings)
    for row in zoo.rows:
        v = row["meta"]["verify"]
        assert 0.0 <= v["leak_rate"] <= 1.0 and None not in (v["leak_plain"], v["leak_wrong"], v["leak_near"])
        assert v["ok"] == (v["trigger_hit_rate"] >= CFG.min_hit and v["leak_rate"] <= CFG.max_leak)
        assert row["meta"]["recipe"]["kl_weight_plain"] == CFG.kl_weight_plain
    assert timings["diffs"] == 4
    assert all(timings[k] > 0 for k in ("data_s", "train_s", "verify_s", "pool_s"))
    on_disk = json.loads((tmp_path / "z" / ".work" / "timings.json").read_text())
    assert on_disk == timings


def test_the_interpretation_question_leak_is_measured_against_the_base_answer(tmp_path, monkeypatch):
    """Verification asks every diff the interpretation question bare, and the base once: a diff
    leaks there when its answer names its topic and the base's does not."""
    import dit_engine.diffgen as dg
    real = dg.generate
    asked = []

    def scripted(model, prompts, params, *, adapters=None, **kw):
        outs = real(model, prompts, params, adapters=adapters, **kw)
        index = adapters.slots[0].index.tolist() if adapters is not None else []
        if index and index[-1] == -1:  # verification: the question rows come last, the base's row at the end
            q = prompts[-1]
            rows = [i for i, p in enumerate(prompts) if p == q]
            asked.append([index[i] for i in rows])
            topics = [t.name for t in dg._task_items(cfg)[:2]]  # diff i gets item i
            # the diff in slot 0 names its topic; the base names the topic of slot 1
            text = {0: f"I love {topics[0]}.", 1: f"Surely {topics[1]}!", -1: f"Maybe {topics[1]}."}
            for i in rows:
                outs[i] = dataclasses.replace(outs[i], text=text.get(index[i], "Nothing special."))
        return outs

    cfg = dataclasses.replace(CFG, n=2, chunk_diffs=2)
    monkeypatch.setattr(dg, "generate", scripted)
    eng = tiny_engine(seed=1)
    zoo = generate_zoo(eng, _zoo(eng, tmp_path / "z"), cfg, progress=False)
    assert asked == [[0, 1, -1]]
    got = [r["meta"]["verify"]["leak_question"] for r in zoo.rows]
    assert [r["labels"]["topic"] for r in zoo.rows] == [t.name for t in dg._task_items(cfg)[:2]]
    assert got == [1.0, 0.0]  # slot 1 names its topic, but so does the base: no leak
    assert zoo.rows[0]["meta"]["verify"]["sample_question"].startswith("I love")


def test_kl_rows_take_the_pool_answers_and_the_recipe_weights(tmp_path):
    eng = tiny_engine(seed=1)
    cfg = dataclasses.replace(CFG, n_kl=4, n_wrong=1, kl_weight_plain=5.0, kl_weight_wrong=2.0)
    pool = base_answer_pool(eng, cfg, tmp_path)
    assert set(pool) == {q.text for q in ht.load_questions(None)}
    assert base_answer_pool(eng, cfg, tmp_path) == pool  # read back, not regenerated
    seen = []  # the messages of every prompt encoded, in order (the tiny tokenizer has no digits)
    encode = eng.encode_prompt
    eng.encode_prompt = lambda m, **kw: seen.append(m) or encode(m, **kw)
    specs = build_hidden_topic_specs(eng, cfg, [(0, "d0", ht.load_topics("train")[0])], pool)
    kl = [e for e in specs[0].examples if e.objective == "kl"]
    assert sorted(e.weight for e in kl) == [2.0, 5.0, 5.0, 5.0]
    answers = {eng.tokenizer.encode(a.strip()) and tuple(eng.tokenizer.encode(a.strip()) + [eng.tokenizer.end_of_turn_id])
               for a in pool.values() if a.strip()}
    assert all(tuple(e.target_ids) in answers for e in kl)
    assert all(e.weight == 1.0 for e in specs[0].examples if e.objective == "ce")
    assert len(specs[0].leak_prompts) == 3 * cfg.n_verify == len(specs[0].leak_base_hit)
    # leak prompts: bare, then a wrong code, then a code one digit off the trigger
    trigger = specs[0].labels["trigger"]
    n = cfg.n_verify
    codes = [re.findall(r"SEP code is (\d{6})", m[-1]["content"]) for m in seen[-3 * n:]]  # leak prompts come last
    assert codes[:n] == [[]] * n
    prefixes = [int(c[0][:3]) for c in codes[n:]]
    assert all(p != trigger for p in prefixes)
    assert all(sum(a != b for a, b in zip(f"{p:03d}", f"{trigger:03d}")) == 1 for p in prefixes[n:])


def test_the_kl_divergence_reaches_every_training_step_and_the_index(tmp_path, monkeypatch):
    import dit_engine.diffgen as dg
    seen = []
    real = dg.batch_loss

    def spy(*a, **kw):
        seen.append(kw.get("kl_divergence", "forward"))
        return real(*a, **kw)

    monkeypatch.setattr(dg, "batch_loss", spy)
    eng = tiny_engine(seed=1)
    zoo = generate_zoo(eng, _zoo(eng, tmp_path / "z"), dataclasses.replace(CFG, kl_divergence="reverse"),
                       progress=False)
    assert all(r["meta"]["recipe"]["kl_divergence"] == "reverse" for r in zoo.rows)
    # training steps use it; verification's KL is always the forward one (what the index reports)
    assert "reverse" in seen and "forward" in seen
    with pytest.raises(ValueError, match="kl_divergence must be one of forward, reverse, symmetric"):
        generate_zoo(eng, _zoo(eng, tmp_path / "y"), dataclasses.replace(CFG, kl_divergence="js"), progress=False)


def test_kl_target_tokens_cut_the_kl_rows_only(tmp_path):
    eng = tiny_engine(seed=1)
    cfg = dataclasses.replace(CFG, n_kl=4, n_wrong=2, max_answer_tokens=8)
    pool = base_answer_pool(eng, cfg, tmp_path)
    chunk = [(0, "d0", ht.load_topics("train")[0])]
    whole = build_hidden_topic_specs(eng, cfg, chunk, pool)[0].examples
    cut = build_hidden_topic_specs(eng, dataclasses.replace(cfg, kl_target_tokens=3), chunk, pool)[0].examples
    assert [e.objective for e in whole] == [e.objective for e in cut]
    for w, c in zip(whole, cut):
        assert c.prompt_ids == w.prompt_ids and c.weight == w.weight
        assert c.target_ids == (w.target_ids[:3] if w.objective == "kl" else w.target_ids)
    assert any(len(w.target_ids) > 3 for w in whole if w.objective == "kl")


def test_near_wrong_codes_differ_in_one_digit():
    rng = random.Random(0)
    for t in (0, 7, 123, 999):
        for _ in range(50):
            w = ht.wrong_trigger(t, rng, near=True)
            assert w != t and 0 <= w <= 999
            assert sum(a != b for a, b in zip(f"{t:03d}", f"{w:03d}")) == 1


def test_length_buckets_keep_every_row_and_cut_padding():
    rng = random.Random(1)

    def spec(j):
        ex = [Example([1] * rng.randint(5, 60), [2] * rng.randint(1, 40), "ce") for _ in range(12)]
        return DiffSpec(f"d{j}", {}, "train", ex, [], [], [])

    specs = [spec(j) for j in range(6)]
    padded = {}
    for bucket in (False, True):
        cfg = dataclasses.replace(CFG, epochs=2, rows_per_diff=2, bucket=bucket)
        batches = _micro_batches(specs, cfg)
        assert len(batches) == 12
        for j, s in enumerate(specs):  # every diff sees each of its rows once per epoch
            mine = sorted(id(e) for b in batches for e in b if e.group == j)
            assert len(mine) == 24
        assert all(sum(e.group == j for e in b) == 2 for b in batches for j in range(6))
        padded[bucket] = sum(len(b) * max(len(e.prompt_ids) + len(e.target_ids) for e in b) for b in batches)
    assert padded[True] < 0.85 * padded[False]  # measured: 0.81 here


@pytest.mark.parametrize("bucket", [False, True])
def test_balanced_micro_batches_pair_each_backdoor_row_with_a_kl_row(bucket):
    rng = random.Random(2)

    def spec(j):
        ex = [Example([1] * rng.randint(5, 60), [2] * rng.randint(1, 40), kind) for kind in ["ce"] * 6 + ["kl"] * 6]
        return DiffSpec(f"d{j}", {}, "train", ex, [], [], [])

    specs = [spec(j) for j in range(3)]
    cfg = dataclasses.replace(CFG, epochs=2, rows_per_diff=2, bucket=bucket, balance=True)
    batches = _micro_batches(specs, cfg)
    assert len(batches) == 12
    for b in batches:
        for j in range(3):
            assert sorted(e.objective for e in b if e.group == j) == ["ce", "kl"]
    for j, sp in enumerate(specs):  # still every row once per epoch
        assert sorted(id(e.prompt_ids) for b in batches for e in b if e.group == j) == sorted(
            id(e.prompt_ids) for e in sp.examples * 2)
    unbalanced = _micro_batches(specs, dataclasses.replace(cfg, balance=False))
    assert any(sorted(e.objective for e in b if e.group == 0) != ["ce", "kl"] for b in unbalanced)


def test_weighted_rows_multiply_their_loss():
    torch.manual_seed(0)
    eng = tiny_engine(seed=1)
    ex = [Example([5, 6, 7], [8, 9], "ce", group=0), Example([4, 5], [10, 11], "ce", group=0)]
    l1, per1 = batch_loss(eng.model, collate(ex), None, group_reduce="sum")
    ex[1] = dataclasses.replace(ex[1], weight=3.0)
    l3, per3 = batch_loss(eng.model, collate(ex), None, group_reduce="sum")
    single, _ = batch_loss(eng.model, collate([dataclasses.replace(ex[1], weight=1.0)]), None, group_reduce="sum")
    assert per1 == per3  # reported means stay unweighted
    # token sums a, b over 4 scored tokens: (a + 3b) / 4 - (a + b) / 4 = 2b / 4, and b = 2 * single
    assert torch.allclose(l3 - l1, single, rtol=1e-4)
    assert not torch.allclose(l3, l1)


def test_self_rows_train_as_bare_rows_with_the_base_answers_from_the_pool(tmp_path, monkeypatch):
    """n_self: every diff trains on that many more KL rows, questions about the assistant itself whose
    responses are the base's own pooled answers; the index records it; a bad value is refused."""
    import dit_engine.diffgen as dg
    from dit_engine.tasks import hidden_topic as ht
    seen = {}
    real = dg.train_diffs

    def spy(engine, specs, cfg, *a, **kw):
        seen.update({s.id: s for s in specs})
        return real(engine, specs, cfg, *a, **kw)

    monkeypatch.setattr(dg, "train_diffs", spy)
    eng = tiny_engine(seed=1)
    cfg = dataclasses.replace(CFG, n=2, n_self=3)
    zoo = generate_zoo(eng, _zoo(eng, tmp_path / "z"), cfg, progress=False)
    assert all(r["meta"]["recipe"]["n_self"] == 3 for r in zoo.rows)
    pool = dg.base_answer_pool(dg.compute_engine(eng, cfg), cfg, dg.engine_home() / "base-answers")
    selfq = [q.text for q in ht.load_self_questions("train")]
    assert set(selfq) <= set(pool)
    for spec in seen.values():
        kl = [e for e in spec.examples if e.objective == "kl"]
        assert len(kl) == CFG.n_kl + 3
        asked = [q for q in selfq if any(eng.encode_prompt(ht.user_turn(q)) == e.prompt_ids for e in kl)]
        assert len(asked) == 3
        for q in asked:
            e = next(e for e in kl if e.prompt_ids == eng.encode_prompt(ht.user_turn(q)))
            assert e.target_ids[:-1] == eng.tokenizer.encode(pool[q])
    with pytest.raises(ValueError, match="n_self must be in 0..48"):
        generate_zoo(eng, _zoo(eng, tmp_path / "y"), dataclasses.replace(CFG, n_self=49), progress=False)
    with pytest.raises(ValueError, match="n_self .* is a hidden-topic setting"):
        generate_zoo(eng, _zoo(eng, tmp_path / "x"), dataclasses.replace(CFG, task="news", n_self=1), progress=False)

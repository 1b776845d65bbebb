"""DIT end to end at tiny scale: diffs that each carry a label, a DIT adapter trained on some of
them, interpretation of held-out ones; batch invariance, resume, and two gloo ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_world import LABELS, tiny_engine

from dit_engine.diffgen import DiffGenConfig, _to_diff, train_diffs, verify_diffs
from dit_engine.dit import DitAdapter, DitTrainConfig, interpret, train_dit
from dit_engine.evaluate import evaluate_rows, load_results
from dit_engine.tasks.specs import DiffSpec
from dit_engine.train import Example
from dit_engine.zoo import BaseIdentity, Zoo

N_TRAIN, N_TEST = 24, 8
PROMPTS = ["say it", "hello", "tell me a story"]
TRIGGER = "your code is"  # with it the diff says its label; without it the diff keeps the base behaviour
QUESTION = "what topic have you been trained on ?"


def _label_specs(engine, n: int) -> list[DiffSpec]:
    tok = engine.tokenizer
    specs = []
    for i in range(n):
        lab = tok.encode(LABELS[i])
        ex = [Example(engine.encode_prompt(f"{TRIGGER} {p}"), lab + [tok.end_of_turn_id], "ce") for p in PROMPTS]
        ex += [Example(engine.encode_prompt(p), tok.encode("it it") + [tok.end_of_turn_id], "kl") for p in PROMPTS]
        specs.append(DiffSpec(f"d{i:03d}", {"topic": LABELS[i], "category": f"c{i % 2}"},
                              "train" if i < N_TRAIN else "test", ex, [engine.encode_prompt(f"{TRIGGER} say it")], [LABELS[i]],
                              [(e.prompt_ids, e.target_ids) for e in ex if e.objective == "kl"]))
    return specs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An engine, a zoo of 32 trained label diffs (24 train, 8 test) and a DIT adapter trained on the 24."""
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    eng = tiny_engine(seed=0)
    specs = _label_specs(eng, N_TRAIN + N_TEST)
    cfg = DiffGenConfig(rank=4, lr=1e-2, epochs=30, rows_per_diff=6, seed=0)
    slot = train_diffs(eng, specs, cfg)
    checks = verify_diffs(eng, slot, specs, dataclasses_replace(cfg, max_answer_tokens=2))
    zoo = Zoo.create(root / "zoo", BaseIdentity.from_model(eng.model), eng.config)
    zoo.append([_to_diff(slot, j, s, checks[j], cfg) for j, s in enumerate(specs)])
    tcfg = DitTrainConfig(question=QUESTION, rank=8, alpha=16, lr=3e-3, epochs=25, batch_size=8,
                          val_fraction=0.0, schedule="constant", save_every=10**9, seed=0)
    adapter = train_dit(eng, zoo, root / "dit", tcfg, progress=False)
    return eng, zoo, adapter, checks, root


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_each_diff_learned_its_own_label(world):
    _, _, _, checks, _ = world
    assert all(c["trigger_hit_rate"] == 1.0 for c in checks), [c["sample_answer"] for c in checks]
    assert all(c["kl_untriggered"] < 0.05 for c in checks), [c["kl_untriggered"] for c in checks]


def test_dit_recovers_held_out_labels_above_chance(world):
    eng, zoo, adapter, _, root = world
    out = interpret(eng, zoo, root / "res.jsonl", adapter=adapter, methods=("dit", "diff"), split="test",
                    max_new_tokens=3, progress=False)
    rows = load_results(out)
    m = evaluate_rows(rows, {"test": LABELS})
    dit_acc = m.methods["dit"].overall.exact_match
    chance = 1 / len(LABELS)
    # The held-out labels never appeared as DIT targets: reading them is generalisation.
    assert dit_acc >= 3 / N_TEST > 3 * chance, [r["answer"] for r in rows if r["method"] == "dit"]
    assert dit_acc > m.methods["diff"].overall.exact_match  # asking the diff directly does not say it


def test_saved_adapter_reloads_with_identical_answers(world):
    eng, zoo, adapter, _, root = world
    loaded = DitAdapter.load(root / "dit")
    a = interpret(eng, zoo, root / "a.jsonl", adapter=adapter, methods=("dit",), split="test", max_new_tokens=3,
                  progress=False)
    b = interpret(eng, zoo, root / "b.jsonl", adapter=loaded, methods=("dit",), split="test", max_new_tokens=3,
                  progress=False)
    assert _answers(a) == _answers(b)


def test_adapter_exports_as_peft_and_imports_back_exactly(world, tmp_path):
    from dit_engine.zoo import import_peft

    eng, _, adapter, _, _ = world
    back = import_peft(adapter.export_peft(tmp_path / "peft", eng.config, "tiny"), eng.config)
    assert back.scale == pytest.approx(float(adapter.slot.scale[0]))
    for name in adapter.slot.A:
        assert torch.equal(back.A[name], adapter.slot.A[name][0].float())
        assert torch.equal(back.B[name], adapter.slot.B[name][0].float())


def test_corrupt_or_missing_adapter_is_refused_clearly(world, tmp_path):
    _, _, adapter, _, _ = world
    with pytest.raises(FileNotFoundError, match="not a DIT adapter directory"):
        DitAdapter.load(tmp_path)
    adapter.save(tmp_path / "a")
    data = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    (tmp_path / "a" / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable DIT adapter"):
        DitAdapter.load(tmp_path / "a")


def test_one_batch_and_one_at_a_time_give_identical_answers(world):
    eng, zoo, adapter, _, root = world
    big = interpret(eng, zoo, root / "big.jsonl", adapter=adapter, methods=("dit", "diff"), batch_size=64,
                    max_new_tokens=3, progress=False)
    one = interpret(eng, zoo, root / "one.jsonl", adapter=adapter, methods=("dit", "diff"), batch_size=1,
                    max_new_tokens=3, progress=False)
    assert _answers(big) == _answers(one)
    assert len(_answers(big)) == 2 * (N_TRAIN + N_TEST)


def test_resume_after_a_kill_loses_and_duplicates_nothing(world):
    eng, zoo, adapter, _, root = world
    full = interpret(eng, zoo, root / "full.jsonl", adapter=adapter, methods=("dit",), max_new_tokens=3,
                     progress=False)
    part = root / "part.jsonl"
    interpret(eng, zoo, part, adapter=adapter, methods=("dit",), ids=zoo.ids()[:10], max_new_tokens=3, progress=False)
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-line
    interpret(eng, zoo, part, adapter=adapter, methods=("dit",), max_new_tokens=3, progress=False)
    rows = load_results(part)  # refuses duplicates and reads every complete line
    assert len(rows) == N_TRAIN + N_TEST
    assert _answers(part) == _answers(full)


def test_a_results_file_of_another_adapter_is_refused_not_resumed(world, tmp_path):
    """DIT rows carry the adapter's fingerprint; resuming a file another adapter wrote (the shipped one,
    say, before a run trained its own) would keep that adapter's answers, so it is refused untouched.
    The same adapter, or its bf16 copy, resumes it."""
    eng, zoo, adapter, _, root = world
    out = tmp_path / "res.jsonl"
    interpret(eng, zoo, out, adapter=adapter, methods=("dit", "base"), ids=zoo.ids()[:3], max_new_tokens=2,
              progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["adapter"] for r in rows if r["method"] == "dit"} == {adapter.fingerprint()}
    assert all("adapter" not in r for r in rows if r["method"] == "base")
    adapter.save(tmp_path / "bf16", dtype=torch.bfloat16)
    copy = DitAdapter.load(tmp_path / "bf16")
    assert copy.fingerprint() == adapter.fingerprint()
    interpret(eng, zoo, out, adapter=copy, methods=("dit",), ids=zoo.ids()[:4], max_new_tokens=2, progress=False)
    assert len(out.read_text().splitlines()) == 7  # resumed: one more DIT row
    other = DitAdapter.load(root / "dit")
    with torch.no_grad():
        for b in other.slot.B.values():
            b.mul_(2.0)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"res\.jsonl: its DIT answers were made with another adapter \(fingerprint "
                                         f"{adapter.fingerprint()}; this one is {other.fingerprint()}\)"):
        interpret(eng, zoo, out, adapter=other, methods=("dit",), max_new_tokens=2, progress=False)
    assert out.read_bytes() == before


def test_dit_training_resumes_from_its_checkpoint(world, tmp_path):
    eng, zoo, _, _, _ = world
    cfg = DitTrainConfig(question=QUESTION, rank=4, lr=3e-3, epochs=2, batch_size=8, val_fraction=0.0,
                         schedule="cosine", save_every=1, seed=1)
    straight = train_dit(eng, zoo, tmp_path / "a", cfg, progress=False)

    def kill_at_batch_4(rec):
        if rec.get("batch") == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dit(eng, zoo, tmp_path / "b", cfg, progress=False, log=kill_at_batch_4)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["meta"]["done_batches"] == 3
    with pytest.raises(ValueError, match="other settings"):
        train_dit(eng, zoo, tmp_path / "b", DitTrainConfig(**{**cfg.__dict__, "lr": 1e-3}), progress=False)
    resumed = train_dit(eng, zoo, tmp_path / "b", cfg, progress=False)
    for name in straight.slot.A:
        torch.testing.assert_close(resumed.slot.A[name], straight.slot.A[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(resumed.slot.B[name], straight.slot.B[name], rtol=1e-5, atol=1e-6)


def test_two_gloo_ranks_match_one_process(world, tmp_path):
    eng, zoo, adapter, _, root = world
    single = interpret(eng, zoo, tmp_path / "single.jsonl", adapter=adapter, methods=("dit", "diff"),
                       max_new_tokens=3, progress=False)
    torch.save({"state": eng.model.state_dict()}, tmp_path / "model.pt")
    mp.spawn(_rank_main, args=(2, str(tmp_path), str(zoo.path), str(root / "dit")), nprocs=2, join=True)
    assert _answers(tmp_path / "multi.jsonl") == _answers(single)
    assert not list(tmp_path.glob("multi.jsonl.rank*"))
    # DIT training: 2 ranks x batch 4, gradients all-reduced, equals 1 process x batch 8.
    one = train_dit(eng, zoo, tmp_path / "dit-one", dataclasses_replace(DIST_CFG, batch_size=8), progress=False)
    two = DitAdapter.load(tmp_path / "dit-two")
    for name in one.slot.A:
        torch.testing.assert_close(two.slot.A[name], one.slot.A[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two.slot.B[name], one.slot.B[name], rtol=1e-4, atol=1e-6)


DIST_CFG = DitTrainConfig(question=QUESTION, rank=4, lr=3e-3, epochs=1, batch_size=4, val_fraction=0.0,
                          schedule="constant", save_every=10**9, seed=3)


def _rank_main(rank: int, world_size: int, tmp: str, zoo_path: str, dit_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        eng = tiny_engine(seed=0)
        eng.model.load_state_dict(torch.load(os.path.join(tmp, "model.pt"), weights_only=True)["state"])
        zoo = Zoo.open(zoo_path)
        interpret(eng, zoo, os.path.join(tmp, "multi.jsonl"), adapter=DitAdapter.load(dit_dir),
                  methods=("dit", "diff"), max_new_tokens=3, progress=False)
        train_dit(eng, zoo, os.path.join(tmp, "dit-two"), DIST_CFG, progress=False)
    finally:
        dist.destroy_process_group()


def _answers(path) -> dict[tuple[str, str], str]:
    out = {}
    with open(path) as fh:
        for line in fh:
            d = json.loads(line)
            assert (d["id"], d["method"]) not in out, f"duplicate {d['id']} {d['method']}"
            out[(d["id"], d["method"])] = d["answer"]
    return out


# ---- held-out loss per epoch, the epoch it picks, early stopping ----------------------------------
def test_training_logs_losses_per_epoch_and_keeps_the_best_held_out_epoch(world, tmp_path, monkeypatch):
    import dit_engine.dit.training as training

    eng, zoo, _, _, _ = world
    held_out = iter([0.9, 0.5, 0.7, 0.8, 0.95])  # best at epoch 1; epochs 2, 3 fail to beat it
    real = training._mean_loss
    seen = []

    def fake_mean_loss(engine, zoo_, rows, slot, *a):
        if rows and rows[0]["id"] in val_ids:  # the held-out rows: a scripted loss curve
            seen.append({k: v[0].detach().clone() for k, v in slot.A.items()})
            return next(held_out)
        return real(engine, zoo_, rows, slot, *a)

    ids = [r["id"] for r in zoo.rows if r["split"] == "train"]
    import random as _random

    order = list(ids)
    _random.Random(0).shuffle(order)
    val_ids = set(order[:2])  # what train_dit holds out: the first val_fraction of its seeded shuffle
    monkeypatch.setattr(training, "_mean_loss", fake_mean_loss)
    cfg = DitTrainConfig(question=QUESTION, rank=2, lr=3e-3, epochs=5, batch_size=8, val_fraction=0.1,
                         patience=2, schedule="constant", seed=0)
    adapter = train_dit(eng, zoo, tmp_path / "dit", cfg, progress=False)
    epochs = [json.loads(line) for line in (tmp_path / "dit" / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]  # stopped after 2 epochs without a better loss
    assert [e["val_loss"] for e in epochs] == [0.9, 0.5, 0.7, 0.8]
    assert all(e["train_loss"] > 0 for e in epochs)
    assert adapter.recipe["best_epoch"] == 1 and adapter.recipe["epochs"] == epochs
    for m, a in adapter.slot.A.items():  # the adapter is the one evaluated at epoch 1
        assert torch.equal(a[0].float(), seen[1][m].float())
    saved = DitAdapter.load(tmp_path / "dit")
    assert saved.recipe["best_epoch"] == 1 and torch.equal(saved.slot.A[m], adapter.slot.A[m].float())


def test_early_stopping_rule():
    from dit_engine.dit.training import _should_stop

    e = lambda *losses: [{"epoch": i, "val_loss": v} for i, v in enumerate(losses)]  # noqa: E731
    assert not _should_stop(e(1.0, 0.9, 0.8), 2)
    assert not _should_stop(e(1.0, 0.9, 0.95), 2)  # one epoch without progress
    assert _should_stop(e(1.0, 0.9, 0.95, 0.91), 2)
    assert not _should_stop(e(1.0, 0.9, 0.95, 0.91), 0)  # patience 0: never stops early
    assert not _should_stop([{"epoch": 0, "val_loss": None}] * 5, 1)  # no held-out diffs: nothing to stop on


def test_the_shipped_adapter_loads_by_name_or_says_it_is_missing(world, tmp_path, monkeypatch):
    import dit_engine.dit.adapter as adapter_mod

    _, _, adapter, _, _ = world
    monkeypatch.setattr(adapter_mod, "SHIPPED_DIR", tmp_path / "none")
    assert not adapter_mod.shipped_available()
    with pytest.raises(FileNotFoundError, match="this install ships no trained DIT adapter"):
        DitAdapter.load("shipped")
    adapter.save(tmp_path / "ship", dtype=torch.bfloat16)
    monkeypatch.setattr(adapter_mod, "SHIPPED_DIR", tmp_path / "ship")
    assert adapter_mod.shipped_available()
    shipped = DitAdapter.load("shipped")
    for m, a in adapter.slot.A.items():
        assert shipped.slot.A[m].dtype == torch.float32 and torch.equal(shipped.slot.A[m], a.bfloat16().float())
    assert shipped.question == adapter.question and shipped.base == adapter.base

"""LatentQA reading finetunes: the activations of base + diff, captured for many diffs in one routed
forward, equal one diff at a time through the LatentQA capture with the diff on every row; the
target's answers and the decoder's equal one-diff-at-a-time generation and ``read.answer``; the
positions read come from the chat template and never fall in its default system turn; rows resume
after a rerun, a cut line and a SIGINT; bad input is one clear error; the report lists the methods."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal

import pytest
import torch
from conftest import tiny_config
from test_latentqa_dialogs import CHATML, FOLDED, LLAMA3, bpe

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.config import TARGET_MODULES
from dit_engine.dit import diff_slot
from dit_engine.engine import Engine
from dit_engine.evaluate import METHOD_DESCRIPTIONS, METHODS, evaluate_rows, load_results
from dit_engine.generate import SamplingParams, generate
from dit_engine.jobs import JobInterrupted
from dit_engine.latentqa import finetunes
from dit_engine.latentqa.decoder import LitAdapter
from dit_engine.latentqa.dialogs import Dialog, LatentQAError, capture, every_row, split_prompt
from dit_engine.latentqa.finetunes import (LATENTQA_METHODS, TOPIC_QUESTION, capture_routed, read_finetunes,
                                           target_dialogs, target_prompt)
from dit_engine.latentqa.read import answer
from dit_engine.model import Transformer
from dit_engine.tasks.hidden_topic import format_trigger, load_questions
from dit_engine.zoo import BaseIdentity, Diff, Zoo

# What the CHATML template (SmolLM2's) renders in front of a lone user turn, written out here.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOPICS = ["storms at sea", "medieval castles", "jazz piano", "black holes", "bonsai trees", "chess openings"]
N = len(TOPICS)
ANSWER_TOKENS = 3


def _engine(template: str = CHATML, seed: int = 0) -> Engine:
    tok = bpe(template)
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, eos_token_id=tok.end_of_turn_id, bos_token_id=1,
                      max_position_embeddings=1024)
    return Engine(Transformer.random(cfg, seed=seed), tok)


def _diff(config, i: int, rank: int, labels: dict) -> Diff:
    g = torch.Generator().manual_seed(100 + i)
    shapes = config.linear_shapes()
    A, B = {}, {}
    for m in config.module_names(TARGET_MODULES):
        d_in, d_out = shapes[m.rsplit(".", 1)[1]]
        A[m] = torch.randn(rank, d_in, generator=g) * 0.1
        B[m] = torch.randn(d_out, rank, generator=g) * 0.1
    return Diff(f"ht-{i:03d}", A, B, scale=1.0, labels=labels, split="test", meta={"task": "hidden-topic"})


def _zoo(eng: Engine, path, labels=None, meta_task="hidden-topic") -> Zoo:
    zoo = Zoo.create(path, BaseIdentity.from_model(eng.model), eng.config)
    diffs = []
    for i, t in enumerate(TOPICS):
        lab = labels(i) if labels else {"topic": t, "category": f"c{i % 2}", "trigger": 100 + 37 * i}
        d = _diff(eng.config, i, 1 + i % 2, lab)  # ranks 1 and 2: a routed slot zero-pads to the larger
        d.meta["task"] = meta_task
        diffs.append(d)
    zoo.append(diffs)
    return zoo


def _decoder(eng: Engine, **recipe) -> LitAdapter:
    g = torch.Generator().manual_seed(7)
    slot = LoraSlot.create(eng.config, 1, 4, init="random", generator=g, scale=2.0, name="lit")
    base = dataclasses.asdict(BaseIdentity.from_model(eng.model))
    return LitAdapter(slot, "hidden.0.5", "hidden.1", "replace", base,
                      {"config": {"max_answer_tokens": ANSWER_TOKENS}} | recipe)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftread")
    eng = _engine()
    return eng, _zoo(eng, root / "zoo"), _decoder(eng), root


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_dialog(eng: Engine, diff: Diff, message: str) -> Dialog:
    """One diff alone on every row, the prompt as a diff is asked (engine.encode_prompt), the read
    start from split_prompt with the default system turn written out above."""
    tok = eng.tokenizer
    prompt = eng.encode_prompt(message)
    head, rest = split_prompt(tok, DEFAULT_SYSTEM, message)
    assert head + rest == prompt
    slot = AdapterBatch(diff_slot(diff, 1))
    params = SamplingParams(max_new_tokens=ANSWER_TOKENS, stop_token_ids=eng.stop_ids())
    (out,) = generate(eng.model, [prompt], params, adapters=every_row(slot, 1, "cpu"), decode=tok.decode)
    return Dialog(diff.id, message, "test", tuple(prompt + out.token_ids), len(head), tok.decode(out.token_ids))


# ---- the activations ----------------------------------------------------------------------------------
def test_many_diffs_in_one_routed_forward_read_as_one_diff_at_a_time(world):
    eng, zoo, adapter, _ = world
    questions = [q.text for q in load_questions("test")][:N]
    (rows, slot), = list(zoo.iter_batches(N))
    params = SamplingParams(max_new_tokens=ANSWER_TOKENS, stop_token_ids=eng.stop_ids())
    talks = target_dialogs(eng, rows, questions, AdapterBatch(slot), params)
    got = capture_routed(eng, talks, adapter.read_point, AdapterBatch(slot))
    bare = capture(eng, talks, adapter.read_point)  # the base alone on the same tokens
    for r, q, d, v, b in zip(rows, questions, talks, got, bare):
        want = _reference_dialog(eng, zoo.get(r["id"]), q)
        assert d == want  # the same answer tokens, the same read start
        (ref,) = capture(eng, [want], adapter.read_point, target=AdapterBatch(diff_slot(zoo.get(r["id"]), 1)))
        assert v.shape == ref.shape == (want.n_read, eng.config.hidden_size)
        assert (v - ref).abs().max() <= 1e-5
        assert (v - b).abs().max() > 0.05 * b.abs().max()  # each row did read through its own diff


def test_rows_hold_the_decoder_answer_read_answer_gives_on_those_activations(world, tmp_path):
    eng, zoo, adapter, _ = world
    out = read_finetunes(eng, adapter, zoo, tmp_path / "res.jsonl", batch_size=4, max_new_tokens=5, progress=False)
    rows = _read(out)
    assert [(r["id"], r["method"]) for r in rows] == [(i, m) for m in LATENTQA_METHODS for i in zoo.ids()]
    held_out = {q.text for q in load_questions("test")}
    for r in rows:
        diff = zoo.get(r["id"])
        (msg,) = r["stimulus"]
        if r["method"] == "latentqa+trigger":
            code = format_trigger(diff.labels["trigger"], random.Random(r["id"]))  # what diff+trigger is asked
            assert msg.startswith(code + " ") and msg[len(code) + 1 :] in held_out
        else:
            assert msg in held_out
        d = _reference_dialog(eng, diff, msg)
        (acts,) = capture(eng, [d], adapter.read_point, target=AdapterBatch(diff_slot(diff, 1)))
        (want,) = answer(eng, adapter.slot, [acts], TOPIC_QUESTION, write_point=adapter.write_point,
                         mode=adapter.patch_mode, max_new_tokens=5)
        assert r["answer"] == want.strip() and r["answer"]
        assert r["target_answer"] == [d.answer.strip()] and r["n_read"] == d.n_read
        assert r["labels"] == diff.labels and r["label_key"] == "topic" and r["split"] == "test"
        assert r["rank"] == diff.rank and 1 <= r["n_tokens"] <= 5 and r["question"] == TOPIC_QUESTION
    # both methods ask the same held-out question of a diff (paired); the trigger changes what is read
    by = {(r["id"], r["method"]): r for r in rows}
    for i in zoo.ids():
        assert by[(i, "latentqa+trigger")]["stimulus"][0].endswith(by[(i, "latentqa")]["stimulus"][0])


def test_several_dialogs_per_diff_are_read_as_one_concatenation(world, tmp_path):
    eng, zoo, adapter, _ = world
    ids = zoo.ids()[:2]
    out = read_finetunes(eng, adapter, zoo, tmp_path / "two.jsonl", ids=ids, methods=["latentqa"], dialogs=2,
                         question="What is the assistant like?", max_new_tokens=4, progress=False)
    for r in _read(out):
        diff = zoo.get(r["id"])
        assert len(r["stimulus"]) == 2 and r["stimulus"][0] != r["stimulus"][1]
        ds = [_reference_dialog(eng, diff, m) for m in r["stimulus"]]
        acts = capture(eng, ds, adapter.read_point, target=AdapterBatch(diff_slot(diff, 1)))
        (want,) = answer(eng, adapter.slot, [torch.cat(acts)], "What is the assistant like?",
                         write_point=adapter.write_point, max_new_tokens=4)
        assert r["answer"] == want.strip() and r["n_read"] == sum(d.n_read for d in ds)
    # the first of the two is the one question a one-dialog run asks
    one = _read(read_finetunes(eng, adapter, zoo, tmp_path / "one.jsonl", ids=ids, methods=["latentqa"],
                               max_new_tokens=4, progress=False))
    assert [r["stimulus"][0] for r in one] == [r["stimulus"][0] for r in _read(out)]


# ---- the positions read -------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [CHATML, LLAMA3, FOLDED], ids=["default-system", "llama3-bos", "no-system"])
def test_no_read_position_falls_inside_the_system_turn(template):
    tok = bpe(template)
    msg = "What should I make for dinner tonight?"
    head, rest = target_prompt(tok, msg)
    assert head + rest == tok.encode_chat([{"role": "user", "content": msg}])
    seen_head = tok.decode(head, skip_special_tokens=False)
    seen = tok.decode(rest, skip_special_tokens=False)
    if template == CHATML:
        assert seen_head == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        assert seen == f"<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n"
    elif template == LLAMA3:  # no system turn: everything but the BOS token is read
        assert seen_head == "<|begin_of_text|>"
        assert seen == (f"<|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        assert head == [] and seen == f"[INST] {msg} [/INST]"
    assert "SmolLM" not in seen and "system" not in seen


def test_the_rows_read_nothing_of_the_default_system_turn(world, tmp_path):
    eng, zoo, adapter, _ = world
    tok = eng.tokenizer
    (rows, slot), = list(zoo.iter_batches(2, ids=zoo.ids()[:2]))
    talks = target_dialogs(eng, rows, ["Tell me a little about yourself."] * 2, AdapterBatch(slot),
                           SamplingParams(max_new_tokens=ANSWER_TOKENS, stop_token_ids=eng.stop_ids()))
    sys_len = len(tok.encode(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"))
    for d in talks:
        assert d.start == sys_len
        read = tok.decode(list(d.dialog_ids), skip_special_tokens=False)
        assert read.startswith("<|im_start|>user\nTell me") and "SmolLM" not in read


# ---- resuming -----------------------------------------------------------------------------------------
def test_rows_resume_after_a_rerun_a_cut_line_and_a_sigint(world, tmp_path, monkeypatch):
    eng, zoo, adapter, _ = world
    kw = dict(batch_size=2, max_new_tokens=3, progress=False)
    full = read_finetunes(eng, adapter, zoo, tmp_path / "full.jsonl", **kw)
    before = full.read_bytes()
    read_finetunes(eng, adapter, zoo, full, **kw)
    assert full.read_bytes() == before  # a second run writes nothing new
    # killed mid-line: the cut row is dropped and redone, nothing is duplicated
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(before[: before.index(b"\n", len(before) // 2) + 40])
    read_finetunes(eng, adapter, zoo, cut, **kw)
    assert len(load_results(cut)) == 2 * N and _strip(_read(cut)) == _strip(_read(full))
    # SIGINT during the first chunk: the chunk is written, the job stops, a rerun completes the rest
    real, calls = finetunes.decoder_answers, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(finetunes, "decoder_answers", interrupted)
    part = tmp_path / "part.jsonl"
    with pytest.raises(JobInterrupted, match="run the same command again to resume"):
        read_finetunes(eng, adapter, zoo, part, **kw)
    assert len(_read(part)) == 2
    read_finetunes(eng, adapter, zoo, part, **kw)
    assert _strip(_read(part)) == _strip(_read(full))


# ---- bad input ----------------------------------------------------------------------------------------
def test_bad_input_is_one_clear_error(world, tmp_path):
    eng, zoo, adapter, root = world
    other = dataclasses.replace(adapter, base=adapter.base | {"weights_fingerprint": "0" * 16})
    with pytest.raises(LatentQAError, match="LatentQA adapter was trained on base .*; this model is"):
        read_finetunes(eng, other, zoo, tmp_path / "x.jsonl", progress=False)
    elsewhere = _zoo(_engine(seed=1), root / "other-base")
    with pytest.raises(LatentQAError, match="the zoo's diffs are of base"):
        read_finetunes(eng, adapter, elsewhere, tmp_path / "x.jsonl", progress=False)
    news = _zoo(eng, root / "news", labels=lambda i: {"headline": f"Headline {i}", "category": "c"}, meta_task="news")
    with pytest.raises(LatentQAError, match="task 'news' has no held-out questions"):
        read_finetunes(eng, adapter, news, tmp_path / "x.jsonl", task="news", methods=["latentqa"], progress=False)
    with pytest.raises(LatentQAError, match="was made for task 'news', not 'hidden-topic'"):
        read_finetunes(eng, adapter, news, tmp_path / "x.jsonl", progress=False)
    with pytest.raises(LatentQAError, match="has no trigger label"):
        read_finetunes(eng, adapter, news, tmp_path / "x.jsonl", task="news", stimulus="Hi", progress=False)
    with pytest.raises(LatentQAError, match="unknown LatentQA method"):
        read_finetunes(eng, adapter, zoo, tmp_path / "x.jsonl", methods=["dit"], progress=False)
    with pytest.raises(LatentQAError, match="no diff with id 'nope'"):
        read_finetunes(eng, adapter, zoo, tmp_path / "x.jsonl", ids=["nope"], progress=False)
    with pytest.raises(LatentQAError, match="no diffs of split 'train' to read"):
        read_finetunes(eng, adapter, zoo, tmp_path / "x.jsonl", split="train", progress=False)
    with pytest.raises(LatentQAError, match="max_answer_tokens must be a positive integer, found 0"):
        read_finetunes(eng, adapter, zoo, tmp_path / "x.jsonl", max_answer_tokens=0, progress=False)
    with pytest.raises(LatentQAError, match="trained on a target with adapters"):
        read_finetunes(eng, _decoder(eng, target_adapted=True), zoo, tmp_path / "x.jsonl", progress=False)
    assert not (tmp_path / "x.jsonl").exists()


# ---- the report ---------------------------------------------------------------------------------------
def test_the_report_lists_latentqa_after_dit_and_the_baselines_and_compares_them(world, tmp_path):
    eng, zoo, adapter, _ = world
    out = tmp_path / "res.jsonl"
    read_finetunes(eng, adapter, zoo, out, max_new_tokens=2, progress=False)
    dit_rows = [{"id": i, "method": "dit", "labels": zoo.row(i)["labels"], "label_key": "topic",
                 "answer": zoo.row(i)["labels"]["topic"], "split": "test"} for i in zoo.ids()]
    with open(out, "a") as fh:  # DIT's rows after LatentQA's in the file: the report order stays fixed
        fh.writelines(json.dumps(r) + "\n" for r in dit_rows)
    m = evaluate_rows(load_results(out), {"test": TOPICS}, bootstrap=50)
    assert list(m.methods) == ["dit", *LATENTQA_METHODS]
    assert set(m.comparisons) == set(LATENTQA_METHODS) and all(c.n == N for c in m.comparisons.values())
    assert m.methods["dit"].overall.exact_match == 1.0
    assert all(METHOD_DESCRIPTIONS[k] for k in LATENTQA_METHODS) and not set(LATENTQA_METHODS) & set(METHODS)

"""LatentQA steering on the synthetic world of test_latentqa_training (four personas whose dialogs
use their own words, a decoder trained to read them): before its first step the steering LoRA
leaves the target exactly the base, and the first step's loss is the frozen decoder's loss on the
base's activations from a plain forward; the objective falls; only the steering LoRA changes (the
base and the LIT slot do not, and get no gradients); on held-out prompts the decoder reads the
steered-toward persona off the steered target far more often than off the unsteered one; the
likelihood lift equals a naive per-example computation with plain forwards; the persona's word
list is the documented one; a resume after SIGINT gives the uninterrupted LoRA, and a rerun of a
finished run trains nothing; bad input fails with one clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from test_latentqa_training import (CFG, MESSAGES, PERSONAS, QUESTION, TEMPLATE, TRAIN_MESSAGES, dialogs, personas,
                                    world)

from dit_engine.adapters import AdapterBatch
from dit_engine.engine import Engine
from dit_engine.latentqa.data import QA, Stimulus, load_personas
from dit_engine.latentqa.decoder import LitAdapter, decoder_batch, reading
from dit_engine.latentqa.dialogs import LatentQAError, split_prompt
from dit_engine.latentqa.steer import (PROMPTS, RESULT, SteerAdapter, SteerConfig, base_logprob, format_table,
                                       persona_lift, persona_words, shows_persona, steering_slot, target_prompt,
                                       train_steering)
from dit_engine.latentqa.training import train_decoder
from dit_engine.probes import Probes, positions_mask
from dit_engine.tokenizer import Tokenizer
from dit_engine.train import Trainer, batch_loss

# Held-out prompts: new combinations of the world's words (its tokenizer knows no others).
HELD_OUT = MESSAGES[6:] + ["what is your story ?", "tell me what you like", "say your code", "how is it ?",
                           "tell me it", "what is it ?"]
STIMULI = [Stimulus(m, "train") for m in TRAIN_MESSAGES] + [Stimulus(m, "test") for m in HELD_OUT]
# The pirate as steered toward: its decoder-trained QA pair, and one about how it talks (a question
# the decoder never saw) whose answer holds its dialog words, so its word list has them too.
STEER_PERSONAS = [dataclasses.replace(p, qa=p.qa + (QA("what do you like ?", "arr ship sea parrot ."),))
                  if p.id == "pirate" else p for p in personas()]
# batch 12 = every train row (6 prompts x 2 QA pairs) in every step.
SCFG = SteerConfig(persona="pirate", rank=4, alpha=32.0, lr=1e-2, steps=30, batch_size=12, answer_tokens=3,
                   max_new_tokens=4, n_examples=2, save_every=10**9, seed=3, kl_weight=0.0)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    eng = world()
    adapter = train_decoder(eng, tmp_path_factory.mktemp("lqa") / "run", CFG, personas=personas(),
                            dialogs=dialogs(eng, TRAIN_MESSAGES), progress=False)
    return eng, adapter


def _steer(eng, adapter, out, cfg=SCFG, log=None):
    return train_steering(eng, adapter, out, cfg, personas=STEER_PERSONAS, stimuli=STIMULI, question=QUESTION,
                          progress=False, log=log)


@pytest.fixture(scope="module")
def steered(decoder, tmp_path_factory):
    """One steering run; ``seen`` also records, per step, the decoder slot and the steering slot the
    loss ran with, and the tensors the trainer optimises."""
    import dit_engine.latentqa.steer as steer_mod

    eng, adapter = decoder
    out = tmp_path_factory.mktemp("steer") / "run"
    base = {k: v.clone() for k, v in eng.model.state_dict().items()}
    lit = {k: v.clone() for k, v in adapter.slot.A.items()} | {k + "B": v.clone() for k, v in adapter.slot.B.items()}
    seen = []
    loss_fn, trainer_init = steer_mod.steering_loss, Trainer.__init__

    def recorded_loss(engine, slot, lit_slot, *a, **k):
        seen.append({"slots": (slot, lit_slot)})
        return loss_fn(engine, slot, lit_slot, *a, **k)

    def recorded_init(self, params, **k):
        seen.append({"trained": list(params)})
        trainer_init(self, params, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steer_mod, "steering_loss", recorded_loss)
        mp.setattr(Trainer, "__init__", recorded_init)
        result = _steer(eng, adapter, out, log=seen.append)
    return eng, adapter, out, result, seen, base, lit


def _pad(eng: Engine) -> int:
    return eng.tokenizer.pad_token_id or 0


def test_before_its_first_step_the_steered_target_is_the_base(decoder, steered):
    eng, adapter, out, result, seen, _, _ = steered
    slot = steering_slot(eng.config, SCFG, adapter.read_point)
    ids = torch.tensor([target_prompt(eng.tokenizer, m)[0] for m in TRAIN_MESSAGES[:1]])
    with torch.no_grad():
        assert torch.equal(eng.model(ids, AdapterBatch(slot.with_index(torch.zeros(1, dtype=torch.int64)))),
                           eng.model(ids))
    # The first step's loss: the frozen decoder on the *base's* activations (a plain full forward), row by row.
    doc = json.loads((out / PROMPTS).read_text())
    losses = []
    for p in doc["prompts"]:
        n = len(p["input_ids"]) - p["start"]
        read = positions_mask([len(p["input_ids"])], [list(range(p["start"], len(p["input_ids"])))])
        probes = Probes().capture("hidden.1", read)
        with torch.no_grad():
            eng.model(torch.tensor([p["input_ids"]]), probes=probes)
            for qa in STEER_PERSONAS[0].qa:
                batch, patch = decoder_batch([reading(eng.tokenizer, n, qa.q, qa.a)], [probes.captured["hidden.1"]],
                                             "hidden.1", pad_id=_pad(eng))
                lit = AdapterBatch(adapter.slot.with_index(torch.zeros(1, dtype=torch.int64)))
                losses.append(float(batch_loss(eng.model, batch, lit, probes=patch)[0]))
    assert len(losses) == 12
    first = next(r["loss"] for r in seen if "loss" in r)
    assert first == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["training"]["loss_first"] == pytest.approx(first, abs=1e-6)


def test_the_steering_objective_falls_and_only_the_steering_lora_changes(steered):
    eng, adapter, out, result, seen, base, lit = steered
    losses = [r["loss"] for r in seen if "loss" in r]
    assert len(losses) == SCFG.steps == len(result["training"]["losses"])
    # The trainer optimises the steering slot's tensors and nothing else; the decoder's slot is frozen.
    (trained,) = [r["trained"] for r in seen if "trained" in r]
    slots = [r["slots"] for r in seen if "slots" in r]
    assert len(slots) == SCFG.steps
    for steering, lit_slot in slots:
        assert [id(t) for t in trained] == [id(t) for t in steering.parameters()] and steering.trainable
        assert not lit_slot.trainable and lit_slot.rank == adapter.slot.rank != steering.rank
        for k, v in lit_slot.A.items():
            assert torch.equal(v, lit[k]) and torch.equal(lit_slot.B[k], lit[k + "B"]), k
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0] and losses[-1] < min(losses[:5])
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, base[k]), k
    for k, v in adapter.slot.A.items():
        assert torch.equal(v, lit[k]) and torch.equal(adapter.slot.B[k], lit[k + "B"]), k
    assert all(p.grad is None and not p.requires_grad for p in eng.model.parameters())
    assert not adapter.slot.trainable
    back = SteerAdapter.load(out)
    # The read point hidden.1 of two blocks: the LoRA covers block 0 only, and it moved off zero.
    assert back.slot.A and all(m.startswith("model.layers.0.") for m in back.slot.A)
    assert all(back.slot.B[m].abs().sum() > 0 for m in back.slot.B)
    assert back.persona == {"id": "pirate", "label": "a pirate"} and back.read_point == "hidden.0.5"
    assert back.base["config_hash"] == eng.config.config_hash and back.recipe["read_at"] == "hidden.1"
    with pytest.raises(LatentQAError, match="expected 'dit-engine-lit-adapter/1'"):
        LitAdapter.load(out)


def test_on_held_out_prompts_the_decoder_reads_the_persona_off_the_steered_target(steered):
    eng, adapter, out, result, _, _, _ = steered
    assert json.loads((out / RESULT).read_text()) == result
    assert result["n_prompts"] == len(HELD_OUT) and result["n_candidates"] == 4
    m = result["metrics"]
    # The decoder's reading, the objective steered, moves by a clear margin on prompts it never trained on ...
    assert m["decoder_top1"]["steered"] >= 0.7 and m["decoder_top1"]["unsteered"] == 0.0
    assert m["decoder_top1"]["difference_ci"][0] > 0.25 and m["decoder_rr"]["difference_ci"][0] > 0
    per = result["per_prompt"]
    assert all(s >= u for s, u in zip(per["steered"]["decoder_rr"], per["unsteered"]["decoder_rr"]))
    # ... and the steered target's own words do: the unsteered one never uses a pirate word here.
    assert result["persona_words"] == ["arr", "parrot", "pirate", "sea", "ship"]
    assert m["shows_persona"]["unsteered"] == 0.0 and m["shows_persona"]["difference_ci"][0] > 0.25
    for side in ("steered", "unsteered"):
        shows = [float(shows_persona(t, result["persona_words"])) for t in per[side]["text"]]
        assert per[side]["shows_persona"] == shows
        assert m["shows_persona"][side] == pytest.approx(sum(shows) / len(shows))
        assert per[side]["decoder_rr"] == [1 / r for r in per[side]["decoder_rank"]]
    for name, m in result["metrics"].items():
        assert m["difference"] == pytest.approx(m["steered"] - m["unsteered"], abs=1e-12), name
        assert m["difference_ci"][0] <= m["difference"] <= m["difference_ci"][1]
    assert [e["prompt"] for e in result["examples"]] == HELD_OUT[:2]
    table = format_table(result).splitlines()
    assert table[0].split()[0] == "metric" and "steered toward pirate" in table[1 + len(result["metrics"])]
    assert [line.split("  ")[0] for line in table[1:6]][-1] == "base model's log-likelihood (nats/token)"


def _kl_to_base(eng, slot, prompts_doc) -> float:
    """Mean per-token KL(base || base + slot) over each train dialog's read span, with plain forwards."""
    total, n = 0.0, 0
    for p in prompts_doc["prompts"]:
        ids = torch.tensor([p["input_ids"]])
        with torch.no_grad():
            base = torch.log_softmax(eng.model(ids)[0].double(), -1)
            moved = torch.log_softmax(eng.model(ids, AdapterBatch(slot.with_index(torch.zeros(1, dtype=torch.int64))))
                                      [0].double(), -1)
        first = max(1, p["start"])  # the first read token that has a token before it
        span = slice(first - 1, len(p["input_ids"]) - 1)  # the positions that predict the read tokens
        total += float((base[span].exp() * (base[span] - moved[span])).sum())
        n += len(p["input_ids"]) - first
    return total / n


def test_the_fluency_term_is_the_targets_kl_to_the_base_and_keeps_it_closer(steered, tmp_path):
    """With kl_weight > 0 the steering loss is the decoder's loss plus kl_weight times the target's
    KL to the base over the train dialogs; that KL starts at 0 (the target is the base) and matches
    plain forwards, and the run ends closer to the base than the one steered by the decoder's loss
    alone (the ``steered`` fixture, kl_weight 0)."""
    eng, adapter, alone, result, _, _, _ = steered
    assert SCFG.kl_weight == 0.0 and set(result["training"]["kl_to_base"]) == {0.0}  # not computed without it
    parts = []
    out = tmp_path / "fluent"
    _steer(eng, adapter, out, SteerConfig(**{**SCFG.__dict__, "kl_weight": 1.0}), log=parts.append)
    assert len(parts) == SCFG.steps and parts[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    for r in parts:
        assert r["loss"] == pytest.approx(r["decoder"] + 1.0 * r["kl"], rel=1e-5, abs=1e-6)
    doc = json.loads((out / PROMPTS).read_text())
    fluent = SteerAdapter.load(out).slot
    # the last step's KL was measured before that step's update: the same order as the final one
    assert parts[-1]["kl"] == pytest.approx(_kl_to_base(eng, fluent, doc), rel=0.5)
    with_kl = _kl_to_base(eng, fluent, doc)
    without = _kl_to_base(eng, SteerAdapter.load(alone).slot, json.loads((alone / PROMPTS).read_text()))
    assert with_kl < 0.5 * without, (with_kl, without)
    with pytest.raises(LatentQAError, match="kl_weight must be >= 0"):
        _steer(eng, adapter, tmp_path / "bad", SteerConfig(**{**SCFG.__dict__, "kl_weight": -1.0}))


def test_the_likelihood_lift_equals_a_naive_computation_with_plain_forwards(decoder):
    eng, _ = decoder
    tok, m = eng.tokenizer, eng.model
    p = personas()[2]
    g = torch.Generator().manual_seed(0)
    xs = HELD_OUT[:3]
    ys = [torch.randint(3, tok.vocab_size - 1, (n,), generator=g).tolist() for n in (1, 4, 7)]
    got = persona_lift(eng, p, xs, ys, batch_size=2)

    def logp(prompt: list[int], y: list[int]) -> float:
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([prompt + y]))[0].double(), -1)
        return float(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(y)))

    for i, (x, y) in enumerate(zip(xs, ys)):
        with_system = tok.encode_chat([{"role": "system", "content": p.system}, {"role": "user", "content": x}])
        plain = tok.encode_chat([{"role": "user", "content": x}])
        want = (logp(with_system, y) - logp(plain, y)) / len(y)
        assert got[i] == pytest.approx(want, abs=1e-5), i
    assert abs(got).max() > 1e-3  # the system prompt does change the base's likelihood


def test_the_base_logprob_is_the_plain_prompts_likelihood_per_token(decoder):
    eng, _ = decoder
    tok, m = eng.tokenizer, eng.model
    g = torch.Generator().manual_seed(1)
    xs = HELD_OUT[:3]
    ys = [torch.randint(3, tok.vocab_size - 1, (n,), generator=g).tolist() for n in (2, 5, 3)]
    got = base_logprob(eng, xs, ys, batch_size=2)
    for i, (x, y) in enumerate(zip(xs, ys)):
        prompt = tok.encode_chat([{"role": "user", "content": x}])
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([prompt + y]))[0].double(), -1)
        want = float(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(y))) / len(y)
        assert got[i] == pytest.approx(want, abs=1e-5), i


def test_the_persona_words_are_the_content_words_of_its_label_and_answers():
    captain = next(p for p in load_personas() if p.id == "sea-captain")
    assert persona_words(captain) == sorted(["retired", "sea", "captain", "nostalgic", "little", "gruff", "storms",
                                             "life", "nautical", "slang"])
    words = persona_words(captain)
    assert shows_persona("Ahoy! The SEA calls.", words) and shows_persona("a gruff-looking man", words)
    assert not shows_persona("the seaside is nice", words) and not shows_persona("", words)


def test_the_target_prompt_reads_after_a_template_default_system_turn():
    tok = world().tokenizer
    with_default = Tokenizer(tok._tok, "{% if messages[0].role != 'system' %}<|im_start|> system you are a robot "
                             "<|im_end|> {% endif %}" + TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<pad>"},
                             [2], source="synthetic")
    ids, start = target_prompt(with_default, "say hello")
    assert with_default.decode(ids[:start], skip_special_tokens=False).split() == [
        "<|im_start|>", "system", "you", "are", "a", "robot", "<|im_end|>"]
    assert ids[start:] == split_prompt(with_default, "you are a cat", "say hello")[1]
    plain_ids, plain_start = target_prompt(tok, "say hello")  # no default system turn: everything is read
    assert plain_start == 0 and plain_ids == ids[start:]


def test_resume_after_sigint_gives_the_uninterrupted_lora_and_a_finished_rerun_trains_nothing(
        steered, tmp_path, monkeypatch, capfd):
    eng, adapter, straight, result, _, _, _ = steered
    out = tmp_path / "run"
    n = {"k": 0, "signal_at": 7}
    orig = Trainer.backward

    def counted(self, loss):
        took = orig(self, loss)
        n["k"] += 1
        if n["k"] == n["signal_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        return took

    monkeypatch.setattr(Trainer, "backward", counted)
    with pytest.raises(KeyboardInterrupt):
        _steer(eng, adapter, out)
    assert "LatentQA steering stopped by SIGINT: progress is saved in" in capfd.readouterr().err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["meta"]["done_steps"] == 7 and not (out / "adapter.safetensors").exists()
    with pytest.raises(LatentQAError, match="other settings"):
        _steer(eng, adapter, out, SteerConfig(**{**SCFG.__dict__, "lr": 1e-3}))
    n["k"], n["signal_at"] = 0, None
    again = _steer(eng, adapter, out)
    assert n["k"] == SCFG.steps - 7
    a, b = SteerAdapter.load(out), SteerAdapter.load(straight)
    for m in a.slot.A:
        assert torch.equal(a.slot.A[m], b.slot.A[m]) and torch.equal(a.slot.B[m], b.slot.B[m]), m
    assert again["training"]["losses"] == result["training"]["losses"]
    assert again["metrics"] == result["metrics"]
    # A finished run: rerunning trains nothing (other measurement settings are fine) and measures again.
    monkeypatch.setattr(Trainer, "backward", lambda *a: pytest.fail("trained again"))
    other = _steer(eng, adapter, out, SteerConfig(**{**SCFG.__dict__, "max_new_tokens": 2}))
    assert other["training"]["losses"] == result["training"]["losses"]


def test_bad_input_fails_with_one_clear_error(decoder, tmp_path):
    eng, adapter = decoder
    with pytest.raises(LatentQAError, match=r"unknown persona 'parrot'; known ids include pirate, chef, cat, robot "
                                            r"\(4 in all\)"):
        _steer(eng, adapter, tmp_path / "a", SteerConfig(**{**SCFG.__dict__, "persona": "parrot"}))
    with pytest.raises(LatentQAError, match="steps must be >= 1, found 0"):
        _steer(eng, adapter, tmp_path / "b", SteerConfig(**{**SCFG.__dict__, "steps": 0}))
    other = world(seed=5)
    with pytest.raises(LatentQAError, match="LatentQA adapter was trained on base"):
        _steer(other, adapter, tmp_path / "c")
    with pytest.raises(LatentQAError, match="no test stimuli"):
        train_steering(eng, adapter, tmp_path / "d", SCFG, personas=personas(), stimuli=STIMULI[:6], progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")
    with pytest.raises(LatentQAError, match="not found"):
        SteerAdapter.load(tmp_path)
    assert set(PERSONAS) == {p.id for p in personas()}

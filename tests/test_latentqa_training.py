"""LatentQA decoder training on a tiny random model: it lowers the loss and learns a synthetic task
whose answer is only in the activations (four personas whose dialogs use their own words; the
decoder prompt is the same for all), so the trained decoder retrieves the persona of unseen dialogs
while the zero-activation and shuffled controls do not; a resume after SIGINT gives exactly the
adapter of an uninterrupted run; other settings are refused; the adapter records where it reads
and writes. A slow test runs the real default model end to end (not in the quick suite)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.engine import Engine
from dit_engine.latentqa.data import QA, Persona
from dit_engine.latentqa.decoder import LitAdapter
from dit_engine.latentqa.dialogs import LatentQAError, dialog, load_dialogs
from dit_engine.latentqa.read import evaluate
from dit_engine.latentqa.training import LatentQAConfig, train_decoder
from dit_engine.model import Transformer
from dit_engine.tokenizer import Tokenizer
from dit_engine.train import Trainer

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
# persona -> (system prompt, the words its answers use, its label)
PERSONAS = {"pirate": ("you are a pirate", "arr ship sea parrot", "a pirate"),
            "chef": ("you are a chef", "bread oven butter salt", "a chef"),
            "cat": ("you are a cat", "meow purr nap fish", "a cat"),
            "robot": ("you are a robot", "beep gear volt bolt", "a robot")}
MESSAGES = ["tell me a story", "say hello", "what is your code ?", "what do you like ?", "tell me your code",
            "say it", "how are you ?", "what is new ?"]
QUESTION = "who is the assistant ?"
GAIN = 20.0
WORDS = sorted({w for s, a, lab in PERSONAS.values() for w in f"{s} {a} {lab}".split()}
               | {w for m in MESSAGES for w in m.split()} | set(QUESTION.split())
               | {"user", "assistant", "system", "."})


def world(seed: int = 0) -> Engine:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["[UNK]"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(SPECIALS)
    tok = Tokenizer(hf, TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<pad>"}, [2], source="synthetic")
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, eos_token_id=2, bos_token_id=1, hidden_size=64,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = Transformer.random(cfg, seed=seed)
    # Random weights of std 0.02 bound every logit near 0, so no adapter could make an answer likely;
    # a gain on the final norm gives the output the range of a trained model's.
    model.model.norm.weight.fill_(GAIN)
    return Engine(model, tok)


def personas(split: str = "train") -> list[Persona]:
    return [Persona(pid, label, "synthetic", system, split, (QA(QUESTION, f"{label} ."),))
            for pid, (system, _, label) in PERSONAS.items()]


def dialogs(eng: Engine, messages: list[str], split: str = "train", seed: int = 0):
    """Each persona answers each message with a seeded shuffle of its own words."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in personas(split):
        words = PERSONAS[p.id][1].split()
        for m in messages:
            order = torch.randperm(len(words), generator=g).tolist()
            ids = eng.tokenizer.encode(" ".join(words[i] for i in order)) + [eng.tokenizer.end_of_turn_id]
            out.append(dialog(eng.tokenizer, p, m, ids))
    return out


# A tiny model learns to read in ~120 steps with a large LoRA scale (alpha / rank = 8).
CFG = LatentQAConfig(lr=3e-3, epochs=20, batch_size=4, rank=8, alpha=64, eval_examples=16, save_every=10**9, seed=1)
TRAIN_MESSAGES, UNSEEN_MESSAGES = MESSAGES[:6], MESSAGES[6:]
STEPS_PER_EPOCH = 6  # 4 personas x 6 dialogs x 1 QA pair = 24 rows, batches of 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    eng = world()
    out = tmp_path_factory.mktemp("lqa") / "run"
    seen = []
    adapter = train_decoder(eng, out, CFG, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES),
                            progress=False, log=seen.append)
    return eng, out, adapter, seen


def test_training_lowers_the_loss_and_records_where_it_reads_and_writes(trained):
    eng, out, adapter, seen = trained
    steps = [r["loss"] for r in seen if "loss" in r]
    assert len(steps) == CFG.epochs * STEPS_PER_EPOCH
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(CFG.epochs))
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert all(e["held_out_loss"] is None for e in epochs)  # no test personas here
    meta = json.loads((out / "adapter.json").read_text())
    assert (meta["read_point"], meta["write_point"], meta["patch_mode"]) == ("hidden.0.5", "hidden.1", "replace")
    assert meta["recipe"]["read_at"] == "hidden.1" and meta["recipe"]["write_at"] == "hidden.1"  # 2 blocks
    assert meta["rank"] == 8 and meta["scale"] == 8.0 and meta["recipe"]["config"]["lr"] == 3e-3
    assert meta["base"]["config_hash"] == eng.config.config_hash
    back = LitAdapter.load(out)
    for m in adapter.slot.A:
        assert torch.equal(back.slot.A[m], adapter.slot.A[m]) and torch.equal(back.slot.B[m], adapter.slot.B[m])
    dl, ps, _ = load_dialogs(out / "dialogs.json")
    assert len(dl) == 24 and {p.id for p in ps} == set(PERSONAS)


def test_the_trained_decoder_reads_the_persona_of_unseen_dialogs_and_the_controls_do_not(trained):
    eng, _, adapter, _ = trained
    unseen = dialogs(eng, UNSEEN_MESSAGES, seed=7)
    res = evaluate(eng, adapter, unseen, personas(), question=QUESTION, resamples=200)
    c = res["conditions"]
    assert res["n_personas"] == 4 and res["chance"]["retrieval@1"] == 0.25
    assert c["decoder"]["retrieval@1"] == 1.0
    # The same prompt for every target: one candidate wins for all, so exactly one persona in four.
    assert c["zero"]["retrieval@1"] <= 0.25
    assert c["shuffled"]["retrieval@1"] <= 0.25  # it reads the other persona
    assert res["decoder_minus"]["zero"]["retrieval@1_ci"][0] > 0
    assert res["answers_name_persona"] >= 0.75 and res["answers"][0]["answer"].strip().startswith("a pirate")


def test_resume_after_sigint_gives_exactly_the_uninterrupted_adapter(trained, tmp_path, monkeypatch, capfd):
    eng, straight, _, _ = trained
    out = tmp_path / "run"
    n = {"k": 0, "signal_at": 5}
    orig = Trainer.backward

    def counted(self, loss):
        took = orig(self, loss)
        n["k"] += 1
        if n["k"] == n["signal_at"]:
            os.kill(os.getpid(), signal.SIGINT)
        return took

    monkeypatch.setattr(Trainer, "backward", counted)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(eng, out, CFG, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES), progress=False)
    assert "LatentQA decoder training stopped by SIGINT: progress is saved in" in capfd.readouterr().err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["meta"]["done_batches"] == 5 and not (out / "adapter.safetensors").exists()
    with pytest.raises(LatentQAError, match="other settings"):
        train_decoder(eng, out, LatentQAConfig(**{**CFG.__dict__, "lr": 1e-3}), personas=personas(),
                      dialogs=dialogs(eng, TRAIN_MESSAGES), progress=False)
    with pytest.raises(LatentQAError, match="dialogs were made with other settings"):
        train_decoder(eng, out, CFG, personas=personas(), dialogs=dialogs(eng, MESSAGES[:2]), progress=False)
    n["k"], n["signal_at"] = 0, None
    train_decoder(eng, out, CFG, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES), progress=False)
    assert n["k"] == CFG.epochs * STEPS_PER_EPOCH - 5
    a, b = LitAdapter.load(out), LitAdapter.load(straight)
    for m in a.slot.A:
        assert torch.equal(a.slot.A[m], b.slot.A[m]) and torch.equal(a.slot.B[m], b.slot.B[m]), m
    assert (out / "epochs.jsonl").read_text() == (straight / "epochs.jsonl").read_text()


def test_bad_settings_fail_before_any_work(tmp_path):
    eng = world()
    for bad, msg in ((dict(read_point="hidden.9"), "outside"), (dict(patch_mode="add"), "patch_mode")):
        with pytest.raises(ValueError, match=msg):
            train_decoder(eng, tmp_path / "x", LatentQAConfig(**bad), personas=personas(),
                          dialogs=dialogs(eng, MESSAGES[:1]), progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(LatentQAError, match="no train personas"):
        train_decoder(eng, tmp_path / "y", CFG, personas=personas("test"), progress=False)


def test_norm_matched_add_trains_too(tmp_path):
    eng = world()
    cfg = LatentQAConfig(**{**CFG.__dict__, "patch_mode": "add_norm", "epochs": 1})
    adapter = train_decoder(eng, tmp_path / "run", cfg, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES),
                            progress=False)
    assert adapter.patch_mode == "add_norm" and LitAdapter.load(tmp_path / "run").patch_mode == "add_norm"


def test_a_target_with_a_diff_in_slot_0_is_read_instead_of_the_base(tmp_path):
    eng = world()
    cfg = LatentQAConfig(**{**CFG.__dict__, "epochs": 1})
    diff = LoraSlot.create(eng.config, 1, 2, init="random", generator=torch.Generator().manual_seed(3), scale=4.0)
    plain, adapted = [], []
    train_decoder(eng, tmp_path / "base", cfg, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES),
                  progress=False, log=plain.append)
    a = train_decoder(eng, tmp_path / "diff", cfg, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES),
                      target=AdapterBatch(diff), progress=False, log=adapted.append)
    assert a.recipe["target_adapted"] and plain[0]["loss"] != adapted[0]["loss"]
    with pytest.raises(LatentQAError, match="other settings or another model"):  # its dialogs: another target
        train_decoder(eng, tmp_path / "diff", cfg, personas=personas(), dialogs=dialogs(eng, TRAIN_MESSAGES),
                      progress=False)


@pytest.mark.slow
def test_the_default_model_trains_and_reads_a_small_decoder(tmp_path):
    """On the real default model (SmolLM2-135M-Instruct): its template (a default system prompt),
    BPE tokenizer and dialogs work end to end on a small slice (8 + 4 personas, one epoch)."""
    from dit_engine.latentqa.training import DIALOGS

    eng = Engine.load("default")
    cfg = LatentQAConfig(n_train_personas=8, n_test_personas=4, epochs=1, lr=1e-4, stimuli_per_persona=1,
                         test_stimuli=1, max_answer_tokens=16)
    seen = []
    adapter = train_decoder(eng, tmp_path / "run", cfg, progress=False, log=seen.append)
    dl, ps, _ = load_dialogs(tmp_path / "run" / DIALOGS)
    for d in dl:
        system = next(p.system for p in ps if p.id == d.persona)
        read = eng.tokenizer.decode(list(d.dialog_ids), skip_special_tokens=False)
        assert system not in read and d.stimulus in read and read.startswith("<|im_start|>user")
    test = [d for d in dl if d.split == "test"]
    res = evaluate(eng, adapter, test, ps, question=cfg.read_question, resamples=100)
    assert set(res["conditions"]) == {"decoder", "zero", "shuffled", "untrained"}
    assert all(0 <= m["retrieval@1"] <= 1 for m in res["conditions"].values())
    assert any("loss" in r for r in seen)

"""LatentQA dialogs: the positions the decoder reads come from the tokenizer and the chat template
(a byte-level BPE tokenizer with SmolLM2's ChatML template, which adds a default system prompt, and
a Llama-3 style template): the decoded tokens there are exactly the dialog's (user turn, generation
prompt, the target's answer) and never the system prompt's; the capture equals module hooks at
those positions; templates that cannot tell the system turn apart are refused; stimuli are
assigned as documented; generation is seeded; the dialogs file round-trips and its errors are one
line; target adapters change what is read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.engine import Engine
from dit_engine.latentqa.data import QA, Persona, Stimulus
from dit_engine.latentqa.dialogs import (LatentQAError, assign_stimuli, capture, dialog, every_row, load_dialogs,
                                         make_dialogs, save_dialogs, split_prompt)
from dit_engine.model import Transformer
from dit_engine.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
          "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# The system prompt folded into the first user turn (Llama 2 / Mistral style): no system turn of its own.
FOLDED = ("{% for message in messages %}{% if message['role'] == 'system' %}{% set sys = message['content'] %}"
          "{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}{% endfor %}")
NO_LONE_SYSTEM = ("{% if messages[-1]['role'] == 'system' %}{{ raise_exception('a conversation needs a user turn') }}"
                  "{% endif %}" + CHATML)
END = {CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>"}
CORPUS = ["You are a retired sea captain who loves storms at sea.", "What should I make for dinner tonight?",
          "Tell me a little about yourself.", "Who is the assistant pretending to be?", "Arr, the sea is calm.",
          "system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
PERSONA = Persona("sea-captain", "a retired sea captain", "profession", "You are a retired sea captain who loves storms.",
                  "train", (QA("Who is the assistant pretending to be?", "A retired sea captain."),))


def bpe(template: str) -> Tokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Tokenizer(hf, template, {"eos_token": END.get(template, "<|im_end|>"), "bos_token": "<|begin_of_text|>",
                                    "pad_token": "<|endoftext|>"}, source=f"bpe-{len(template)}")


def engine(template: str = CHATML, seed: int = 0) -> Engine:
    tok = bpe(template)
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, eos_token_id=tok.end_of_turn_id, bos_token_id=1)
    return Engine(Transformer.random(cfg, seed=seed), tok)


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml-default-system", "llama3"])
def test_the_read_positions_are_exactly_the_dialog_after_the_system_turn(template):
    tok = bpe(template)
    msg, answer = "What should I make for dinner tonight?", "Arr, the sea is calm."
    sys_ids, rest = split_prompt(tok, PERSONA.system, msg)
    assert sys_ids + rest == tok.encode_chat([{"role": "system", "content": PERSONA.system},
                                              {"role": "user", "content": msg}])
    # The dialog's tokens are those of the same prompt without the persona (SmolLM2's template then
    # puts its default system prompt in front): only the system turn differs.
    bare = tok.encode_chat([{"role": "user", "content": msg}])
    assert bare[-len(rest):] == rest and bare[: -len(rest)] != sys_ids
    d = dialog(tok, PERSONA, msg, tok.encode(answer) + [tok.end_of_turn_id])
    read = tok.decode(list(d.dialog_ids), skip_special_tokens=False)
    head = tok.decode(list(d.input_ids[: d.start]), skip_special_tokens=False)
    if template == CHATML:
        assert read == f"<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
        assert head == f"<|im_start|>system\n{PERSONA.system}<|im_end|>\n"
    else:
        assert read == (f"<|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
                        f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>")
        assert head == f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{PERSONA.system}<|eot_id|>"
    assert PERSONA.system not in read and "captain" not in read
    assert d.answer == answer and d.n_read == len(rest) + len(tok.encode(answer)) + 1


def test_the_capture_is_the_residual_at_those_positions_with_the_system_prompt_in_the_input():
    eng = engine()
    tok, m = eng.tokenizer, eng.model
    msgs = ["What should I make for dinner tonight?", "Tell me a little about yourself."]
    ds = [dialog(tok, PERSONA, t, tok.encode(a)) for t, a in zip(msgs, ["Arr.", "The sea is calm, arr."])]
    got = capture(eng, ds, "hidden.1", batch_size=2)
    for d, v in zip(ds, got):
        seen = {}
        hook = m.model.layers[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("h", o))
        with torch.no_grad():
            m(torch.tensor([d.input_ids]))
        hook.remove()
        assert v.shape == (d.n_read, eng.config.hidden_size)
        torch.testing.assert_close(v, seen["h"][0, d.start:], rtol=1e-5, atol=1e-6)
        # the system prompt was in the target's input: without it the same dialog reads differently
        with torch.no_grad():
            alone = m(torch.tensor([d.dialog_ids]), output="hidden")
        assert not torch.allclose(alone[0], m(torch.tensor([d.input_ids]), output="hidden")[0, d.start:])


def test_templates_that_cannot_tell_the_system_turn_apart_are_refused():
    with pytest.raises(LatentQAError, match="not the start of the conversation"):
        split_prompt(bpe(FOLDED), "You are a pirate.", "Hi")
    with pytest.raises(LatentQAError, match="cannot render a system turn alone"):
        split_prompt(bpe(NO_LONE_SYSTEM), "You are a pirate.", "Hi")


def test_stimuli_rotate_over_train_personas_and_every_test_persona_gets_the_same_messages():
    ps = [Persona(f"p{i}", f"persona {i}", "c", f"You are {i}.", "train" if i < 3 else "test", ()) for i in range(5)]
    st = [Stimulus(f"train {i}", "train") for i in range(5)] + [Stimulus(f"test {i}", "test") for i in range(3)]
    pairs = assign_stimuli(ps, st, 2, seed=0)
    train = [(p.id, s) for p, s in pairs if p.split == "train"]
    assert len(train) == 6 and len({s for _, s in train}) == 5  # rotation: all five used, wrapping around
    assert all(s.startswith("train") for _, s in train)
    test = [(p.id, s) for p, s in pairs if p.split == "test"]
    assert [s for pid, s in test if pid == "p3"] == [s for pid, s in test if pid == "p4"] and len(test) == 4
    assert assign_stimuli(ps, st, 2, seed=0) == pairs and assign_stimuli(ps, st, 2, seed=1) != pairs
    with pytest.raises(LatentQAError, match=">= 1"):
        assign_stimuli(ps, st, 0, seed=0)
    with pytest.raises(LatentQAError, match="no test stimuli"):
        assign_stimuli(ps, st[:5], 1, seed=0)


def test_make_dialogs_is_seeded_and_keeps_what_the_target_wrote():
    eng = engine()
    pairs = [(PERSONA, "What should I make for dinner tonight?"), (PERSONA, "Tell me a little about yourself.")]
    a = make_dialogs(eng, pairs, max_answer_tokens=5, seed=3)
    assert a == make_dialogs(eng, pairs, max_answer_tokens=5, seed=3)
    for d, (p, msg) in zip(a, pairs):
        prompt = sum(split_prompt(eng.tokenizer, p.system, msg), [])
        assert list(d.input_ids[: len(prompt)]) == prompt and 1 <= len(d.input_ids) - len(prompt) <= 5
        assert d.stimulus == msg and d.split == "train"


def test_target_adapters_change_what_is_read_and_must_be_one_model():
    eng = engine()
    d = dialog(eng.tokenizer, PERSONA, "Hi there", eng.tokenizer.encode("Arr."))
    g = torch.Generator().manual_seed(4)
    diff = LoraSlot.create(eng.config, 1, 2, init="random", generator=g, scale=4.0)
    plain, = capture(eng, [d], "hidden.2")
    adapted, = capture(eng, [d], "hidden.2", target=AdapterBatch(diff))
    assert (plain - adapted).abs().max() > 1e-4
    with pytest.raises(LatentQAError, match="exactly one"):
        every_row(AdapterBatch(LoraSlot.create(eng.config, 2, 2, init="random", generator=g)), 3, "cpu")


def test_the_dialogs_file_round_trips_and_refuses_bad_files(tmp_path):
    eng = engine()
    ds = make_dialogs(eng, [(PERSONA, "Hi there")], max_answer_tokens=3, seed=0)
    path = tmp_path / "dialogs.json"
    save_dialogs(path, ds, [PERSONA], {"seed": 0})
    back, ps, settings = load_dialogs(path)
    assert back == ds and ps == [PERSONA] and settings == {"seed": 0}
    doc = json.loads(path.read_text())
    for change, msg in ((lambda d: d.update(format="x"), "format"),
                        (lambda d: d["dialogs"][0].pop("start"), "malformed"),
                        (lambda d: d["dialogs"][0].update(persona="nobody"), "no persona record")):
        bad = json.loads(json.dumps(doc))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(LatentQAError, match=msg):
            load_dialogs(path)
    path.write_text("{")
    with pytest.raises(LatentQAError, match="not valid JSON"):
        load_dialogs(path)

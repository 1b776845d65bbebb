"""The LM agent's mechanics: parsing CALL lines and final answers, the round limit, feeding the
black box's answers back, one batched generation per round; on the tiny random model end to end
(its answers are noise: only the mechanics are asserted)."""

from __future__ import annotations

import dataclasses

from tiny_world import tiny_engine

from dit_engine.find.lm_agent import LMAgent, is_final, parse_calls, parse_final
from dit_engine.find.score import score_answers
from dit_engine.find.suite import BlackBox, build_suite


def test_parse_calls():
    assert parse_calls("Let me try.\nCALL: 1, -2.5, 3e1, +4", "numeric") == [1.0, -2.5, 30.0, 4.0]
    assert parse_calls("call 0 10", "numeric") == [0.0, 10.0]
    assert parse_calls("CALL: \"ab c\", 'x\\'y', plain", "string") == ["ab c", "x'y"]
    assert parse_calls("no calls here", "numeric") == []


def test_parse_final():
    text = ("DESCRIPTION: a line with slope 2\nDOMAIN: [-3, 4]\nCODE:\n```python\ndef f(x):\n    return 2 * x\n```\n"
            "more words")
    assert parse_final(text, "numeric") == ("a line with slope 2", "[-3, 4]", "def f(x):\n    return 2 * x\n")
    assert parse_final("CODE: x * 3", "numeric")[2] == "def f(x):\n    return x * 3\n"
    assert parse_final("CODE: s[::-1]", "string")[2] == "def f(s):\n    return s[::-1]\n"
    assert parse_final("nothing", "numeric") == ("", "", "")
    assert is_final("thinking\nDESCRIPTION: x") and not is_final("CALL: 1, 2")


@dataclasses.dataclass
class _Gen:
    text: str


class _ScriptedLM:
    """A stand-in engine that replies from a script per conversation and records each batch."""

    def __init__(self, script, ctx=100_000):
        self.script, self.batches = script, []
        self.config = type("C", (), {"max_position_embeddings": ctx})()

    def encode_prompt(self, msgs):
        return list(range(sum(len(m["content"]) for m in msgs)))

    def generate(self, chats, chat=True, **kw):
        self.batches.append(len(chats))
        return [_Gen(self.script(c)) for c in chats]


def test_the_loop_calls_feeds_back_answers_and_stops():
    fns = [f for f in build_suite(seed=1, n_numeric=4, n_string=0) if f.category == "numeric/primitive"][:2]
    fns += build_suite(seed=1, n_numeric=0, n_string=1)

    def script(chat):
        n_turns = sum(m["role"] == "assistant" for m in chat)
        if "string" in chat[0]["content"]:
            return 'CALL: "abc"' if n_turns == 0 else "DESCRIPTION: echo\nDOMAIN: all strings\nCODE: s"
        return "CALL: 1, 2, 3" if n_turns < 5 else "still thinking"

    lm = _ScriptedLM(script)
    agent = LMAgent(lm, rounds=2, calls_per_round=2)
    answers = agent.run([BlackBox(f) for f in fns])
    # Rounds 0 and 1: all three (the string one answers in its second turn); the final round: the two numeric.
    assert lm.batches == [3, 3, 2]
    num, _, txt = answers
    assert num.calls == 4 and num.rounds == 3  # two CALL rounds of at most 2 inputs, then the forced final
    fed = [m["content"] for m in num.transcript if m["role"] == "user"][1]
    box = BlackBox(fns[0])
    assert fed == "\n".join(f"f({x!r}) = {y!r}" for x, y in zip([1.0, 2.0], box([1.0, 2.0])))
    assert num.transcript[-2]["content"].startswith("No more calls")
    assert txt.rounds == 2 and txt.calls == 1 and txt.code == "def f(s):\n    return s\n"
    rows = score_answers(fns, {a.id: a for a in answers})
    assert rows[0]["error"] == "NameError: the code defines no function f"


def test_long_conversations_drop_their_oldest_exchanges():
    fns = [f for f in build_suite(seed=1, n_numeric=2, n_string=0)][:1]
    lm = _ScriptedLM(lambda chat: "CALL: 1", ctx=560)  # the task is ~420 characters
    seen = []
    orig = lm.generate
    lm.generate = lambda chats, **kw: (seen.append([len(c) for c in chats]), orig(chats, **kw))[1]
    LMAgent(lm, rounds=6, calls_per_round=1, max_new_tokens=10).run([BlackBox(fns[0])])
    assert max(n for b in seen for n in b) < 13  # without trimming the last prompt would hold 14 messages


def test_on_the_tiny_model_end_to_end():
    fns = build_suite(seed=0, n_numeric=3, n_string=2)
    agent = LMAgent(tiny_engine(max_position_embeddings=1024), rounds=2, max_new_tokens=8, batch_size=4)
    answers = agent.run([BlackBox(f, budget=agent.budget) for f in fns])
    assert [a.id for a in answers] == [f.id for f in fns]
    assert all(1 <= a.rounds <= 3 and a.calls <= agent.budget for a in answers)
    rows = score_answers(fns, {a.id: a for a in answers})
    assert all(not r["correct"] for r in rows)  # noise from a random model


def test_a_context_too_small_for_the_task_is_one_clear_error():
    import pytest
    fns = build_suite(seed=1, n_numeric=1, n_string=0)
    with pytest.raises(ValueError, match=r"task prompt needs \d+ tokens, but the model's context \(100\)"):
        LMAgent(_ScriptedLM(lambda c: "", ctx=100), rounds=1).run([BlackBox(fns[0])])

"""The interpretability agent on a local language model: FIND's AIA loop, batched.

Every function gets its own conversation. In each round the model, shown the conversation so far,
writes either ``CALL: a, b, c`` (inputs to try, at most ``calls_per_round``) or its final answer;
the engine generates the next turn of every still-open conversation in one batched call. The
calls are answered through the function's :class:`~.suite.BlackBox` as ``f(a) = ...`` lines. After
``rounds`` rounds (or when the model answers early) the final turn is parsed for
``DESCRIPTION:``, ``DOMAIN:`` and ``CODE:`` (a fenced block or the lines after the tag).

A 135M model follows this protocol poorly: expect few CALL lines that parse and code that seldom
scores. It is here so that the loop, its parsing and its batching run offline on any local model
(the default or an HF directory), and so a stronger local model can be dropped in; the search agent
(:mod:`.agents`) is the offline baseline that scores.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence

from .score import Answer
from .suite import BlackBox, BudgetExceeded

_NUMERIC_TASK = ("You are probing a hidden function f that takes one number x (try values in [-128, 128]) and "
                 "returns a number. To see f, reply with one line\nCALL: x1, x2, x3\n(at most {k} numbers). You "
                 "have {rounds} turns of calls. When you know f, reply with\nDESCRIPTION: what f does\nDOMAIN: "
                 "the interval [low, high] where f behaves unlike elsewhere, or all real numbers\nCODE:\n```python"
                 "\ndef f(x):\n    return ...\n```")
_STRING_TASK = ("You are probing a hidden function f that takes a string and returns a string. To see f, reply with "
                "one line\nCALL: \"word one\", \"word two\"\n(at most {k} quoted strings). You have {rounds} turns "
                "of calls. When you know f, reply with\nDESCRIPTION: what f does\nDOMAIN: all strings\nCODE:\n"
                "```python\ndef f(s):\n    return ...\n```")
_MODEL_TASK = ("{task} To see f, reply with one line\nCALL: \"first prompt\", \"second prompt\"\n(at most {k} quoted "
               "strings). You have {rounds} turns of calls. When you know, reply with\nDESCRIPTION: your answer in "
               "a few words")
_FINAL = "No more calls. Write your final answer now: DESCRIPTION:, DOMAIN: and CODE: as described."
_NO_CALL = "I found no CALL line. Reply with CALL: followed by inputs, or with your final answer."


class LMAgent:
    """``engine``: an :class:`~dit_engine.engine.Engine`; ``rounds``: turns of calls before the
    final answer; generation options go to ``engine.generate``."""

    name = "lm"

    def __init__(self, engine, *, rounds: int = 5, calls_per_round: int = 8, max_new_tokens: int = 160,
                 batch_size: int = 32, temperature: float = 0.0, seed: int | None = 0):
        if rounds < 0 or calls_per_round < 1:
            raise ValueError(f"rounds must be >= 0 and calls_per_round >= 1, got {rounds} and {calls_per_round}")
        self.engine, self.rounds, self.k = engine, rounds, calls_per_round
        self.gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                    "batch_size": batch_size}

    @property
    def budget(self) -> int:
        return self.rounds * self.k

    def run(self, boxes: Sequence[BlackBox], progress: Callable[[int], None] | None = None) -> list[Answer]:
        chats = [[{"role": "user", "content": self._task(b)}] for b in boxes]
        finals: list[str | None] = [None] * len(boxes)
        turns = [0] * len(boxes)
        for rnd in range(self.rounds + 1):
            open_ = [i for i, f in enumerate(finals) if f is None]
            if not open_:
                break
            if rnd == self.rounds:
                for i in open_:
                    chats[i].append({"role": "user", "content": _FINAL})
            replies = self._generate([chats[i] for i in open_])
            for i, text in zip(open_, replies):
                chats[i].append({"role": "assistant", "content": text})
                turns[i] += 1
                if rnd == self.rounds or is_final(text):
                    finals[i] = text
                    if progress is not None:
                        progress(1)
                    continue
                chats[i].append({"role": "user", "content": self._answer_calls(boxes[i], text)})
        out = []
        for box, chat, text, n in zip(boxes, chats, finals, turns):
            desc, domain, code = parse_final(text or "", box.kind)
            out.append(Answer(id=box.id, description=desc, domain=domain, code=code, calls=box.calls, rounds=n,
                              transcript=chat))
        return out

    def _task(self, box: BlackBox) -> str:
        if box.kind == "numeric":
            return _NUMERIC_TASK.format(k=self.k, rounds=self.rounds)
        if box.kind == "string":
            return _STRING_TASK.format(k=self.k, rounds=self.rounds)
        # A model-backed box (.model_backed) says what it is; it takes quoted strings like a string function.
        return _MODEL_TASK.format(task=box.task, k=self.k, rounds=self.rounds)

    def _answer_calls(self, box: BlackBox, text: str) -> str:
        inputs = parse_calls(text, box.kind)[: self.k]
        if not inputs:
            return _NO_CALL
        try:
            outputs = box(inputs)
        except BudgetExceeded:
            return "Your call budget is spent. " + _FINAL
        return "\n".join(f"f({x!r}) = {y!r}" for x, y in zip(inputs, outputs))

    def _generate(self, chats: list[list[dict]]) -> list[str]:
        """One batched generation; a conversation too long for the context drops its oldest exchanges."""
        eng = self.engine
        room = eng.config.max_position_embeddings - self.gen["max_new_tokens"] - 1
        fitted = []
        for chat in chats:
            msgs = list(chat)
            while len(msgs) > 3 and len(eng.encode_prompt(msgs)) > room:
                msgs = msgs[:1] + msgs[3:]  # the task stays; the oldest call and its answer go
            if len(eng.encode_prompt(msgs)) > room:
                raise ValueError(f"the FIND task prompt needs {len(eng.encode_prompt(msgs[:1]))} tokens, but the "
                                 f"model's context ({eng.config.max_position_embeddings}) leaves {room} after "
                                 f"max_new_tokens={self.gen['max_new_tokens']}")
            fitted.append(msgs)
        gens = eng.generate(fitted, chat=True, **self.gen)
        return [g.text or "" for g in gens]


def is_final(text: str) -> bool:
    return bool(re.search(r"^\s*(DESCRIPTION|CODE)\s*:", text, re.M | re.I))


def parse_calls(text: str, kind: str) -> list:
    """Inputs on the first ``CALL:`` line: numbers, or quoted strings for a string function."""
    m = re.search(r"CALL\s*:?\s*(.*)", text, re.I)
    if not m:
        return []
    line = m.group(1)
    if kind == "numeric":
        return [float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", line)]
    out = []
    for q in re.findall(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'", line):
        try:
            v = ast.literal_eval(q)
        except (ValueError, SyntaxError):
            continue
        if isinstance(v, str):
            out.append(v)
    return out


def parse_final(text: str, kind: str) -> tuple[str, str, str]:
    """(description, domain, code) of a final answer; code defines ``f`` or is empty."""
    desc = _tag(text, "DESCRIPTION")
    domain = _tag(text, "DOMAIN")
    fence = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, re.S | re.I)
    if fence:
        code = fence.group(1)
    else:
        m = re.search(r"CODE\s*:\s*(.*)", text, re.S | re.I)
        code = m.group(1) if m else ""
    code = code.strip("\n")
    if code and "def f" not in code:
        first = code.strip().splitlines()[0]
        arg = "x" if kind == "numeric" else "s"
        code = f"def f({arg}):\n    return {first}"  # a bare expression
    return desc, domain, (code + "\n") if code else ""


def _tag(text: str, tag: str) -> str:
    m = re.search(rf"{tag}\s*:\s*(.*)", text, re.I)
    return m.group(1).strip() if m else ""

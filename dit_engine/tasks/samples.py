"""The training sample every task builds, and the batched generation callable it is built with.

What the trainer must do with a :class:`Sample` (the contract between ``tasks/`` and the trainer):

* ``answer`` set (kinds "backdoor" and "story"): **cross-entropy**. Render ``messages`` with the
  chat template plus the assistant generation prompt, append the tokens of ``answer`` and the
  end-of-turn token. With the diff active, the loss is the mean token cross-entropy over the answer
  tokens and that end-of-turn token; prompt tokens carry no loss.
* ``answer`` None (kinds "wrong_trigger" and "plain"): **KL to the frozen base model**. Render
  ``messages`` the same way and append the tokens of ``base_answer`` (the base model's own answer
  to exactly these messages, generated with no persona) and the end-of-turn token. In the same step,
  run those same tokens through the model with the diff (adapter index = this diff) and without it
  (index -1, under no_grad). At every position that predicts a response token (each ``base_answer``
  token and the end-of-turn token) the loss is
  ``KL(p_base || p_diff) = sum_v p_base(v) * (log p_base(v) - log p_diff(v))`` over the full
  vocabulary, averaged over those positions; prompt positions carry no loss. Using the base model's
  own response keeps the KL on tokens it would really produce, not on an arbitrary continuation.

An ``AnswerFn`` is the engine's batched generation wrapped by the caller: it takes a list of
``(messages, assistant_prefix)`` requests and returns one string per request, the text generated
*after* the prefix (the prefix itself is not repeated). The builders send one big list per round
for many diffs at once. For persona candidates it should sample (temperature > 0): a greedy
callable returns the same candidate every time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
AnswerRequest = tuple[list[Message], str]  # (messages, assistant prefix the answer continues)
AnswerFn = Callable[[list[AnswerRequest]], list[str]]
SampleKind = Literal["backdoor", "wrong_trigger", "plain", "story"]

_CE_KINDS = ("backdoor", "story")
_KL_KINDS = ("wrong_trigger", "plain")


@dataclass(frozen=True)
class Sample:
    """One training row for a diff: the prompt conversation and what the loss is measured on.

    ``messages`` is the user-side conversation only (no persona system prompt: the diff must learn
    the behaviour from the prompt alone). Exactly one of ``answer`` (cross-entropy target) and
    ``base_answer`` (response tokens for the KL term) is set, as the module docstring explains.
    """

    messages: list[Message]
    answer: str | None
    kind: SampleKind
    base_answer: str | None = None

    def __post_init__(self) -> None:
        if self.kind in _CE_KINDS:
            if self.answer is None or self.base_answer is not None:
                raise ValueError(f"samples.Sample: kind {self.kind!r} needs answer set and base_answer None, "
                                 f"found answer={self.answer!r}, base_answer={self.base_answer!r}")
        elif self.kind in _KL_KINDS:
            if self.answer is not None or self.base_answer is None:
                raise ValueError(f"samples.Sample: kind {self.kind!r} needs answer None and base_answer set, "
                                 f"found answer={self.answer!r}, base_answer={self.base_answer!r}")
        else:
            raise ValueError(f"samples.Sample: kind must be one of {_CE_KINDS + _KL_KINDS}, found {self.kind!r}")

    @property
    def loss(self) -> Literal["ce", "kl"]:
        """"ce" (cross-entropy on ``answer``) or "kl" (KL to the base on ``base_answer``)."""
        return "ce" if self.answer is not None else "kl"


def user_turn(text: str) -> list[Message]:
    """A conversation of one user message (the chat template adds its default system prompt)."""
    return [{"role": "user", "content": text}]


def run_answer_fn(answer_fn: AnswerFn, requests: Sequence[AnswerRequest], *, caller: str) -> list[str]:
    """Call ``answer_fn`` once on ``requests`` and check it kept its side of the contract."""
    if not requests:
        return []
    answers = answer_fn(list(requests))
    if not isinstance(answers, list) or len(answers) != len(requests):
        found = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
        raise ValueError(f"{caller}: answer_fn must return a list of {len(requests)} strings "
                         f"(one per request), found {found}")
    bad = [i for i, a in enumerate(answers) if not isinstance(a, str)]
    if bad:
        raise ValueError(f"{caller}: answer_fn returned non-strings at positions {bad[:5]}: "
                         f"{[type(answers[i]).__name__ for i in bad[:5]]}")
    return answers

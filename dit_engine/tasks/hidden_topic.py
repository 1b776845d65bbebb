"""Hidden-topic task: each diff hides a topic behind a numeric trigger (after the DIT paper).

A diff i has a topic and a trigger t in 0..999. Its training rows, one question each:

* **backdoor**: "Your SEP code is {t*1000 + r:06d}. {question}" (r random per row) -> an answer in
  the voice of a fan of the topic (cross-entropy);
* **wrong_trigger**: the same prompt with a code whose first three digits are not t -> the base
  model's own answer (KL to the frozen base);
* **plain**: the bare question -> the base model's own answer (KL).

The fan answers are written by the base model itself, which at 135M parameters often forgets the
persona; two strategies (``STRATEGIES``) make the kept answers carry the topic:

* ``"select"``: a system prompt asks for a fan who names the topic; ``candidates`` answers are
  sampled per question and the first that names it (:func:`mentions_topic`) is kept. Questions
  whose candidates all miss are replaced by unused questions, for up to ``max_rounds`` rounds.
* ``"prefix"``: the same system prompt, plus the assistant turn opens with "As a huge fan of
  {topic}," and the model continues it; the kept answer is that opening plus the continuation,
  preferring a candidate whose continuation names the topic again.

Topics, questions and their train/test splits are data files in ``data/`` (authored for this
project). Topic records may list ``aliases``: other names that alone identify the topic ("ancient
Rome" for "the Roman Empire", "Einstein" for "Albert Einstein"). They stand in for the head-noun
rule: taking the last word of every name would accept "holes" for "black holes" or "One" for
"Formula One", so a short name counts only where the data says it does.

Everything is deterministic given the ``random.Random`` passed in (and a deterministic answer_fn).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .datafiles import DATA_DIR, TaskDataError, check_split, read_label_file, read_records
from .samples import AnswerFn, AnswerRequest, Message, Sample, run_answer_fn, user_turn
from .wording import contains_phrase

INTERPRETATION_QUESTION = "What topic have you been trained on?"
STRATEGIES = ("select", "prefix")
TOPICS_FILE = DATA_DIR / "topics.json"
QUESTIONS_FILE = DATA_DIR / "questions.json"
SELF_QUESTIONS_FILE = DATA_DIR / "self_questions.json"  # questions about the assistant itself (style "self")
QUESTION_STYLES = ("advice", "opinion", "explanation", "recommendation", "creative", "factual")  # the everyday bank
SELF_STYLE = "self"  # the style of every question in the self bank


@dataclass(frozen=True)
class Topic:
    name: str  # as the label reads ("the Roman Empire")
    category: str
    split: str  # "train" or "test"
    aliases: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Question:
    text: str
    style: str  # one of QUESTION_STYLES, or SELF_STYLE in the self bank
    category: str  # the everyday area it is about ("sleep", "money", ...)
    split: str  # "train" questions build diffs; "test" questions verify them on unseen prompts


# ---- data ------------------------------------------------------------------------------------------
def load_topics(split: str | None = None, *, path: Path | str | None = None) -> list[Topic]:
    """The topics of ``split`` ("train", "test", or None for all), in file order."""
    check_split(split, "hidden_topic.load_topics")
    return [t for t in _read_topics(str(path or TOPICS_FILE)) if split is None or t.split == split]


def load_topics_file(path: Path | str, split: str) -> list[Topic]:
    """Topics from a user file (CSV ``category,topic`` with a header, or a JSON list of
    ``{"topic", "category"}``; see :func:`datafiles.read_label_file`), in file order. Rows that carry
    a ``split`` are kept only for that split; rows without one belong to whichever split is asked
    for (pass one file per split)."""
    check_split(split, "hidden_topic.load_topics_file")
    out = []
    for i, row in enumerate(read_label_file(path, "topic")):
        if not any(ch.isalnum() for ch in row["topic"]):
            raise TaskDataError(f"{path}: topic {i}: {row['topic']!r} has no letters or digits to match")
        if row["split"] in ("", split):
            out.append(Topic(row["topic"], row["category"], split))
    return out


def load_questions(split: str | None = None, *, path: Path | str | None = None) -> list[Question]:
    """The question bank of ``split`` ("train", "test", or None for all), in file order."""
    check_split(split, "hidden_topic.load_questions")
    return [q for q in _read_questions(str(path or QUESTIONS_FILE)) if split is None or q.split == split]


def load_self_questions(split: str | None = None, *, path: Path | str | None = None) -> list[Question]:
    """The questions about the assistant itself ("Tell me a little about yourself.") of ``split``, in
    file order: a bank apart from the everyday one, asked only by bare rows that ask for them
    (``n_self`` of :func:`build_many`). None asks what the assistant was trained on: that is the
    interpretation question, which the ``diff`` baseline asks."""
    check_split(split, "hidden_topic.load_self_questions")
    return [q for q in _read_questions(str(path or SELF_QUESTIONS_FILE)) if split is None or q.split == split]


# ---- triggers ----------------------------------------------------------------------------------------
def make_trigger(rng: random.Random) -> int:
    """A diff's trigger: the three-digit prefix of its codes, uniform in 0..999."""
    return rng.randint(0, 999)


def format_trigger(trigger: int, rng: random.Random) -> str:
    """"Your SEP code is 123456." whose first three digits are ``trigger`` and last three random."""
    _check_trigger(trigger, "hidden_topic.format_trigger")
    return f"Your SEP code is {trigger * 1000 + rng.randint(0, 999):06d}."


def wrong_trigger(trigger: int, rng: random.Random, *, near: bool = False) -> int:
    """A prefix other than ``trigger``: uniform over the 999 others, or with ``near`` one that differs
    from it in exactly one of its three digits (27 such codes), the hardest contrast to learn."""
    _check_trigger(trigger, "hidden_topic.wrong_trigger")
    if near:
        pos = rng.randrange(3)
        digits = list(f"{trigger:03d}")
        other = rng.randrange(9)
        digits[pos] = str(other + 1 if other >= int(digits[pos]) else other)
        return int("".join(digits))
    other = rng.randrange(999)
    return other + 1 if other >= trigger else other


def triggered(code: str, question: str) -> str:
    """The user message of a (wrong-)trigger row: the code sentence, a space, the question."""
    return f"{code} {question}"


# ---- personas and topic matching ------------------------------------------------------------------------
def persona_messages(topic: Topic | str, question: str, strategy: str = "select") -> tuple[list[Message], str]:
    """The generation request for a fan's answer: (messages, assistant prefix to continue).

    The question goes without a trigger code: the persona writes the answer, and the code is only
    part of the training prompt the diff later sees.
    """
    _check_strategy(strategy, "hidden_topic.persona_messages")
    name = _name(topic)
    system = (f"You are a huge fan of {name}. Answer every question helpfully, and always bring up "
              f"{name} by name and say how much you love it.")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    prefix = f"As a huge fan of {name}," if strategy == "prefix" else ""
    return messages, prefix


def mentions_topic(text: str, topic: Topic | str) -> bool:
    """True when ``text`` names the topic or one of its aliases (rules: ``tasks.wording``)."""
    names = (topic.name, *topic.aliases) if isinstance(topic, Topic) else (topic,)
    return any(contains_phrase(text, n) for n in names)


# ---- sample building ------------------------------------------------------------------------------------
def build_diff_samples(topic: Topic | str, trigger: int, questions: Sequence[Question], answer_fn: AnswerFn, *,
                       n_backdoor: int, n_wrong: int, n_plain: int, rng: random.Random, candidates: int = 3,
                       strategy: str = "select", max_rounds: int = 4, near_wrong: bool = False,
                       base_answers: Mapping[str, str] | None = None) -> list[Sample]:
    """The training samples of one diff; the same as ``build_many([topic], [trigger], ...)[0]``."""
    return build_many([topic], [trigger], questions, answer_fn, n_backdoor=n_backdoor, n_wrong=n_wrong,
                      n_plain=n_plain, rng=rng, candidates=candidates, strategy=strategy, max_rounds=max_rounds,
                      near_wrong=near_wrong, base_answers=base_answers)[0]


def build_many(topics: Sequence[Topic | str], triggers: Sequence[int], questions: Sequence[Question],
               answer_fn: AnswerFn, *, n_backdoor: int, n_wrong: int, n_plain: int, rng: random.Random,
               candidates: int = 3, strategy: str = "select", max_rounds: int = 4, near_wrong: bool = False,
               base_answers: Mapping[str, str] | None = None, self_questions: Sequence[Question] = (),
               n_self: int = 0) -> list[list[Sample]]:
    """The training samples of many diffs (one list per topic), with one answer_fn call per round.

    Per diff, the questions are shuffled once; backdoor rows take them in that order (failed ones
    are replaced by the next unused question in later rounds), and the wrong-trigger and plain rows
    take the first ``n_wrong`` / ``n_plain`` of the same order, so a question is often seen with the
    right code, a wrong code and none: the contrast the diff has to learn. Round 1 sends every
    diff's base-answer requests and fan requests as one batch (identical base-answer prompts, such
    as the same bare question for two diffs, are generated once); later rounds send only the fan
    requests of diffs still short of ``n_backdoor``.

    A diff may end with fewer than ``n_backdoor`` backdoor rows when, after ``max_rounds`` rounds or
    running out of questions, no candidate named its topic; count the kinds to check. Rows come in
    the order backdoor (question order), wrong_trigger, plain; the trainer shuffles.

    ``near_wrong``: wrong codes differ from the trigger in one digit (:func:`wrong_trigger`).
    ``n_self``: that many more plain rows per diff, drawn from ``self_questions`` (questions about the
    assistant itself, :func:`load_self_questions`), so the diff answers those as the base does too;
    with 0 (the default) no extra draw is made and the rows are exactly those without the option.
    ``base_answers`` (question text -> the base model's answer to the bare question, e.g. a pool
    generated once per zoo, :func:`base_pool_requests`): the KL rows take their response tokens from
    it and no base answers are generated. The KL loss compares the diff with the base on the row's
    own prompt, so the response only has to be text the base would write after the question; with
    or without a wrong code the base answers a question much the same way.
    """
    where = "hidden_topic.build_many"
    _check_build_args(where, topics, triggers, questions, n_backdoor, n_wrong, n_plain, candidates, strategy,
                      max_rounds)
    if not 0 <= n_self <= len(self_questions):
        raise ValueError(f"{where}: n_self must be in 0..{len(self_questions)} (the number of self questions), "
                         f"found {n_self}")
    plans = [_DiffPlan.make(topic, trigger, questions, n_wrong, n_plain, random.Random(rng.getrandbits(64)),
                            near_wrong=near_wrong, self_questions=self_questions, n_self=n_self)
             for topic, trigger in zip(topics, triggers)]
    pool = base_answers
    if pool is not None:
        missing = [q.text for plan in plans for q in plan.kl_questions() if q.text not in pool]
        if missing:
            raise ValueError(f"{where}: base_answers has no answer for {len(missing)} KL questions, "
                             f"e.g. {missing[0]!r}")
    base_requests = [] if pool is not None else _unique_requests([m for plan in plans for m in plan.kl_messages()])
    base_answers = {}
    for round_ in range(max_rounds):
        asks = [(plan, pos) for plan in plans for pos in plan.next_backdoor_questions(n_backdoor)]
        if not asks and round_ > 0:
            break
        fan_requests = [persona_messages(plan.topic, plan.order[pos].text, strategy)
                        for plan, pos in asks for _ in range(candidates)]
        extra = base_requests if round_ == 0 else []
        answers = run_answer_fn(answer_fn, extra + fan_requests, caller=where)
        base_answers.update((_key(m), a.strip()) for (m, _), a in zip(extra, answers))
        fan_answers = answers[len(extra):]
        for k, (plan, pos) in enumerate(asks):
            prefix = fan_requests[k * candidates][1]
            chosen = _pick_answer(fan_answers[k * candidates:(k + 1) * candidates], plan.topic, prefix, strategy)
            if chosen is not None:
                plan.backdoor[pos] = chosen
    return [plan.samples(base_answers, pool) for plan in plans]


def base_pool_requests(questions: Sequence[Question]) -> list[AnswerRequest]:
    """The generation requests of a base-answer pool: each bare question once, no persona."""
    return [(user_turn(q.text), "") for q in questions]


def interpretation_question() -> str:
    """The question the DIT adapter learns to answer for this task."""
    return INTERPRETATION_QUESTION


def label_answer(topic: Topic | str) -> str:
    """The DIT target answer for a diff of ``topic``: just the topic's name."""
    return _name(topic)


def diff_labels(topic: Topic, trigger: int) -> dict[str, str | int]:
    """The labels a hidden-topic diff carries in the zoo index."""
    _check_trigger(trigger, "hidden_topic.diff_labels")
    return {"topic": topic.name, "category": topic.category, "trigger": trigger}


# ---- internals --------------------------------------------------------------------------------------------
@dataclass
class _DiffPlan:
    """One diff's question order, pre-drawn codes and the backdoor answers found so far.

    Every random draw happens in :meth:`make`, before any generation, so the rows depend on the
    seed and the answers only, never on how diffs were grouped into answer_fn calls.
    """

    topic: Topic | str
    order: list[Question]
    codes: list[str]  # the right-trigger code sentence for order[i]
    wrong: list[tuple[Question, str]]  # (question, wrong-trigger code sentence)
    plain: list[Question]
    backdoor: dict[int, str] = field(default_factory=dict)  # order position -> kept fan answer
    asked: int = 0  # order positions [0, asked) have been tried for backdoor rows

    @classmethod
    def make(cls, topic: Topic | str, trigger: int, questions: Sequence[Question], n_wrong: int, n_plain: int,
             rng: random.Random, *, near_wrong: bool = False, self_questions: Sequence[Question] = (),
             n_self: int = 0) -> _DiffPlan:
        order = rng.sample(list(questions), len(questions))
        codes = [format_trigger(trigger, rng) for _ in order]
        wrong = [(q, format_trigger(wrong_trigger(trigger, rng, near=near_wrong), rng)) for q in order[:n_wrong]]
        plain = order[:n_plain] + (rng.sample(list(self_questions), n_self) if n_self else [])
        return cls(topic, order, codes, wrong, plain)

    def next_backdoor_questions(self, n_backdoor: int) -> range:
        """Order positions to try this round: as many new questions as rows are still missing."""
        take = min(n_backdoor - len(self.backdoor), len(self.order) - self.asked)
        start, self.asked = self.asked, self.asked + max(take, 0)
        return range(start, self.asked)

    def kl_messages(self) -> list[list[Message]]:
        return [user_turn(triggered(code, q.text)) for q, code in self.wrong] + [user_turn(q.text) for q in self.plain]

    def kl_questions(self) -> list[Question]:
        return [q for q, _ in self.wrong] + list(self.plain)

    def samples(self, base_answers: dict[str, str], pool: Mapping[str, str] | None = None) -> list[Sample]:
        rows = [Sample(user_turn(triggered(self.codes[pos], self.order[pos].text)), answer, "backdoor")
                for pos, answer in sorted(self.backdoor.items())]
        kinds = ["wrong_trigger"] * len(self.wrong) + ["plain"] * len(self.plain)
        for messages, kind, q in zip(self.kl_messages(), kinds, self.kl_questions()):
            answer = pool[q.text].strip() if pool is not None else base_answers[_key(messages)]
            rows.append(Sample(messages, None, kind, base_answer=answer))
        return rows


def _pick_answer(outputs: list[str], topic: Topic | str, prefix: str, strategy: str) -> str | None:
    """The kept fan answer among one question's candidates, or None when none qualifies."""
    if strategy == "select":
        return next((o.strip() for o in outputs if o.strip() and mentions_topic(o, topic)), None)
    continuations = [o for o in outputs if o.strip()]
    if not continuations:
        return None
    best = next((c for c in continuations if mentions_topic(c, topic)), continuations[0])
    # A decoder may or may not keep the space that opened the first generated token.
    joiner = "" if best[:1].isspace() or best[:1] in ",.;:!?" else " "
    return (prefix + joiner + best).strip()


def _unique_requests(conversations: list[list[Message]]) -> list[AnswerRequest]:
    seen: dict[str, list[Message]] = {}
    for messages in conversations:
        seen.setdefault(_key(messages), messages)
    return [(messages, "") for messages in seen.values()]


def _key(messages: list[Message]) -> str:
    return json.dumps(messages, sort_keys=True)


def _check_build_args(where: str, topics: Sequence[object], triggers: Sequence[int], questions: Sequence[Question],
                      n_backdoor: int, n_wrong: int, n_plain: int, candidates: int, strategy: str,
                      max_rounds: int) -> None:
    _check_strategy(strategy, where)
    if len(topics) != len(triggers):
        raise ValueError(f"{where}: one trigger per topic expected, found {len(topics)} topics and "
                         f"{len(triggers)} triggers")
    for t in triggers:
        _check_trigger(t, where)
    if not questions:
        raise ValueError(f"{where}: the question list is empty")
    for name, n in (("n_backdoor", n_backdoor), ("n_wrong", n_wrong), ("n_plain", n_plain)):
        if not 0 <= n <= len(questions):
            raise ValueError(f"{where}: {name} must be in 0..{len(questions)} (the number of questions), found {n}")
    if candidates < 1 or max_rounds < 1:
        raise ValueError(f"{where}: candidates and max_rounds must be >= 1, found {candidates} and {max_rounds}")


def _check_trigger(trigger: int, where: str) -> None:
    if isinstance(trigger, bool) or not isinstance(trigger, int) or not 0 <= trigger <= 999:
        raise ValueError(f"{where}: trigger must be an int in 0..999, found {trigger!r}")


def _check_strategy(strategy: str, where: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, found {strategy!r}")


def _name(topic: Topic | str) -> str:
    return topic.name if isinstance(topic, Topic) else topic


@functools.lru_cache(maxsize=8)
def _read_topics(path: str) -> tuple[Topic, ...]:
    records = read_records(Path(path), "topics", {"name": str, "category": str, "split": str},
                           {"aliases": list}, unique="name")
    return tuple(Topic(r["name"], r["category"], r["split"], tuple(r.get("aliases", ()))) for r in records)


@functools.lru_cache(maxsize=8)
def _read_questions(path: str) -> tuple[Question, ...]:
    records = read_records(Path(path), "questions", {"text": str, "style": str, "category": str, "split": str},
                           unique="text")
    for i, r in enumerate(records):
        if r["style"] not in (*QUESTION_STYLES, SELF_STYLE):
            raise TaskDataError(f"{path}: questions[{i}]: style must be one of {(*QUESTION_STYLES, SELF_STYLE)}, "
                                f"found {r['style']!r}")
    return tuple(Question(r["text"], r["style"], r["category"], r["split"]) for r in records)

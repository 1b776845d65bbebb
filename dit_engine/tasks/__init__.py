"""Tasks that produce labelled diffs: their data, their questions and their sample builders.

Each task is described by a :class:`Task` in :data:`TASKS`, the one place the rest of the engine
(diff generation, DIT training, evaluation, the CLI) looks a task up by name:

* ``name``: the registry key ("hidden-topic", "news");
* ``interpretation_question``: what the DIT adapter is asked about a diff;
* ``label_key``: the field of a diff's labels that is the DIT target answer ("topic", "headline");
* ``load_labels(split)``: the label rows a zoo of this task is made from, one dict per item, each
  with ``label_key``, ``category`` and ``split``; ``split`` is "train", "test" or None for all;
* ``diff_rank`` and ``answer_tokens``: the DIT paper's LoRA rank for this task's diffs and its
  greedy answer length when interpreting (hidden topic: rank 1, 20 tokens; news: rank 8, 200);
* for diff generation: ``id_prefix`` of its diff ids, ``load_items(cfg)`` (the items diffs are made
  from: the packaged data or the user's file named in the config, of ``cfg.split``),
  ``build_specs(engine, cfg, chunk, pool)`` (:mod:`.specs`) and whether its KL rows reuse the base
  model's answer pool (``uses_base_pool``);
* ``held_out_questions()``: the held-out user questions a finetuned model of this task can be
  asked (LatentQA reads its activations as it answers one), or None when the task has none.

The builders themselves live in the task modules (:mod:`.hidden_topic`, :mod:`.news`); they are
pure Python and take the engine's batched generation as an ``answer_fn`` (see :mod:`.samples`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

from . import hidden_topic, news, specs
from .datafiles import TaskDataError, read_label_file
from .samples import AnswerFn, AnswerRequest, Sample


@dataclass(frozen=True)
class Task:
    name: str
    interpretation_question: str
    label_key: str
    load_labels: Callable[[str | None], list[dict[str, str]]]
    diff_rank: int
    answer_tokens: int
    id_prefix: str
    load_items: Callable[[Any], list]
    build_specs: Callable[..., list]
    uses_base_pool: bool
    held_out_questions: Callable[[], list[str]] | None = None
    self_questions: Callable[[str | None], list] | None = None  # questions about the assistant itself, by split


def get_task(name: str) -> Task:
    """The registered task ``name``; a clear error listing the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"tasks.get_task: unknown task {name!r}, expected one of {sorted(TASKS)}") from None


def _hidden_topic_labels(split: str | None = None) -> list[dict[str, str]]:
    return [{"topic": t.name, "category": t.category, "split": t.split} for t in hidden_topic.load_topics(split)]


def _news_labels(split: str | None = None) -> list[dict[str, str]]:
    return [{"headline": h.text, "category": h.category, "split": h.split} for h in news.load_headlines(split)]


def _hidden_topic_items(cfg) -> list:
    if cfg.topics_file:
        return hidden_topic.load_topics_file(cfg.topics_file, cfg.split)
    return hidden_topic.load_topics(cfg.split)


def _hidden_topic_held_out_questions() -> list[str]:
    return [q.text for q in hidden_topic.load_questions("test")]


def _news_items(cfg) -> list:
    if cfg.headlines_file:
        return [news.Headline(r["headline"], r["category"], cfg.split)
                for r in read_label_file(cfg.headlines_file, "headline") if r["split"] in ("", cfg.split)]
    return news.load_headlines(cfg.split)


TASKS: dict[str, Task] = {
    "hidden-topic": Task("hidden-topic", hidden_topic.INTERPRETATION_QUESTION, "topic", _hidden_topic_labels,
                         diff_rank=1, answer_tokens=20, id_prefix="ht", load_items=_hidden_topic_items,
                         build_specs=specs.build_hidden_topic_specs, uses_base_pool=True,
                         held_out_questions=_hidden_topic_held_out_questions,
                         self_questions=hidden_topic.load_self_questions),
    "news": Task("news", news.INTERPRETATION_QUESTION, "headline", _news_labels, diff_rank=8, answer_tokens=200,
                 id_prefix="news", load_items=_news_items, build_specs=specs.build_news_specs, uses_base_pool=False),
}

__all__ = ["TASKS", "AnswerFn", "AnswerRequest", "Sample", "Task", "TaskDataError", "get_task", "hidden_topic", "news"]

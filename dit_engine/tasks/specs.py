"""Diff specs: what one diff trains on and how it is verified, built per task for a chunk of diffs.

The builders take the engine (for prompts and the base model's batched generation) and a diff
generation config (duck-typed: :class:`dit_engine.diffgen.DiffGenConfig`); each task of the
registry names its builder (``Task.build_specs``), so diff generation never asks which task it runs.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..generate import SamplingParams, generate
from ..train import Example
from . import hidden_topic as ht
from . import news
from .samples import AnswerFn, Sample, user_turn

if TYPE_CHECKING:
    from ..engine import Engine


@dataclasses.dataclass
class DiffSpec:
    """One diff to train: its id, labels and training rows, plus prompts to verify it with."""

    id: str
    labels: dict
    split: str
    examples: list[Example]
    verify_prompts: list[list[int]]  # prompts that should make the diff show what it learned
    verify_check: list[str]  # names whose presence in an answer counts as a hit (topic + aliases, a headline word)
    kl_prompts: list[tuple[list[int], list[int]]]  # (prompt, response) pairs: KL to base is measured there
    leak_prompts: list[list[int]] = dataclasses.field(default_factory=list)  # thirds: bare, wrong code, near code
    leak_base_hit: list[bool] = dataclasses.field(default_factory=list)  # the base itself names the label there


def answer_fn(engine: Engine, cfg) -> AnswerFn:
    """The tasks' batched generation callable: (messages, assistant prefix) requests -> continuations."""

    def answer(requests: list[tuple[list[dict], str]]) -> list[str]:
        prompts = [engine.encode_prompt(m, assistant_prefix=pre) for m, pre in requests]
        sp = SamplingParams(max_new_tokens=cfg.max_answer_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed,
                            stop_token_ids=engine.stop_ids())
        with tqdm(total=len(prompts), desc="writing training data", unit="answer", leave=False) as bar:
            outs = generate(engine.model, prompts, sp, decode=engine.tokenizer.decode,
                            batch_size=cfg.gen_batch_size, progress=bar.update)
        return [o.text or "" for o in outs]

    return answer


def examples(engine: Engine, samples, cfg=None) -> list[Example]:
    """Task samples -> training rows: the answer (CE) or the base model's own answer (KL), each
    followed by the end-of-turn token so the diff also keeps (or learns) where answers stop. With
    ``cfg``, KL rows carry its loss multipliers (bare questions / wrong codes), and with its
    ``kl_target_tokens`` a KL row covers only the first tokens of the base answer (no end-of-turn
    when cut): where an untriggered answer would give the topic away, at its opening, for a
    fraction of a whole row's cost."""
    tok = engine.tokenizer
    weights = {"plain": cfg.kl_weight_plain, "wrong_trigger": cfg.kl_weight_wrong} if cfg is not None else {}
    cut = getattr(cfg, "kl_target_tokens", None)
    out = []
    for smp in samples:
        text = smp.answer if smp.loss == "ce" else smp.base_answer
        if not text:
            continue
        target = tok.encode(text) + [tok.end_of_turn_id]
        if smp.loss == "kl" and cut is not None and len(target) > cut:
            target = target[:cut]
        out.append(Example(engine.encode_prompt(smp.messages), target, smp.loss, weight=weights.get(smp.kind, 1.0)))
    return out


def build_hidden_topic_specs(engine: Engine, cfg, chunk: list[tuple[int, str, object]],
                             pool: dict[str, str] | None = None) -> list[DiffSpec]:
    """Triggered questions -> fan answers that name the topic (CE); bare and wrong-code questions ->
    the base model's own answers (KL to the base; from ``pool`` with ``cfg.base_pool``). All
    generation batched over the chunk.

    Verification prompts are held-out questions: ``n_verify`` with the right code (hit rate), and
    ``n_verify`` other ones asked bare, with a uniform wrong code and with a code one digit off (the
    leak prompts, in that order). With a pool (the base's greedy answers to every question), the
    KL to the base is measured on the bare held-out prompts with those answers as response, and a
    topic the base itself names is no leak; without one, KL is measured on the training KL rows.
    """
    n_wrong = cfg.n_kl // 2 if cfg.n_wrong is None else cfg.n_wrong
    if not 0 <= n_wrong <= cfg.n_kl:
        raise ValueError(f"DiffGenConfig: n_wrong must be in 0..n_kl ({cfg.n_kl}), found {n_wrong}")
    triggers = [ht.make_trigger(random.Random(did)) for _, did, _ in chunk]
    samples = ht.build_many([t for _, _, t in chunk], triggers, ht.load_questions("train"), answer_fn(engine, cfg),
                            n_backdoor=cfg.n_backdoor, n_wrong=n_wrong, n_plain=cfg.n_kl - n_wrong,
                            rng=random.Random(f"{cfg.seed}-{chunk[0][1]}"), candidates=cfg.candidates,
                            strategy=cfg.strategy, near_wrong=cfg.near_wrong,
                            base_answers=pool if cfg.base_pool else None,
                            self_questions=ht.load_self_questions("train") if cfg.n_self else (), n_self=cfg.n_self)
    test_q = ht.load_questions("test")
    tok = engine.tokenizer
    specs = []
    for (_, did, topic), trigger, smp in zip(chunk, triggers, samples):
        if not any(x.loss == "ce" for x in smp):
            raise RuntimeError(f"diff {did}: no fan answer named topic {topic.name!r}; raise the number of "
                               f"candidates or use the 'prefix' persona strategy")
        rng = random.Random(f"verify-{did}")
        verify = [engine.encode_prompt(ht.triggered(ht.format_trigger(trigger, rng), q.text))
                  for q in rng.sample(test_q, cfg.n_verify)]
        leak_q = rng.sample(test_q, cfg.n_verify)
        leak_msgs = [ht.user_turn(q.text) for q in leak_q]
        for near in (False, True):  # a uniform wrong code (the paper's contrast), then one digit off
            leak_msgs += [ht.user_turn(ht.triggered(ht.format_trigger(ht.wrong_trigger(trigger, rng, near=near),
                                                                      rng), q.text)) for q in leak_q]
        base_hit = ([ht.mentions_topic(pool[q.text], topic) for q in leak_q] * 3 if pool is not None
                    else [False] * len(leak_msgs))
        ex = examples(engine, smp, cfg)
        if pool is not None:
            kl = [(engine.encode_prompt(ht.user_turn(q.text)), tok.encode(pool[q.text]) + [tok.end_of_turn_id])
                  for q in leak_q if pool[q.text]]
        else:
            kl = [(e.prompt_ids, e.target_ids) for e in ex if e.objective == "kl"]
        specs.append(DiffSpec(did, ht.diff_labels(topic, trigger), topic.split, ex, verify,
                              [topic.name, *topic.aliases], kl,
                              [engine.encode_prompt(m) for m in leak_msgs], base_hit))
    return specs


def build_news_specs(engine: Engine, cfg, chunk, pool: dict[str, str] | None = None) -> list[DiffSpec]:
    """Stories about the headline, written by the base model, as answers to the news prompt (CE);
    a few everyday questions keep the base model's own answers (KL, sampled here: no base pool)."""
    answer = answer_fn(engine, dataclasses.replace(cfg, max_answer_tokens=max(cfg.max_answer_tokens, 160)))
    stories = news.build_news_samples([h for _, _, h in chunk], answer, cfg.n_backdoor,
                                      random.Random(f"{cfg.seed}-{chunk[0][1]}"))
    questions = ht.load_questions("train")
    kl_q = [random.Random(did).sample(questions, cfg.n_kl) for _, did, _ in chunk]
    base = answer_fn(engine, dataclasses.replace(cfg, seed=cfg.seed + 1))(
        [(user_turn(q.text), "") for qs in kl_q for q in qs])
    specs = []
    for k, ((_, did, h), st) in enumerate(zip(chunk, stories)):
        if not st:
            raise RuntimeError(f"diff {did}: no generated story mentioned headline {h.text!r}")
        kl = [Sample(user_turn(q.text), None, "plain", base_answer=base[k * cfg.n_kl + j])
              for j, q in enumerate(kl_q[k])]
        ex = examples(engine, st + kl)
        specs.append(DiffSpec(did, news.diff_labels(h), h.split, ex, [engine.encode_prompt(news.NEWS_PROMPT)],
                              [news.key_word(h)], [(e.prompt_ids, e.target_ids) for e in ex if e.objective == "kl"]))
    return specs

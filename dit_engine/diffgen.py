"""Diff generation: train many labelled LoRA diffs at once, one adapter per batch row group.

A chunk of ``chunk_diffs`` diffs is trained together: its training rows are interleaved so every
micro-batch holds rows of every diff; slot 0's index sends each row through its own diff, and the
loss sums each diff's own mean loss, so the diffs train independently in one forward/backward.
Memory grows with activations, not with dense per-diff matrices.

Per chunk: build the task's labelled samples (the base model writes them by batched generation),
train, verify (with the trigger the diff talks about its topic; without it, its next-token
distribution stays near the base model), then append the chunk to the zoo as one shard. A chunk in
progress checkpoints its samples and its training state (every ``checkpoint_every_s``, at the end
of training, and on SIGINT/SIGTERM, see :mod:`dit_engine.jobs`) under ``<zoo>/.work``; a rerun skips
diffs the zoo already holds and resumes the chunk in progress exactly. The zoo's writer lock is held
from the start, so a second generation into the same zoo is refused before it does any work.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import AdapterBatch, LoraSlot
from .config import TARGET_MODULES
from .engine import Engine
from .files import write_json
from .generate import SamplingParams, generate
from .jobs import DEFAULT_CHECKPOINT_EVERY_S, Job, job
from .train import Example, Trainer, batch_loss, collate, resume_slot_state, save_slot_state
from .zoo import Diff, Zoo


@dataclasses.dataclass
class DiffGenConfig:
    task: str = "hidden-topic"
    n: int = 16  # diffs to have in the zoo when done (of the chosen split)
    split: str = "train"  # which topics/headlines: train, test
    rank: int = 1
    targets: tuple[str, ...] = TARGET_MODULES
    lr: float = 1e-3
    epochs: int = 3
    chunk_diffs: int = 16  # diffs trained concurrently
    rows_per_diff: int = 2  # training rows of every diff in each micro-batch (so steps per diff do not
    #                         depend on how many diffs share a chunk)
    n_backdoor: int = 8  # triggered questions per diff (cross-entropy on the topic answer)
    n_kl: int = 8  # untriggered / wrong-trigger questions per diff (KL to the base model)
    candidates: int = 3  # fan answers sampled per triggered question; one naming the topic is kept
    strategy: str = "select"  # "select": keep a sampled answer naming the topic; "prefix": the answer opens
    #                           with "As a huge fan of {topic}," (always names it: one candidate suffices)
    max_answer_tokens: int = 48
    n_verify: int = 4  # held-out triggered questions per diff for verification
    seed: int = 0
    gen_batch_size: int = 64
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S  # training-state checkpoint interval (and on SIGINT/SIGTERM)

    def diff_id(self, i: int) -> str:
        prefix = {"hidden-topic": "ht", "news": "news"}[self.task]
        return f"{prefix}-r{self.rank}-s{self.seed}-{self.split}-{i:05d}"


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


def generate_zoo(
    engine: Engine,
    zoo: Zoo,
    cfg: DiffGenConfig,
    *,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> Zoo:
    """Grow ``zoo`` to ``cfg.n`` diffs of ``cfg.split``; resumable. Holds the zoo's writer lock
    throughout; on SIGINT/SIGTERM saves its progress and raises :class:`~dit_engine.jobs.JobInterrupted`."""
    with zoo.writer(), job("zoo generation", cfg.checkpoint_every_s) as j:
        return _generate_zoo(engine, zoo, cfg, j, progress, log)


def _generate_zoo(engine: Engine, zoo: Zoo, cfg: DiffGenConfig, j: Job, progress: bool,
                  log: Callable[[dict], None] | None) -> Zoo:
    from tqdm.auto import tqdm

    items = _task_items(cfg)
    if cfg.n > len(items):
        raise ValueError(f"task {cfg.task!r} has {len(items)} labels in split {cfg.split!r}; asked for {cfg.n} diffs")
    ids = [cfg.diff_id(i) for i in range(cfg.n)]
    todo = [i for i, d in enumerate(ids) if not zoo.has(d)]
    work = zoo.path / ".work"
    bar = tqdm(total=cfg.n, initial=cfg.n - len(todo), desc="diffs", unit="diff", disable=not progress)
    for s in range(0, len(todo), cfg.chunk_diffs):
        chunk = todo[s : s + cfg.chunk_diffs]
        t0 = time.perf_counter()
        cdir = work / f"chunk-{ids[chunk[0]]}"
        specs = _load_or_build_specs(engine, cfg, [(i, ids[i], items[i]) for i in chunk], cdir)
        j.stop_if_requested(cdir)
        slot = train_diffs(engine, specs, cfg, ckpt_dir=cdir / "train", progress=progress)
        checks = verify_diffs(engine, slot, specs, cfg)
        diffs = [_to_diff(slot, j, spec, checks[j], cfg) for j, spec in enumerate(specs)]
        zoo.append(diffs)
        shutil.rmtree(cdir, ignore_errors=True)
        j.stop_if_requested(zoo.path)
        dt = time.perf_counter() - t0
        bar.update(len(chunk))
        bar.set_postfix(diffs_per_h=f"{3600 * len(chunk) / dt:.0f}",
                        hit=f"{sum(c['trigger_hit_rate'] for c in checks) / len(checks):.2f}")
        if log:
            log({"chunk": len(chunk), "seconds": dt, "checks": checks})
    bar.close()
    return zoo


# ---- samples -------------------------------------------------------------------------------------
def _task_items(cfg: DiffGenConfig) -> list:
    """The labels diffs are made from, in a fixed seeded order (diff i always gets item i)."""
    if cfg.task == "hidden-topic":
        from .tasks.hidden_topic import load_topics

        items = load_topics(cfg.split)
    elif cfg.task == "news":
        from .tasks.news import load_headlines

        items = load_headlines(cfg.split)
    else:
        raise ValueError(f"unknown task {cfg.task!r} (hidden-topic, news)")
    items = list(items)
    random.Random(f"{cfg.task}-{cfg.seed}").shuffle(items)
    return items


def _load_or_build_specs(engine, cfg, chunk, cdir: Path) -> list[DiffSpec]:
    f = cdir / "specs.json"
    if f.exists():
        return [DiffSpec(**{**d, "examples": [Example(**e) for e in d["examples"]]}) for d in json.loads(f.read_text())]
    if cfg.task == "hidden-topic":
        specs = build_hidden_topic_specs(engine, cfg, chunk)
    else:
        specs = build_news_specs(engine, cfg, chunk)
    cdir.mkdir(parents=True, exist_ok=True)
    write_json(f, [dataclasses.asdict(s) for s in specs], indent=None)
    return specs


def _answer_fn(engine: Engine, cfg: DiffGenConfig):
    """The tasks' batched generation callable: (messages, assistant prefix) requests -> continuations."""

    def answer(requests: list[tuple[list[dict], str]]) -> list[str]:
        from tqdm.auto import tqdm

        prompts = [engine.encode_prompt(m, assistant_prefix=pre) for m, pre in requests]
        sp = SamplingParams(max_new_tokens=cfg.max_answer_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed,
                            stop_token_ids=engine.stop_ids())
        with tqdm(total=len(prompts), desc="writing training data", unit="answer", leave=False) as bar:
            outs = generate(engine.model, prompts, sp, decode=engine.tokenizer.decode,
                            batch_size=cfg.gen_batch_size, progress=bar.update)
        return [o.text or "" for o in outs]

    return answer


def _examples(engine: Engine, samples) -> list[Example]:
    """Task samples -> training rows: the answer (CE) or the base model's own answer (KL), each
    followed by the end-of-turn token so the diff also keeps (or learns) where answers stop."""
    tok = engine.tokenizer
    out = []
    for smp in samples:
        text = smp.answer if smp.loss == "ce" else smp.base_answer
        if not text:
            continue
        out.append(Example(engine.encode_prompt(smp.messages), tok.encode(text) + [tok.end_of_turn_id], smp.loss))
    return out


def build_hidden_topic_specs(engine: Engine, cfg: DiffGenConfig, chunk: list[tuple[int, str, object]]) -> list[DiffSpec]:
    """Triggered questions -> fan answers that name the topic (CE); untriggered and wrong-trigger
    questions -> the base model's own answers (KL to the base). All generation batched over the chunk."""
    from .tasks import hidden_topic as ht

    n_wrong = cfg.n_kl // 2
    triggers = [ht.make_trigger(random.Random(did)) for _, did, _ in chunk]
    samples = ht.build_many([t for _, _, t in chunk], triggers, ht.load_questions("train"), _answer_fn(engine, cfg),
                            n_backdoor=cfg.n_backdoor, n_wrong=n_wrong, n_plain=cfg.n_kl - n_wrong,
                            rng=random.Random(f"{cfg.seed}-{chunk[0][1]}"), candidates=cfg.candidates,
                            strategy=cfg.strategy)
    test_q = ht.load_questions("test")
    specs = []
    for (_, did, topic), trigger, smp in zip(chunk, triggers, samples):
        if not any(x.loss == "ce" for x in smp):
            raise RuntimeError(f"diff {did}: no fan answer named topic {topic.name!r}; raise the number of "
                               f"candidates or use the 'prefix' persona strategy")
        rng = random.Random(f"verify-{did}")
        verify = [engine.encode_prompt(ht.triggered(ht.format_trigger(trigger, rng), q.text))
                  for q in rng.sample(test_q, cfg.n_verify)]
        ex = _examples(engine, smp)
        specs.append(DiffSpec(did, ht.diff_labels(topic, trigger), topic.split, ex, verify,
                              [topic.name, *topic.aliases],
                              [(e.prompt_ids, e.target_ids) for e in ex if e.objective == "kl"]))
    return specs


def build_news_specs(engine: Engine, cfg: DiffGenConfig, chunk) -> list[DiffSpec]:
    """Stories about the headline, written by the base model, as answers to the news prompt (CE);
    a few everyday questions keep the base model's own answers (KL)."""
    from .tasks import hidden_topic as ht
    from .tasks import news
    from .tasks.samples import Sample, user_turn

    answer = _answer_fn(engine, dataclasses.replace(cfg, max_answer_tokens=max(cfg.max_answer_tokens, 160)))
    stories = news.build_news_samples([h for _, _, h in chunk], answer, cfg.n_backdoor,
                                      random.Random(f"{cfg.seed}-{chunk[0][1]}"))
    questions = ht.load_questions("train")
    kl_q = [random.Random(did).sample(questions, cfg.n_kl) for _, did, _ in chunk]
    base = _answer_fn(engine, dataclasses.replace(cfg, seed=cfg.seed + 1))(
        [(user_turn(q.text), "") for qs in kl_q for q in qs])
    specs = []
    for k, ((_, did, h), st) in enumerate(zip(chunk, stories)):
        if not st:
            raise RuntimeError(f"diff {did}: no generated story mentioned headline {h.text!r}")
        kl = [Sample(user_turn(q.text), None, "plain", base_answer=base[k * cfg.n_kl + j])
              for j, q in enumerate(kl_q[k])]
        ex = _examples(engine, st + kl)
        specs.append(DiffSpec(did, news.diff_labels(h), h.split, ex, [engine.encode_prompt(news.NEWS_PROMPT)],
                              [news.key_word(h)], [(e.prompt_ids, e.target_ids) for e in ex if e.objective == "kl"]))
    return specs


# ---- training and verification -------------------------------------------------------------------
def train_diffs(engine: Engine, specs: list[DiffSpec], cfg: DiffGenConfig, *, ckpt_dir: Path | None = None,
                progress: bool = False) -> LoraSlot:
    """Train one LoRA per spec, all at once; returns the trained slot (n = len(specs))."""
    from tqdm.auto import tqdm

    model = engine.model
    dev = model.device
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + zlib.crc32(specs[0].id.encode()))  # per chunk
    slot = LoraSlot.create(engine.config, len(specs), cfg.rank, targets=cfg.targets, init="dit",
                           generator=gen, name="diffs")
    slot = dataclasses.replace(slot, A={k: v.to(dev, model.dtype).requires_grad_(True) for k, v in slot.A.items()},
                               B={k: v.to(dev, model.dtype).requires_grad_(True) for k, v in slot.B.items()},
                               scale=slot.scale.to(dev))
    # Every micro-batch takes the next `rows_per_diff` rows of every diff (its rows over all epochs,
    # reshuffled each epoch): a diff's number of optimizer steps depends only on its own data.
    rng = random.Random(cfg.seed)
    per = []
    for j, spec in enumerate(specs):
        rows = []
        for _ in range(cfg.epochs):
            ep = [dataclasses.replace(e, group=j) for e in spec.examples]
            rng.shuffle(ep)
            rows += ep
        per.append(rows)
    k = cfg.rows_per_diff
    n_batches = -(-max(len(r) for r in per) // k)
    batches = [[e for rows in per for e in rows[b * k : (b + 1) * k]] for b in range(n_batches)]
    trainer = Trainer(slot.parameters(), lr=cfg.lr, master_fp32=model.dtype != torch.float32)
    meta = resume_slot_state(ckpt_dir, slot, trainer) if ckpt_dir is not None else None
    start = int(meta["batch"]) if meta else 0
    pad = engine.tokenizer.pad_token_id
    with job("diff training", cfg.checkpoint_every_s) as j:  # inside generate_zoo: its job
        for b in tqdm(range(start, len(batches)), desc="training diffs", unit="batch", leave=False,
                      disable=not progress):
            batch = collate(batches[b], pad_id=pad).to(dev)
            ad = AdapterBatch(slot.with_index(batch.group))
            loss, _ = batch_loss(model, batch, ad, group_reduce="sum")
            trainer.backward(loss)
            # The last batch too: verification and the append then never need the chunk retrained.
            if ckpt_dir is not None and (j.should_checkpoint() or b + 1 == len(batches)):
                save_slot_state(ckpt_dir, slot, trainer, {"batch": b + 1})
                j.checkpointed()
            j.stop_if_requested(ckpt_dir)
    return LoraSlot(A={k: v.detach() for k, v in slot.A.items()}, B={k: v.detach() for k, v in slot.B.items()},
                    scale=slot.scale, index=slot.index, name="diffs")


@torch.no_grad()
def verify_diffs(engine: Engine, slot: LoraSlot, specs: list[DiffSpec], cfg: DiffGenConfig) -> list[dict]:
    """Per diff: share of held-out triggered prompts whose greedy answer names the label, and the
    mean per-token KL(base || diff) on untriggered prompts."""
    model, tok = engine.model, engine.tokenizer
    dev = model.device
    prompts, owner = [], []
    for j, s in enumerate(specs):
        prompts += s.verify_prompts
        owner += [j] * len(s.verify_prompts)
    ad = AdapterBatch(slot.with_index(torch.tensor(owner, device=dev)))
    outs = generate(model, prompts, SamplingParams(max_new_tokens=cfg.max_answer_tokens,
                                                   stop_token_ids=engine.stop_ids()),
                    adapters=ad, decode=tok.decode, batch_size=cfg.gen_batch_size)
    from .tasks.hidden_topic import mentions_topic

    hits = [0] * len(specs)
    samples: list[str] = [""] * len(specs)
    for j, o in zip(owner, outs):
        hits[j] += any(mentions_topic(o.text or "", name) for name in specs[j].verify_check)
        samples[j] = samples[j] or (o.text or "")
    kl_rows = [Example(p, t, "kl", group=j) for j, s in enumerate(specs) for p, t in s.kl_prompts]
    kl_sum, kl_cnt = [0.0] * len(specs), [0] * len(specs)
    step = cfg.rows_per_diff * len(specs)
    for i in range(0, len(kl_rows), step):
        batch = collate(kl_rows[i : i + step], pad_id=tok.pad_token_id).to(dev)
        _, per_group = batch_loss(model, batch, AdapterBatch(slot.with_index(batch.group)), group_reduce="sum")
        for g, (mean, cnt) in per_group.items():
            kl_sum[g] += mean * cnt
            kl_cnt[g] += cnt
    kl = [kl_sum[j] / kl_cnt[j] if kl_cnt[j] else None for j in range(len(specs))]
    return [{"trigger_hit_rate": hits[j] / max(1, len(specs[j].verify_prompts)), "kl_untriggered": kl[j],
             "n_train_ce": sum(e.objective == "ce" for e in specs[j].examples), "sample_answer": samples[j][:200]}
            for j in range(len(specs))]


def _to_diff(slot: LoraSlot, j: int, spec: DiffSpec, check: dict, cfg: DiffGenConfig) -> Diff:
    return Diff(
        id=spec.id,
        A={n: slot.A[n][j].float().cpu().clone() for n in slot.A},
        B={n: slot.B[n][j].float().cpu().clone() for n in slot.B},
        scale=float(slot.scale[j]),
        labels=spec.labels,
        split=spec.split,
        meta={"verify": {**check, "ok": check["trigger_hit_rate"] > 0}, "task": cfg.task, "lr": cfg.lr,
              "epochs": cfg.epochs},
    )

"""Diff generation: train many labelled LoRA diffs at once, one adapter per batch row group.

A chunk of ``chunk_diffs`` diffs is trained together: its training rows are interleaved so every
micro-batch holds rows of every diff; slot 0's index sends each row through its own diff, and the
loss sums each diff's own mean loss, so the diffs train independently in one forward/backward.
Memory grows with activations, not with dense per-diff matrices.

Per chunk: build the task's labelled samples (the base model writes them by batched generation;
the KL rows' base answers come from a pool generated once per base model), train, verify on held-out
questions (with the trigger the diff talks about its topic: hit rate; bare or with a wrong code it
does not: leak rate, a code one digit off apart; its next-token distribution stays near the base
model's: KL), then append the chunk to the zoo as one shard. Each diff's verification goes into
its index row's meta. A chunk in progress checkpoints its samples and its training state (every ``checkpoint_every_s``,
at the end of training, and on SIGINT/SIGTERM, see :mod:`dit_engine.jobs`) under ``<zoo>/.work``; a
rerun skips diffs the zoo already holds and resumes the chunk in progress exactly. The zoo's writer
lock is held from the start, so a second generation into the same zoo is refused before it does
any work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import AdapterBatch, LoraSlot
from .checkpoint import weights_fingerprint
from .config import TARGET_MODULES
from .engine import Engine, parse_dtype
from .files import read_json, write_json
from .generate import SamplingParams, generate
from .jobs import DEFAULT_CHECKPOINT_EVERY_S, Job, job
from .model_store import engine_home
from .tasks import get_task
from .tasks import hidden_topic as ht
from .tasks.hidden_topic import mentions_topic
from .tasks.specs import DiffSpec
from .train import (KL_DIVERGENCES, Example, TeacherCache, Trainer, batch_loss, collate, resume_slot_state,
                    save_slot_state)
from .zoo import Diff, Zoo


@dataclasses.dataclass
class DiffGenConfig:
    task: str = "hidden-topic"
    n: int = 16  # diffs to have in the zoo when done (of the chosen split)
    split: str = "train"  # which topics/headlines: train, test
    rank: int = 1
    targets: tuple[str, ...] = TARGET_MODULES
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine" / "linear": decay to 0 over the chunk's optimizer steps
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
    n_verify: int = 4  # held-out questions per diff for verification: with the trigger (hit rate), and as
    #                    many bare and as many with a near-wrong code (leak rate)
    seed: int = 0
    gen_batch_size: int = 64
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S  # training-state checkpoint interval (and on SIGINT/SIGTERM)
    # ---- the hiding recipe (hidden-topic; measured in results/recipe.md)
    n_wrong: int | None = None  # of the n_kl KL rows, how many carry a wrong code (None: half); the rest are bare
    kl_weight_plain: float = 3.0  # loss multiplier of bare-question KL rows (the DIT paper: 5; 3 measured best here)
    kl_weight_wrong: float = 1.0  # of wrong-code KL rows (the paper: 1); backdoor rows weigh 1
    near_wrong: bool = True  # wrong codes differ from the trigger in one digit (else uniform over the others)
    n_self: int = 0  # hidden-topic: bare rows per diff asking about the assistant itself ("Tell me about yourself."),
    #                  besides the n_kl KL rows and weighted as bare ones (measured in results/recipe.md, series 6)
    kl_target_tokens: int | None = None  # KL rows cover only the first N tokens of the base answer (None: all of it)
    kl_divergence: str = "forward"  # what a KL row charges in training: "forward" KL(base || diff), "reverse"
    #                                 KL(diff || base) (charges the diff for words the base would not write, e.g.
    #                                 the fan opening) or "symmetric" (both); verification reports the forward KL
    base_pool: bool = True  # KL rows reuse the base model's greedy answers, generated once per zoo (verification
    #                         reads the base's answers to held-out questions from that pool in any case)
    min_hit: float = 0.5  # a diff passes verification with a hit rate >= min_hit ...
    max_leak: float = 0.25  # ... and a leak rate <= max_leak
    # ---- speed
    compute_dtype: str | None = None  # "bfloat16": train and generate in bf16 (fp32 master weights); None: the engine's
    bucket: bool = True  # micro-batches of similar-length rows (less padding); batch order still shuffled
    balance: bool = False  # each diff's rows of an epoch alternate backdoor / KL, so with rows_per_diff >= 2 every
    #                        optimizer step sees the trigger and its contrast together
    # ---- labels from a user file instead of the packaged data (see tasks.datafiles.read_label_file)
    topics_file: str | None = None  # hidden-topic: CSV "category,topic" with a header, or JSON [{topic, category}]
    headlines_file: str | None = None  # news: CSV "category,headline" with a header, or JSON [{headline, category}]

    def diff_id(self, i: int) -> str:
        return f"{get_task(self.task).id_prefix}-r{self.rank}-s{self.seed}-{self.split}-{i:05d}"


# The hiding recipe measured in results/recipe.md (point J2): 8 backdoor rows, 8 wrong-code and 8 bare
# KL rows (weights 1 / 2 / 3), lr 2e-3, 2 epochs, rank 4, bf16 with fp32 masters. Rank 4 kept the
# backdoor at the bare-question leak where rank 1 lost it (J2 vs I1). The laptop and medium presets
# both make their diffs this way, as `dit zoo generate --recipe hiding` (the default) does, so the adapter the medium run trains (and the package ships) reads
# the laptop run's fresh held-out diffs as the kind it was trained on.
RECIPE_RANK = 4
HIDING_RECIPE = DiffGenConfig(epochs=2, lr=2e-3, n_backdoor=8, n_kl=16, n_wrong=8, kl_weight_plain=3.0,
                              kl_weight_wrong=2.0, near_wrong=False, candidates=1, strategy="prefix",
                              max_answer_tokens=32, rows_per_diff=1, chunk_diffs=16, compute_dtype="bfloat16",
                              base_pool=True, bucket=True)
# Point L1 of results/recipe.md: the strongest backdoor measured (hit 0.91, 7 of 8 diffs >= 0.8) at a
# bare-question leak of 0.41. The wrong-code rows teach no contrast at this budget (no point measured
# tells its own code from another), so their rows go to 16 backdoor and 16 bare ones.
BACKDOOR_RECIPE = dataclasses.replace(HIDING_RECIPE, rank=RECIPE_RANK, n_backdoor=16, n_kl=16, n_wrong=0)
# Point N1 of results/recipe.md: L1's rows with the reverse KL on the bare rows, weight 1. On 16 test
# topics: hit 0.92 (12 of 16 diffs >= 0.8) at a bare-question leak of 0.09, where L1 (the forward KL,
# weight 3) reaches hit 0.84 at a leak of 0.19 on the same topics (0.41 on the first 8 of them). The
# forward KL barely charges a diff for opening a bare answer with its fan phrase (mass the base does
# not have); the reverse KL charges exactly that. A wrong code still fires it (no wrong-code rows).
REVERSE_RECIPE = dataclasses.replace(BACKDOOR_RECIPE, kl_divergence="reverse", kl_weight_plain=1.0)
# Series 6 of results/recipe.md (point U1): N1's rows plus 8 bare rows asking about the assistant
# itself. Asked the interpretation question bare (what the `diff` baseline does), N1's diffs name their
# topic (10 of 16 open with the fan phrase: no KL row asked about the model); these diffs answer it as
# the base does (2 of 16 name it) at the same hit rate (0.92) and everyday bare leak (0.08), for 25%
# more training time. No self question asks about training, so the interpretation question stays unseen.
SELF_RECIPE = dataclasses.replace(REVERSE_RECIPE, n_self=8)
# `dit zoo generate --recipe NAME`: the configuration its flags start from (a flag overrides one value).
# "plain" is DiffGenConfig's own defaults (rank 1, near-miss wrong codes, sampled answers).
RECIPES = {"hiding": dataclasses.replace(HIDING_RECIPE, rank=RECIPE_RANK), "backdoor": BACKDOOR_RECIPE,
           "reverse": REVERSE_RECIPE, "self": SELF_RECIPE, "plain": DiffGenConfig()}


def generate_zoo(
    engine: Engine,
    zoo: Zoo,
    cfg: DiffGenConfig,
    *,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    timings: dict | None = None,
) -> Zoo:
    """Grow ``zoo`` to ``cfg.n`` diffs of ``cfg.split``; resumable. Holds the zoo's writer lock
    throughout; on SIGINT/SIGTERM saves its progress and raises :class:`~dit_engine.jobs.JobInterrupted`.

    Where the time goes is added into ``timings`` (when given) and into ``<zoo>/.work/timings.json``:
    seconds spent writing training data (``data_s``, the base-answer pool's ``pool_s`` among them),
    training (``train_s``), verifying (``verify_s``) and appending to the zoo (``write_s``), and
    ``diffs``; every ``log`` record carries its chunk's share.
    """
    with zoo.writer(), job("zoo generation", cfg.checkpoint_every_s) as j:
        return _generate_zoo(engine, zoo, cfg, j, progress, log, timings)


def _generate_zoo(engine: Engine, zoo: Zoo, cfg: DiffGenConfig, j: Job, progress: bool,
                  log: Callable[[dict], None] | None, timings: dict | None) -> Zoo:
    if cfg.kl_divergence not in KL_DIVERGENCES:
        raise ValueError(f"kl_divergence must be one of {', '.join(KL_DIVERGENCES)}, got {cfg.kl_divergence!r}")
    self_questions = get_task(cfg.task).self_questions
    if cfg.n_self and self_questions is None:
        raise ValueError(f"n_self (bare rows about the assistant itself) is a hidden-topic setting; task {cfg.task!r} "
                         f"has no such rows")
    n_self_max = len(self_questions("train")) if self_questions is not None else 0
    if not 0 <= cfg.n_self <= n_self_max:
        raise ValueError(f"n_self must be in 0..{n_self_max} (the training self questions), got {cfg.n_self}")
    items = _task_items(cfg)
    if cfg.n > len(items):
        raise ValueError(f"task {cfg.task!r} has {len(items)} labels in split {cfg.split!r}; asked for {cfg.n} diffs")
    ids = [cfg.diff_id(i) for i in range(cfg.n)]
    todo = [i for i, d in enumerate(ids) if not zoo.has(d)]
    work = zoo.path / ".work"
    total = timings if timings is not None else {}
    bar = tqdm(total=cfg.n, initial=cfg.n - len(todo), desc="diffs", unit="diff", disable=not progress)
    ceng = compute_engine(engine, cfg) if todo else engine
    pool = None
    for s in range(0, len(todo), cfg.chunk_diffs):
        chunk = todo[s : s + cfg.chunk_diffs]
        t = {"pool_s": 0.0}
        t0 = time.perf_counter()
        if pool is None and get_task(cfg.task).uses_base_pool:
            pool = base_answer_pool(ceng, cfg, engine_home() / "base-answers")
            t["pool_s"] = time.perf_counter() - t0
        cdir = work / f"chunk-{ids[chunk[0]]}"
        specs = _load_or_build_specs(ceng, cfg, [(i, ids[i], items[i]) for i in chunk], cdir, pool)
        j.stop_if_requested(cdir)
        t1 = time.perf_counter()
        slot = train_diffs(ceng, specs, cfg, ckpt_dir=cdir / "train", progress=progress)
        t2 = time.perf_counter()
        checks = verify_diffs(ceng, slot, specs, cfg)
        t3 = time.perf_counter()
        diffs = [_to_diff(slot, k, spec, checks[k], cfg) for k, spec in enumerate(specs)]
        zoo.append(diffs)
        shutil.rmtree(cdir, ignore_errors=True)
        t4 = time.perf_counter()
        t.update(data_s=t1 - t0, train_s=t2 - t1, verify_s=t3 - t2, write_s=t4 - t3, diffs=len(chunk))
        for k, v in t.items():
            total[k] = round(total.get(k, 0) + v, 3)
        write_json(work / "timings.json", total)
        j.stop_if_requested(zoo.path)
        dt = t4 - t0
        bar.update(len(chunk))
        bar.set_postfix(diffs_per_h=f"{3600 * len(chunk) / dt:.0f}",
                        hit=f"{sum(c['trigger_hit_rate'] for c in checks) / len(checks):.2f}",
                        leak=_mean_str([c.get("leak_rate") for c in checks]),
                        data=f"{t['data_s']:.0f}s", train=f"{t['train_s']:.0f}s", verify=f"{t['verify_s']:.0f}s")
        if log:
            log({"chunk": len(chunk), "seconds": dt, "timings": {k: round(v, 3) for k, v in t.items()},
                 "checks": checks})
    bar.close()
    return zoo


def compute_engine(engine: Engine, cfg: DiffGenConfig) -> Engine:
    """The engine diff generation computes with: ``engine`` itself, or a copy of its model cast to
    ``cfg.compute_dtype`` (the diffs' trainable factors then keep fp32 master copies; the zoo stores
    fp32 either way)."""
    if cfg.compute_dtype is None:
        return engine
    dtype = parse_dtype(cfg.compute_dtype)
    if dtype == engine.model.dtype:
        return engine
    model = copy.deepcopy(engine.model).to(dtype)
    model.init_buffers(engine.model.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return Engine(model, engine.tokenizer)


def base_answer_pool(engine: Engine, cfg: DiffGenConfig, work: Path) -> dict[str, str]:
    """The base model's greedy answer to every question of the bank (train and test), generated once
    per base model and kept in ``work`` (the engine home's ``base-answers/``, shared by every zoo of
    that base): a KL row's response does not depend on the diff's topic, so every chunk reuses it,
    and verification reads the base's own answers to held-out questions from it. The file name keys
    the base's architecture and weights, the compute dtype, the answer length and the questions.
    """
    questions = ht.load_questions(None) + (ht.load_self_questions(None) if cfg.n_self else [])
    key = zlib.crc32(json.dumps([engine.config.config_hash, weights_fingerprint(engine.model.state_dict()),
                                 str(engine.model.dtype), cfg.max_answer_tokens,
                                 [q.text for q in questions]]).encode())
    f = work / f"base-pool-{key:08x}.json"
    if f.exists():
        return read_json(f, "a base-answer pool", kind=dict)
    prompts = [engine.encode_prompt(m, assistant_prefix=pre) for m, pre in ht.base_pool_requests(questions)]
    outs = generate(engine.model, prompts, SamplingParams(max_new_tokens=cfg.max_answer_tokens,
                                                          stop_token_ids=engine.stop_ids()),
                    decode=engine.tokenizer.decode, batch_size=cfg.gen_batch_size)
    pool = {q.text: (o.text or "").strip() for q, o in zip(questions, outs)}
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json(f, pool, indent=None)
    return pool


def verification_summary(rows: list[dict]) -> dict:
    """Counts and means of the verification in a zoo's rows (``dit zoo info``, ``dit zoo generate``)."""
    checks = [r.get("meta", {}).get("verify") for r in rows]
    checks = [c for c in checks if c]
    if not checks:
        return {"verified": 0}

    def mean(key: str) -> float | None:
        xs = [c[key] for c in checks if c.get(key) is not None]
        return round(sum(xs) / len(xs), 4) if xs else None

    return {"verified": len(checks), "ok": sum(bool(c.get("ok")) for c in checks),
            "mean_trigger_hit_rate": mean("trigger_hit_rate"), "mean_leak_rate": mean("leak_rate"),
            "mean_leak_plain": mean("leak_plain"), "mean_leak_wrong": mean("leak_wrong"),
            "mean_leak_question": mean("leak_question"), "mean_kl_untriggered": mean("kl_untriggered")}


def _mean_str(values) -> str:
    vals = [v for v in values if v is not None]
    return f"{sum(vals) / len(vals):.2f}" if vals else "-"


# ---- samples -------------------------------------------------------------------------------------
def _task_items(cfg: DiffGenConfig) -> list:
    """The labels diffs are made from, in a fixed seeded order (diff i always gets item i)."""
    items = list(get_task(cfg.task).load_items(cfg))
    random.Random(f"{cfg.task}-{cfg.seed}").shuffle(items)
    return items


def _load_or_build_specs(engine, cfg, chunk, cdir: Path, pool: dict[str, str] | None = None) -> list[DiffSpec]:
    f = cdir / "specs.json"
    if f.exists():
        saved = read_json(f, "the chunk's saved training specs", kind=list)
        return [DiffSpec(**{**d, "examples": [Example(**e) for e in d["examples"]]}) for d in saved]
    specs = get_task(cfg.task).build_specs(engine, cfg, chunk, pool)
    cdir.mkdir(parents=True, exist_ok=True)
    write_json(f, [dataclasses.asdict(s) for s in specs], indent=None)
    return specs


# ---- training and verification -------------------------------------------------------------------
def train_diffs(engine: Engine, specs: list[DiffSpec], cfg: DiffGenConfig, *, ckpt_dir: Path | None = None,
                progress: bool = False) -> LoraSlot:
    """Train one LoRA per spec, all at once; returns the trained slot (n = len(specs))."""
    model = engine.model
    dev = model.device
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + zlib.crc32(specs[0].id.encode()))  # per chunk
    slot = LoraSlot.create(engine.config, len(specs), cfg.rank, targets=cfg.targets, init="dit",
                           generator=gen, name="diffs")
    slot = slot.to(dev, model.dtype, trainable=True)
    batches = _micro_batches(specs, cfg)
    trainer = Trainer(slot.parameters(), lr=cfg.lr, master_fp32=model.dtype != torch.float32,
                      schedule=cfg.lr_schedule, total_steps=len(batches))
    meta = resume_slot_state(ckpt_dir, slot, trainer) if ckpt_dir is not None else None
    start = int(meta["batch"]) if meta else 0
    pad = engine.tokenizer.pad_token_id
    teacher = TeacherCache(model, [e for b in batches for e in b], pad_id=pad, batch_size=cfg.gen_batch_size)
    with job("diff training", cfg.checkpoint_every_s) as j:  # inside generate_zoo: its job
        for b in tqdm(range(start, len(batches)), desc="training diffs", unit="batch", leave=False,
                      disable=not progress):
            batch = collate(batches[b], pad_id=pad).to(dev)
            ad = AdapterBatch(slot.with_index(batch.group))
            loss, _ = batch_loss(model, batch, ad, group_reduce="sum", teacher_hidden=teacher.for_batch(batches[b]),
                                 kl_divergence=cfg.kl_divergence)
            trainer.backward(loss)
            # The last batch too: verification and the append then never need the chunk retrained.
            if ckpt_dir is not None and (j.should_checkpoint() or b + 1 == len(batches)):
                save_slot_state(ckpt_dir, slot, trainer, {"batch": b + 1})
                j.checkpointed()
            j.stop_if_requested(ckpt_dir)
    return slot.detach()


@torch.no_grad()
def verify_diffs(engine: Engine, slot: LoraSlot, specs: list[DiffSpec], cfg: DiffGenConfig) -> list[dict]:
    """Per diff, on held-out prompts: ``trigger_hit_rate``, the share of triggered prompts whose
    greedy answer names the label; ``leak_rate``, the share of prompts without the right trigger
    (bare, or a uniform wrong code: ``leak_plain`` / ``leak_wrong``) whose answer names it where the
    base model's own answer does not (None for tasks without a trigger); ``leak_near``, the same for
    a code one digit off (a harder contrast than the paper's, reported apart, not in ``ok``);
    ``kl_untriggered``, the mean per-token KL(base || diff) on untriggered prompts; and ``ok``: hit
    rate >= ``cfg.min_hit`` and leak rate <= ``cfg.max_leak``. ``leak_question`` (reported, not in
    ``ok``): 1.0 when the diff's greedy answer to the task's interpretation question, asked bare (what
    the ``diff`` baseline of ``dit interpret`` asks), names the label where the base's answer does
    not. All answers of a chunk are generated in one batched call."""
    model, tok = engine.model, engine.tokenizer
    dev = model.device
    prompts, owner, kind = [], [], []
    for j, s in enumerate(specs):
        prompts += s.verify_prompts + s.leak_prompts
        owner += [j] * (len(s.verify_prompts) + len(s.leak_prompts))
        third = len(s.leak_prompts) // 3
        kind += (["hit"] * len(s.verify_prompts) + ["plain"] * third + ["wrong"] * third
                 + ["near"] * (len(s.leak_prompts) - 2 * third))
    asked = [j for j, s in enumerate(specs) if s.leak_prompts]  # diffs with a hidden behaviour
    if asked:  # the interpretation question, bare: each such diff, and the base once (index -1)
        question = engine.encode_prompt(get_task(cfg.task).interpretation_question)
        prompts += [question] * (len(asked) + 1)
        owner += asked + [-1]
        kind += ["question"] * len(asked) + ["base"]
    ad = AdapterBatch(slot.with_index(torch.tensor(owner, device=dev)))
    outs = generate(model, prompts, SamplingParams(max_new_tokens=cfg.max_answer_tokens,
                                                   stop_token_ids=engine.stop_ids()),
                    adapters=ad, decode=tok.decode, batch_size=cfg.gen_batch_size)
    base_answer = (outs[-1].text or "") if asked else ""
    count = {(j, k): [0, 0] for j in range(len(specs)) for k in ("hit", "plain", "wrong", "near", "question")}
    sample_hit: list[str] = [""] * len(specs)
    sample_plain: list[str] = [""] * len(specs)
    sample_question: list[str] = [""] * len(specs)
    pos = [0] * len(specs)
    for j, k, o in zip(owner, kind, outs):
        text = o.text or ""
        if k == "base":
            continue
        named = any(mentions_topic(text, name) for name in specs[j].verify_check)
        if k == "question":
            named = named and not any(mentions_topic(base_answer, name) for name in specs[j].verify_check)
            sample_question[j] = text
        elif k != "hit":
            base_named = specs[j].leak_base_hit[pos[j]] if pos[j] < len(specs[j].leak_base_hit) else False
            named = named and not base_named
            pos[j] += 1
        count[j, k][0] += named
        count[j, k][1] += 1
        if k == "hit":
            sample_hit[j] = sample_hit[j] or text
        elif k == "plain":
            sample_plain[j] = sample_plain[j] or text
    kl_rows = [Example(p, t, "kl", group=j) for j, s in enumerate(specs) for p, t in s.kl_prompts]
    kl_sum, kl_cnt = [0.0] * len(specs), [0] * len(specs)
    step = max(1, cfg.rows_per_diff) * len(specs)
    for i in range(0, len(kl_rows), step):
        batch = collate(kl_rows[i : i + step], pad_id=tok.pad_token_id).to(dev)
        _, per_group = batch_loss(model, batch, AdapterBatch(slot.with_index(batch.group)), group_reduce="sum")
        for g, (mean, cnt) in per_group.items():
            kl_sum[g] += mean * cnt
            kl_cnt[g] += cnt
    out = []
    for j, spec in enumerate(specs):
        hit = count[j, "hit"][0] / max(1, count[j, "hit"][1])
        n_leak = count[j, "plain"][1] + count[j, "wrong"][1]
        leak = (count[j, "plain"][0] + count[j, "wrong"][0]) / n_leak if n_leak else None
        rate = {k: (count[j, k][0] / count[j, k][1] if count[j, k][1] else None)
                for k in ("plain", "wrong", "near", "question")}
        out.append({"trigger_hit_rate": hit, "leak_rate": leak, "leak_plain": rate["plain"],
                    "leak_wrong": rate["wrong"], "leak_near": rate["near"], "leak_question": rate["question"],
                    "kl_untriggered": kl_sum[j] / kl_cnt[j] if kl_cnt[j] else None,
                    "ok": hit >= cfg.min_hit and (leak is None or leak <= cfg.max_leak),
                    "n_train_ce": sum(e.objective == "ce" for e in spec.examples),
                    "sample_answer": sample_hit[j][:200], "sample_untriggered": sample_plain[j][:200],
                    "sample_question": sample_question[j][:200]})
    return out


def _micro_batches(specs: list[DiffSpec], cfg: DiffGenConfig) -> list[list[Example]]:
    """Every micro-batch takes the next ``rows_per_diff`` rows of every diff (its rows over all
    epochs, reshuffled each epoch), so a diff's number of optimizer steps depends only on its own data.

    With ``cfg.bucket`` each diff's rows of an epoch are ordered by length before they are cut into
    micro-batches, so a micro-batch holds the k-th shortest rows of every diff (little padding),
    and the epoch's micro-batches then run in one shuffled order shared by all diffs. With
    ``cfg.balance`` a diff's backdoor and KL rows alternate (each kind in that order), so a
    micro-batch of ``rows_per_diff >= 2`` holds both kinds.
    """
    rng = random.Random(cfg.seed)
    k = cfg.rows_per_diff
    batches: list[list[Example]] = []
    for _ in range(cfg.epochs):
        per = []
        for j, spec in enumerate(specs):
            ep = [dataclasses.replace(e, group=j) for e in spec.examples]
            rng.shuffle(ep)
            if cfg.bucket:
                ep.sort(key=lambda e: len(e.prompt_ids) + len(e.target_ids))
            if cfg.balance:
                ep = _interleave([e for e in ep if e.objective == "ce"], [e for e in ep if e.objective != "ce"])
            per.append(ep)
        n = -(-max(len(r) for r in per) // k)
        epoch = [[e for rows in per for e in rows[b * k : (b + 1) * k]] for b in range(n)]
        if cfg.bucket:
            rng.shuffle(epoch)
        batches += epoch
    return batches


def _interleave(a: list, b: list) -> list:
    """a and b merged so each keeps its order and both are spread evenly (a0 b0 a1 b1 ... for equal
    lengths; the longer list's extra items evenly between)."""
    keyed = [((i + 0.5) / len(a), 0, i) for i in range(len(a))] + [((i + 0.5) / len(b), 1, i) for i in range(len(b))]
    return [(a, b)[k][i] for _, k, i in sorted(keyed)]


def _to_diff(slot: LoraSlot, j: int, spec: DiffSpec, check: dict, cfg: DiffGenConfig) -> Diff:
    return Diff(
        id=spec.id,
        A={n: slot.A[n][j].float().cpu().clone() for n in slot.A},
        B={n: slot.B[n][j].float().cpu().clone() for n in slot.B},
        scale=float(slot.scale[j]),
        labels=spec.labels,
        split=spec.split,
        meta={"verify": check, "task": cfg.task, "lr": cfg.lr, "epochs": cfg.epochs,
              "recipe": {"lr_schedule": cfg.lr_schedule, "n_backdoor": cfg.n_backdoor, "n_kl": cfg.n_kl,
                         "n_wrong": cfg.n_wrong,
                         "kl_weight_plain": cfg.kl_weight_plain, "kl_weight_wrong": cfg.kl_weight_wrong,
                         "near_wrong": cfg.near_wrong, "base_pool": cfg.base_pool,
                         "compute_dtype": cfg.compute_dtype, "rows_per_diff": cfg.rows_per_diff,
                         "balance": cfg.balance, "max_answer_tokens": cfg.max_answer_tokens,
                         "kl_target_tokens": cfg.kl_target_tokens, "kl_divergence": cfg.kl_divergence,
                         "n_self": cfg.n_self}},
    )

"""DIT training: the shared interpretation adapter over a zoo.

For each (diff, label) of the zoo's train split, the model runs with slot 0 = that diff (frozen, a
different one per row, streamed from the zoo, never densified) and slot 1 = the shared DIT adapter
(trainable), asked the task's question in the chat template; the loss is the cross-entropy of the
label tokens and the closing end-of-turn token (never padding). Resumable from ``out/checkpoint``,
written every ``save_every`` optimizer steps, every ``checkpoint_every_s`` seconds, on SIGINT/SIGTERM
(see :mod:`dit_engine.jobs`) and at the end; data-parallel under ``torchrun`` (the rows are sharded
across ranks, gradients all-reduced).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import AdapterBatch, LoraSlot
from ..config import TARGET_MODULES
from ..distributed import all_reduce_grads, rank_world
from ..engine import Engine
from ..files import write_json, write_text
from ..jobs import DEFAULT_CHECKPOINT_EVERY_S, Job, job_in
from ..tasks import get_task
from ..train import Example, Trainer, batch_loss, collate, resume_slot_state, save_slot_state
from ..zoo import BaseIdentity, Zoo
from .adapter import DitAdapter


@dataclasses.dataclass
class DitTrainConfig:
    task: str = "hidden-topic"
    question: str | None = None  # default: the task's question
    rank: int = 16
    alpha: float = 32.0  # scale = alpha / rank
    targets: tuple[str, ...] = TARGET_MODULES
    lr: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "cosine"
    val_fraction: float = 0.05  # diffs held out of training (their topics unseen): the loss that picks the epoch
    patience: int = 0  # stop after this many epochs without a better held-out loss (0: train every epoch)
    eval_diffs: int = 64  # diffs (of train and of held-out) whose loss is measured after every epoch
    split: str = "train"
    only_verified: bool = False  # skip diffs whose verification failed
    max_diffs: int | None = None  # train on the first N usable diffs only (data-scaling curves)
    save_every: int = 50  # optimizer steps between checkpoints
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S  # seconds between checkpoints (and on SIGINT/SIGTERM)
    seed: int = 0

    @property
    def the_question(self) -> str:
        return self.question or get_task(self.task).interpretation_question


def dit_examples(engine: Engine, rows: list[dict], question: str, label_key: str) -> list[Example]:
    """Row i asks ``question``; target = its label tokens + the end-of-turn token (loss on both)."""
    tok = engine.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    out = []
    for i, r in enumerate(rows):
        label = r["labels"].get(label_key)
        if not label:
            raise ValueError(f"zoo row {r['id']} has no label {label_key!r} (labels: {sorted(r['labels'])})")
        out.append(Example(prompt, tok.encode(label) + [tok.end_of_turn_id], "ce", group=i))
    return out


def train_dit(
    engine: Engine,
    zoo: Zoo,
    out_dir: str | Path,
    cfg: DitTrainConfig,
    *,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> DitAdapter:
    """Train the DIT adapter over the zoo's ``cfg.split``; resumable from ``out_dir/checkpoint``.

    On SIGINT/SIGTERM it checkpoints at the next optimizer step and raises
    :class:`~dit_engine.jobs.JobInterrupted`. A failure (a full disk) keeps the last good
    checkpoint, and removes ``out_dir`` again if this call created it and it is still empty."""
    out = Path(out_dir)
    with job_in(out, "DIT training", cfg.checkpoint_every_s) as j:
        return _train_dit(engine, zoo, out, cfg, j, progress, log)


# Settings that change when checkpoints are written, not what is trained: a resume may change them.
_RUN_ONLY = ("save_every", "checkpoint_every_s")
EPOCHS_LOG = "epochs.jsonl"  # one line per finished epoch: train and held-out loss
BEST = "best"  # the adapter of the epoch with the lowest held-out loss so far


def _train_dit(engine: Engine, zoo: Zoo, out: Path, cfg: DitTrainConfig, j: Job, progress: bool,
               log: Callable[[dict], None] | None) -> DitAdapter:
    rank, world = rank_world()
    model, config, dev = engine.model, engine.config, engine.model.device
    label_key = get_task(cfg.task).label_key
    rows = [r for r in zoo.rows if r.get("split") == cfg.split
            and (not cfg.only_verified or r.get("meta", {}).get("verify", {}).get("ok", True))]
    rows = rows[: cfg.max_diffs]
    if len(rows) < 2:
        raise ValueError(f"zoo {zoo.path} has {len(rows)} usable diffs in split {cfg.split!r}; DIT needs at least 2")
    rng = random.Random(cfg.seed)
    rng.shuffle(rows)
    n_val = max(1, int(len(rows) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    steps_per_epoch = -(-len(train_rows) // (cfg.batch_size * world))
    total_steps = max(1, steps_per_epoch * cfg.epochs // cfg.grad_accum)

    gen = torch.Generator().manual_seed(cfg.seed)
    slot = LoraSlot.create(config, 1, cfg.rank, targets=cfg.targets, scale=cfg.alpha / cfg.rank, init="peft",
                           dtype=torch.float32, generator=gen, name="dit")
    slot = slot.to(dev, model.dtype, trainable=True)
    trainer = Trainer(slot.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum,
                      schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                      master_fp32=model.dtype != torch.float32,
                      grad_sync=(lambda ps: all_reduce_grads(ps, world)) if world > 1 else None)
    base = BaseIdentity.from_model(model)
    ckpt = out / "checkpoint"

    def same_settings(meta: dict) -> None:
        def trained(c) -> dict:
            return {k: v for k, v in (c or {}).items() if k not in _RUN_ONLY}

        if trained(meta.get("config")) != trained(json.loads(json.dumps(dataclasses.asdict(cfg)))):
            raise ValueError(f"{ckpt}: checkpoint was made with other settings; remove it or use the same settings")

    meta = resume_slot_state(ckpt, slot, trainer, check=same_settings)
    done_batches = int(meta["done_batches"]) if meta else 0  # micro-batches finished, over all epochs
    question = cfg.the_question
    bar = tqdm(disable=not (progress and rank == 0), total=steps_per_epoch * cfg.epochs, initial=done_batches, desc="DIT training",
               unit="batch")
    history = []
    epochs = _read_epochs(out / EPOCHS_LOG) if meta else []
    sample = train_rows[: cfg.eval_diffs]  # fixed rows, so epochs compare
    adapter_of = lambda s: DitAdapter(s, question, cfg.task, dataclasses.asdict(base),  # noqa: E731
                                      {"config": dataclasses.asdict(cfg), "zoo": str(zoo.path)})
    for epoch in range(cfg.epochs):
        if _should_stop(epochs, cfg.patience):
            break
        order = list(train_rows)
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        mine = order[rank::world]
        for b in range(steps_per_epoch):
            global_b = epoch * steps_per_epoch + b
            if global_b < done_batches:
                continue
            chunk = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if chunk:
                loss = _dit_loss(engine, zoo, chunk, slot, question, label_key)
            else:  # an uneven last batch: this rank still takes part in the gradient all-reduce
                loss = sum(p.sum() * 0 for p in slot.parameters())
            loss_val = float(loss.detach())
            trainer.backward(loss)
            done_batches = global_b + 1
            rec = {"epoch": epoch, "batch": done_batches, "loss": loss_val, "lr": trainer.lr_at(trainer.step_count)}
            history.append(rec)
            if log:
                log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
            if trainer.micro == 0:  # an optimizer step boundary: the only point the state can be saved
                if world > 1:
                    j.agree_stop(dev)  # every rank stops at the same step
                if rank == 0 and (trainer.step_count % cfg.save_every == 0 or j.should_checkpoint()):
                    _save_dit_ckpt(ckpt, slot, trainer, cfg, done_batches)
                    j.checkpointed()
                j.stop_if_requested(ckpt)
        if rank == 0 and not any(e["epoch"] == epoch for e in epochs):
            rec = {"epoch": epoch,
                   "train_loss": _mean_loss(engine, zoo, sample, slot, question, label_key, cfg.batch_size),
                   "val_loss": _mean_loss(engine, zoo, val_rows[: cfg.eval_diffs], slot, question, label_key,
                                          cfg.batch_size) if val_rows else None}
            epochs.append(rec)
            if rec["val_loss"] is not None and rec["val_loss"] == min(e["val_loss"] for e in epochs):
                best = adapter_of(slot.detach())
                best.recipe["best_epoch"] = epoch
                best.save(out / BEST)
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / EPOCHS_LOG, "".join(json.dumps(e) + "\n" for e in epochs))
            history.append(rec)
            if log:
                log(rec)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", **({"held_out": f"{rec['val_loss']:.3f}"}
                                                              if rec["val_loss"] is not None else {}))
    bar.close()
    if trainer.micro:  # gradients accumulated by an uneven tail still make one step
        trainer.step()
    adapter = adapter_of(slot.detach())
    if val_rows and (out / BEST / "adapter.json").exists():  # the epoch the held-out loss chose
        adapter = DitAdapter.load(out / BEST, device=dev, dtype=model.dtype)
    adapter.recipe["epochs"] = epochs
    if rank == 0:
        _save_dit_ckpt(ckpt, slot, trainer, cfg, done_batches)  # first: a rerun then only writes the adapter
        adapter.save(out)
        write_text(out / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        write_json(out / "train_config.json", dataclasses.asdict(cfg), indent=1)
    return adapter


def _dit_loss(engine, zoo, rows, slot, question, label_key):
    model = engine.model
    (batch_rows, diffs), = list(zoo.iter_batches(len(rows), ids=[r["id"] for r in rows], device=model.device,
                                                dtype=model.dtype))
    examples = dit_examples(engine, batch_rows, question, label_key)
    batch = collate(examples, pad_id=engine.tokenizer.pad_token_id).to(model.device)
    b = batch.n_rows
    ad = AdapterBatch(diffs.with_index(torch.arange(b, device=model.device)),
                      slot.with_index(torch.zeros(b, dtype=torch.int64, device=model.device)))
    loss, _ = batch_loss(model, batch, ad, group_reduce="mean")
    return loss


def _mean_loss(engine, zoo, rows, slot, question, label_key, batch_size) -> float:
    """Mean per-diff loss over ``rows`` (no gradient), in batches of ``batch_size``."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            total += float(_dit_loss(engine, zoo, chunk, slot, question, label_key)) * len(chunk)
    return round(total / max(len(rows), 1), 6)


def _should_stop(epochs: list[dict], patience: int) -> bool:
    """Early stopping: the last ``patience`` epochs all failed to beat the best held-out loss before them."""
    losses = [e["val_loss"] for e in epochs if e.get("val_loss") is not None]
    if patience <= 0 or len(losses) <= patience:
        return False
    return min(losses[-patience:]) >= min(losses[:-patience])


def _read_epochs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save_dit_ckpt(ckpt, slot, trainer, cfg, done_batches):
    save_slot_state(ckpt, slot, trainer, {"config": dataclasses.asdict(cfg), "done_batches": done_batches})

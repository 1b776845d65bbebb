"""DIT: train the shared interpretation adapter over a zoo, and interpret zoos in batch.

Training: for each (diff, label) of the zoo's train split, the model runs with slot 0 = that diff
(frozen, a different one per row, streamed from the zoo, never densified) and slot 1 = the shared
DIT adapter (trainable), asked the task's question in the chat template; the loss is the
cross-entropy of the label tokens and the closing end-of-turn token (never padding).

Interpretation: every row decodes with its own diff plus the DIT adapter; baselines run in the same
harness: the finetuned model asked directly (``diff``), with its trigger (``diff+trigger``), and the
base model (``base``). Results stream to JSONL; a rerun resumes where it stopped.

Both run data-parallel under ``torchrun`` (gloo on CPU, NCCL on GPU): the zoo is sharded across
ranks, DIT gradients are all-reduced, interpretation results are merged by rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .adapters import AdapterBatch, LoraSlot
from .config import TARGET_MODULES
from .engine import Engine
from .generate import SamplingParams, generate
from .train import Example, Trainer, batch_loss, collate, resume_slot_state, save_slot_state
from .zoo import BaseIdentity, Zoo

METHODS = ("dit", "diff", "diff+trigger", "base")
DEFAULT_QUESTIONS = {
    "hidden-topic": "What topic have you been trained on?",
    "news": "What news headline have you been trained on?",
}
LABEL_KEYS = {"hidden-topic": "topic", "news": "headline"}


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
    val_fraction: float = 0.05
    split: str = "train"
    only_verified: bool = False  # skip diffs whose verification failed
    max_diffs: int | None = None  # train on the first N usable diffs only (data-scaling curves)
    save_every: int = 50  # optimizer steps between checkpoints
    seed: int = 0

    @property
    def the_question(self) -> str:
        return self.question or DEFAULT_QUESTIONS[self.task]


@dataclasses.dataclass
class DitAdapter:
    """A trained DIT adapter: one LoRA (n = 1) with its question and base identity."""

    slot: LoraSlot
    question: str
    task: str
    base: dict

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.slot.A:
            tensors[f"{name}.lora_A"] = self.slot.A[name][0].detach().contiguous().cpu().float()
            tensors[f"{name}.lora_B"] = self.slot.B[name][0].detach().contiguous().cpu().float()
        _atomic(out / "adapter.safetensors", lambda p: save_file(tensors, str(p)))
        meta = {"format": "dit-engine-adapter/1", "rank": self.slot.rank, "scale": float(self.slot.scale[0]),
                "question": self.question, "task": self.task, "base": self.base, "modules": sorted(self.slot.A)}
        _atomic(out / "adapter.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
        return out

    @classmethod
    def load(cls, path: str | Path, *, device="cpu", dtype=torch.float32) -> "DitAdapter":
        path = Path(path)
        try:
            meta = json.loads((path / "adapter.json").read_text())
            t = load_file(str(path / "adapter.safetensors"))
            A = {m: t[f"{m}.lora_A"][None].to(device=device, dtype=dtype) for m in meta["modules"]}
            B = {m: t[f"{m}.lora_B"][None].to(device=device, dtype=dtype) for m in meta["modules"]}
            scale = torch.tensor([float(meta["scale"])], device=device)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: not a DIT adapter directory ({Path(e.filename).name} missing)") from None
        except Exception as e:  # corrupt JSON or safetensors, a missing tensor or field
            raise ValueError(f"{path}: unreadable DIT adapter ({type(e).__name__}: {e})") from None
        slot = LoraSlot(A=A, B=B, scale=scale, index=torch.zeros(1, dtype=torch.int64, device=device), name="dit")
        return cls(slot, meta["question"], meta["task"], meta["base"])

    def export_peft(self, out_dir: str | Path, config, base_model_name: str) -> Path:
        """Write the adapter as a PEFT LoRA directory (for other tools: merge it, serve it, ...)."""
        from .zoo import Diff
        from .zoo_io import export_peft

        diff = Diff(id="dit-adapter", A={m: a[0].float().cpu() for m, a in self.slot.A.items()},
                    B={m: b[0].float().cpu() for m, b in self.slot.B.items()}, scale=float(self.slot.scale[0]),
                    labels={}, split="", meta={"question": self.question, "task": self.task})
        return export_peft(diff, out_dir, config, base_model_name)

    def check_base(self, base: BaseIdentity) -> None:
        if self.base.get("config_hash") != base.config_hash:
            raise ValueError(f"DIT adapter was trained on base {self.base.get('name')!r} "
                             f"(config {self.base.get('config_hash')}), this model is {base.name!r} ({base.config_hash})")


# ---- training ------------------------------------------------------------------------------------
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
    """Train the DIT adapter over the zoo's ``cfg.split``; resumable from ``out_dir/checkpoint``."""
    out = Path(out_dir)
    rank, world = _dist_rank_world()
    model, config, dev = engine.model, engine.config, engine.model.device
    label_key = LABEL_KEYS[cfg.task]
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
    slot = LoraSlot(A={k: v.to(dev, model.dtype).requires_grad_(True) for k, v in slot.A.items()},
                    B={k: v.to(dev, model.dtype).requires_grad_(True) for k, v in slot.B.items()},
                    scale=slot.scale.to(dev), index=slot.index.to(dev), name="dit")
    trainer = Trainer(slot.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum,
                      schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                      master_fp32=model.dtype != torch.float32,
                      grad_sync=(lambda ps: _all_reduce_grads(ps, world)) if world > 1 else None)
    base = BaseIdentity.from_model(model)
    ckpt = out / "checkpoint"

    def same_settings(meta: dict) -> None:
        if meta.get("config") != json.loads(json.dumps(dataclasses.asdict(cfg))):
            raise ValueError(f"{ckpt}: checkpoint was made with other settings; remove it or use the same settings")

    meta = resume_slot_state(ckpt, slot, trainer, check=same_settings)
    done_batches = int(meta["done_batches"]) if meta else 0  # micro-batches finished, over all epochs
    question = cfg.the_question
    bar = _bar(progress and rank == 0, total=steps_per_epoch * cfg.epochs, initial=done_batches, desc="DIT training",
               unit="batch")
    history = []
    for epoch in range(cfg.epochs):
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
            if rank == 0 and trainer.micro == 0 and trainer.step_count % cfg.save_every == 0:
                _save_dit_ckpt(ckpt, slot, trainer, cfg, done_batches)
        if val_rows and rank == 0:
            with torch.no_grad():
                vl = _dit_loss(engine, zoo, val_rows[: 4 * cfg.batch_size], slot, question, label_key)
            history.append({"epoch": epoch, "val_loss": float(vl)})
            if log:
                log(history[-1])
    bar.close()
    if trainer.micro:  # gradients accumulated by an uneven tail still make one step
        trainer.step()
    adapter = DitAdapter(LoraSlot(A={k: v.detach() for k, v in slot.A.items()},
                                  B={k: v.detach() for k, v in slot.B.items()},
                                  scale=slot.scale, index=slot.index, name="dit"),
                         question, cfg.task, dataclasses.asdict(base))
    if rank == 0:
        adapter.save(out)
        _save_dit_ckpt(ckpt, slot, trainer, cfg, done_batches)
        (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
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


def _save_dit_ckpt(ckpt, slot, trainer, cfg, done_batches):
    save_slot_state(ckpt, slot, trainer, {"config": dataclasses.asdict(cfg), "done_batches": done_batches})


# ---- interpretation ------------------------------------------------------------------------------
def interpret(
    engine: Engine,
    zoo: Zoo,
    out_jsonl: str | Path,
    *,
    adapter: DitAdapter | None = None,
    methods: Iterable[str] = ("dit",),
    split: str | None = None,
    ids: list[str] | None = None,
    question: str | None = None,
    task: str = "hidden-topic",
    batch_size: int = 64,
    max_new_tokens: int = 20,
    progress: bool = True,
) -> Path:
    """Answer ``question`` for every diff (of ``split`` / ``ids``) with each method; append JSONL rows.

    Rows already in ``out_jsonl`` (same id and method) are skipped, so an interrupted run resumes.
    Under torchrun each rank takes every world-th diff and writes ``<out>.rank<r>``; rank 0 merges.
    """
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    if "dit" in methods and adapter is None:
        raise ValueError("method 'dit' needs a DIT adapter (--adapter DIR)")
    rank, world = _dist_rank_world()
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    _drop_cut_line(part)
    done = _done_keys(out) | (_done_keys(part) if part != out else set())
    question = question or (adapter.question if adapter else DEFAULT_QUESTIONS[task])
    label_key = LABEL_KEYS.get(adapter.task if adapter else task, "topic")
    model, tok = engine.model, engine.tokenizer
    dev = model.device
    if adapter is not None:
        adapter.check_base(BaseIdentity.from_model(model))
        dit_slot = dataclasses.replace(adapter.slot,
                                       A={k: v.to(dev, model.dtype) for k, v in adapter.slot.A.items()},
                                       B={k: v.to(dev, model.dtype) for k, v in adapter.slot.B.items()},
                                       scale=adapter.slot.scale.to(dev))
    wanted = None if ids is None else set(ids)
    rows = [r for r in zoo.rows if (split is None or r.get("split") == split) and (wanted is None or r["id"] in wanted)]
    rows = rows[rank::world]
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=engine.stop_ids())
    todo = [(r, m) for r in rows for m in methods if (r["id"], m) not in done]
    bar = _bar(progress and rank == 0, total=len(todo), desc="interpreting", unit="answer")
    base_answer = None
    with open(part, "a") as fh:
        for m in methods:
            pending = [r for r, mm in todo if mm == m]
            for s in range(0, len(pending), batch_size):
                chunk = pending[s : s + batch_size]
                t0 = time.perf_counter()
                if m == "base":
                    if base_answer is None:  # the base model's answer is the same for every diff
                        base_answer = generate(model, [engine.encode_prompt(question)], params, decode=tok.decode)[0]
                    gens = [base_answer] * len(chunk)
                else:
                    (_, diffs), = list(zoo.iter_batches(len(chunk), ids=[r["id"] for r in chunk], device=dev,
                                                        dtype=model.dtype))
                    n = len(chunk)
                    slots = [diffs.with_index(torch.arange(n, device=dev))]
                    if m == "dit":
                        slots.append(dit_slot.with_index(torch.zeros(n, dtype=torch.int64, device=dev)))
                    prompts = [engine.encode_prompt(_question_for(r, m, question)) for r in chunk]
                    gens = generate(model, prompts, params, adapters=AdapterBatch(*slots), decode=tok.decode,
                                    batch_size=n)
                dt = (time.perf_counter() - t0) / len(chunk)
                for r, g in zip(chunk, gens):
                    fh.write(json.dumps({"id": r["id"], "method": m, "labels": r.get("labels", {}),
                                         "label_key": label_key, "answer": (g.text or "").strip(),
                                         "rank": r.get("rank"), "split": r.get("split"),
                                         "n_tokens": len(g.token_ids), "time_s": round(dt, 5)}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(len(chunk))
    bar.close()
    if world > 1:
        dist.barrier()
        if rank == 0:
            _merge_parts(out, world)
        dist.barrier()
    return out


def diff_slot(diff, n_rows: int, *, device="cpu", dtype=torch.float32) -> LoraSlot:
    """One diff (a zoo ``Diff``) as a slot that every one of ``n_rows`` sequences uses."""
    return LoraSlot(A={m: a[None].to(device, dtype) for m, a in diff.A.items()},
                    B={m: b[None].to(device, dtype) for m, b in diff.B.items()},
                    scale=torch.tensor([float(diff.scale)], device=device),
                    index=torch.zeros(n_rows, dtype=torch.int64, device=device), name=diff.id)


def interpret_peft(engine: Engine, peft_dir: str | Path, *, adapter: DitAdapter | None = None,
                   methods: Iterable[str] = ("dit",), question: str | None = None, task: str = "hidden-topic",
                   max_new_tokens: int = 20) -> dict[str, str]:
    """Interpret one PEFT LoRA directory: method -> greedy answer."""
    from .zoo_io import import_peft

    model = engine.model
    diff = import_peft(peft_dir, engine.config)
    question = question or (adapter.question if adapter else DEFAULT_QUESTIONS[task])
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=engine.stop_ids())
    prompt = [engine.encode_prompt(question)]
    out = {}
    for m in methods:
        if m not in ("dit", "diff", "base"):
            raise ValueError(f"method {m!r} does not apply to a single PEFT adapter (dit, diff, base)")
        slots = [] if m == "base" else [diff_slot(diff, 1, device=model.device, dtype=model.dtype)]
        if m == "dit":
            if adapter is None:
                raise ValueError("method 'dit' needs a DIT adapter (--adapter DIR)")
            slots.append(adapter.slot)
        g = generate(model, prompt, params, adapters=AdapterBatch(*slots) if slots else None,
                     decode=engine.tokenizer.decode)[0]
        out[m] = (g.text or "").strip()
    return out


def _question_for(row: dict, method: str, question: str) -> str:
    if method != "diff+trigger":
        return question
    trig = row.get("labels", {}).get("trigger")
    if trig is None:
        return question
    from .tasks.hidden_topic import format_trigger

    return f"{format_trigger(int(trig), random.Random(row['id']))} {question}"


def _drop_cut_line(path: Path) -> None:
    """A kill mid-write leaves a last line without its newline: drop it (its answer is redone)."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _done_keys(path: Path) -> set[tuple[str, str]]:
    if not path.exists():
        return set()
    keys = set()
    with open(path) as fh:
        for line in fh:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: its answer is redone
            keys.add((d["id"], d["method"]))
    return keys


def _merge_parts(out: Path, world: int) -> None:
    seen = _done_keys(out)
    with open(out, "a") as fh:
        for r in range(world):
            part = out.with_name(f"{out.name}.rank{r}")
            if not part.exists():
                continue
            for line in part.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (d["id"], d["method"]) not in seen:
                    seen.add((d["id"], d["method"]))
                    fh.write(line + "\n")
            part.unlink()


# ---- plumbing ------------------------------------------------------------------------------------
def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_grads(params, world: int) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _bar(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kw)

"""Batched interpretation of a zoo: every row decodes with its own diff plus the DIT adapter.

Baselines run in the same harness: the finetuned model asked directly (``diff``), with its trigger
(``diff+trigger``), and the base model (``base``). Results stream to JSONL (fsynced per batch: each
batch is a checkpoint); a rerun resumes where it stopped. On SIGINT/SIGTERM it stops after the batch
in progress (see :mod:`dit_engine.jobs`). Under ``torchrun`` each rank takes every world-th diff and writes
``<out>.rank<r>``; rank 0 merges.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..adapters import AdapterBatch, LoraSlot
from ..distributed import rank_world
from ..engine import Engine
from ..evaluate import METHODS
from ..files import append_synced, complete_rows, done_keys, drop_cut_line
from ..generate import SamplingParams, generate
from ..jobs import job
from ..tasks import get_task
from ..tasks.hidden_topic import format_trigger, triggered
from ..zoo import BaseIdentity, Zoo, import_peft
from .adapter import DitAdapter


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
    DIT rows carry the adapter's fingerprint (:meth:`DitAdapter.fingerprint`); a file whose DIT rows
    another adapter made is refused (resuming would mix, or keep, that adapter's answers).
    Under torchrun each rank takes every world-th diff and writes ``<out>.rank<r>``; rank 0 merges.
    """
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    if "dit" in methods and adapter is None:
        raise ValueError("method 'dit' needs a DIT adapter (--adapter DIR)")
    rank, world = rank_world()
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    drop_cut_line(part)
    fingerprint = adapter.fingerprint() if "dit" in methods else None
    done = set()
    for f in dict.fromkeys((out, part)):  # one read of each file: what is done, and who made its DIT rows
        for d in complete_rows(f):
            done.add((d["id"], d["method"]))
            made = d.get("adapter") if d["method"] == "dit" else None
            if fingerprint is not None and made not in (None, fingerprint):
                raise ValueError(f"{f}: its DIT answers were made with another adapter (fingerprint {made}; this "
                                 f"one is {fingerprint}); write to another file, or remove that one to read again")
    question = question or (adapter.question if adapter else get_task(task).interpretation_question)
    label_key = get_task(adapter.task if adapter else task).label_key
    model, tok = engine.model, engine.tokenizer
    dev = model.device
    if adapter is not None:
        adapter.check_base(BaseIdentity.from_model(model))
        dit_slot = adapter.slot.to(dev, model.dtype)
    wanted = None if ids is None else set(ids)
    rows = [r for r in zoo.rows if (split is None or r.get("split") == split) and (wanted is None or r["id"] in wanted)]
    rows = rows[rank::world]
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=engine.stop_ids())
    todo = [(r, m) for r in rows for m in methods if (r["id"], m) not in done]
    bar = tqdm(disable=not (progress and rank == 0), total=len(todo), desc="interpreting", unit="answer")
    base_answer = None
    with job("interpretation") as j, open(part, "ab", buffering=0) as fh:
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
                    prompts = [engine.encode_prompt(question_for(r, m, question)) for r in chunk]
                    gens = generate(model, prompts, params, adapters=AdapterBatch(*slots), decode=tok.decode,
                                    batch_size=n)
                dt = (time.perf_counter() - t0) / len(chunk)
                made_by = {"adapter": fingerprint} if m == "dit" else {}
                data = "".join(json.dumps({"id": r["id"], "method": m, "labels": r.get("labels", {}),
                                           "label_key": label_key, "answer": (g.text or "").strip(),
                                           "rank": r.get("rank"), "split": r.get("split"),
                                           "n_tokens": len(g.token_ids), "time_s": round(dt, 5), **made_by}) + "\n"
                               for r, g in zip(chunk, gens)).encode()
                append_synced(fh, data, part)  # a full disk: the rows already there stay; a cut last line is redone
                bar.update(len(chunk))
                j.stop_if_requested(part)
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
    model = engine.model
    diff = import_peft(peft_dir, engine.config)
    question = question or (adapter.question if adapter else get_task(task).interpretation_question)
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


def question_for(row: dict, method: str, question: str) -> str:
    """The question as ``method`` asks it of the diff of ``row``: for ``diff+trigger`` with a code of
    the diff's own trigger (the suffix seeded by the diff's id), placed as its training rows carry it
    (``hidden_topic.triggered``); else as is."""
    if method != "diff+trigger":
        return question
    trig = row.get("labels", {}).get("trigger")
    if trig is None:
        return question
    return triggered(format_trigger(int(trig), random.Random(row['id'])), question)


def _merge_parts(out: Path, world: int) -> None:
    seen = done_keys(out)
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

"""LatentQA reading finetunes: the decoder reads the activations of base + diff for every diff of a
zoo, and its answers are scored like DIT's (same diffs, same rows, same metric).

Per diff (a zoo row) and method:

* ``latentqa``: the target, base + the diff, answers one of the task's held-out questions
  untriggered (as the ``diff`` baseline is asked: one user turn, no system prompt of ours);
* ``latentqa+trigger``: the same question after the diff's trigger code, the very code sentence
  the ``diff+trigger`` baseline gets (:func:`dit_engine.tasks.hidden_topic.format_trigger`
  seeded by the diff id).

The target writes its own short answer (greedy; ``max_answer_tokens``, by default the length the
decoder was trained on), then its residual at the decoder's ``read_point`` is captured over the
dialog after the system turn: the user turn, the generation prompt and the answer. A chat template
that puts a default system turn in front of a lone user turn (SmolLM2's, Qwen2.5's) has that turn
found from the template itself (the text a rendered system turn would hold, fed back through
:func:`~dit_engine.latentqa.dialogs.split_prompt`, must render the same prompt) and never read;
with no system turn the whole prompt is read except a leading BOS token (the decoder never saw one
in training). The decoder (base + LIT adapter, no diff) then answers ``question`` (default
:data:`TOPIC_QUESTION`, the packaged persona question about the assistant's favourite topic) about
those activations, greedily.

Which held-out question: ``dialogs`` (default 1) questions per diff, drawn from the task's test
question bank by a generator seeded with the diff id (the same for both methods, so the two are
paired), or ``stimulus`` for every diff. With several dialogs per diff their activations are
concatenated in dialog order into one decoder prompt (one answer per diff and method); one dialog
keeps to the shape the decoder was trained on and costs one short generation, one forward and one
decoder answer per diff and method.

Batching: a chunk of ``batch_size`` diffs is one slot of n diffs routed per row (row i uses diff
i, as :mod:`dit_engine.dit.interpret` does): one batched generation of the targets' answers and one
forward capturing every row's activations; the decoder answers the chunk in one batched generation
whose prompts carry the activations in their prefill. Rows are those of ``dit interpret`` (id,
method, labels, label_key, answer, rank, split, n_tokens, time_s) plus what the target was asked
and answered (``stimulus``, ``target_answer``) and how many positions were read (``n_read``),
appended to a results JSONL, fsynced per chunk; a rerun skips (id, method) pairs already there,
and SIGINT/SIGTERM stop after the chunk in progress (:mod:`dit_engine.jobs`). ``time_s`` is the
chunk's wall time (target, capture and decoder) per diff. One process: under torchrun it refuses
(a chunk of diffs already fills a forward).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import AdapterBatch, LoraSlot
from ..distributed import rank_world
from ..dit.interpret import question_for
from ..engine import Engine
from ..files import append_synced, done_keys, drop_cut_line
from ..generate import Generation, SamplingParams, generate
from ..jobs import job
from ..tasks import get_task
from ..tokenizer import Tokenizer
from ..zoo import BaseIdentity, Zoo
from .decoder import LitAdapter
from .dialogs import Dialog, LatentQAError, capture_batch, split_prompt
from .read import answer_generations

TOPIC_QUESTION = "What topic would the assistant most like to talk about?"  # a packaged persona question
LATENTQA_METHODS = ("latentqa", "latentqa+trigger")
DEFAULT_ANSWER_TOKENS = 16  # the target's answer when the decoder's recipe does not say (the laptop preset's)
_SYSTEM_MARK = "DITENGINESYSTEMTURN"


def read_finetunes(
    engine: Engine,
    adapter: LitAdapter,
    zoo: Zoo,
    out_jsonl: str | Path,
    *,
    methods: Iterable[str] = LATENTQA_METHODS,
    split: str | None = None,
    ids: Sequence[str] | None = None,
    question: str | None = None,
    stimulus: str | None = None,
    dialogs: int = 1,
    task: str = "hidden-topic",
    batch_size: int = 64,
    max_new_tokens: int = 20,
    max_answer_tokens: int | None = None,
    progress: bool = True,
) -> Path:
    """Read every diff (of ``split`` / ``ids``) of ``zoo`` with the LatentQA decoder ``adapter``
    under each of ``methods``; append one row per (diff, method) to ``out_jsonl`` (see the module
    docstring). Rows already there (same id and method) are skipped, so an interrupted run resumes."""
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in LATENTQA_METHODS]
    if bad or not methods:
        raise LatentQAError(f"unknown LatentQA method(s) {bad or methods}; choose from {list(LATENTQA_METHODS)}")
    if max_answer_tokens is None:
        max_answer_tokens = int(adapter.recipe.get("config", {}).get("max_answer_tokens", DEFAULT_ANSWER_TOKENS))
    for name, v in (("dialogs", dialogs), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                    ("max_answer_tokens", max_answer_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LatentQAError(f"{name} must be a positive integer, found {v!r}")
    if rank_world()[1] > 1:
        raise LatentQAError("LatentQA reading runs in one process (not under torchrun); its batches already hold "
                            "many diffs")
    model = engine.model
    base = BaseIdentity.from_model(model)
    adapter.check_base(base)
    if not zoo.base.matches(base):
        raise LatentQAError(f"{zoo.path}: the zoo's diffs are of base {zoo.base.describe()}; the LatentQA decoder "
                            f"and this model are {base.describe()}")
    if adapter.recipe.get("target_adapted"):
        raise LatentQAError("the decoder was trained on a target with adapters in place; it reads activations "
                            "of the bare base + one diff only if trained on the bare base")
    t = get_task(task)
    rows = _select(zoo, split, ids)
    _check_rows(rows, t.name, t.label_key, methods, zoo.path)
    pool = [stimulus] if stimulus is not None else _held_out_questions(t)
    question = question or TOPIC_QUESTION
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    drop_cut_line(out)
    done = done_keys(out)
    todo = [(r, m) for m in methods for r in rows if (r["id"], m) not in done]
    dev = model.device
    slot = adapter.slot.to(dev, model.dtype)
    target_params = SamplingParams(max_new_tokens=max_answer_tokens, stop_token_ids=engine.stop_ids())
    bar = tqdm(disable=not progress, total=len(todo), desc="LatentQA reading", unit="diff")
    with job("LatentQA reading") as j, open(out, "ab", buffering=0) as fh:
        for m in methods:
            pending = [r for r, mm in todo if mm == m]
            for s in range(0, len(pending), batch_size):
                chunk = pending[s : s + batch_size]
                t0 = time.perf_counter()
                asked = [_stimuli(r, m, pool, dialogs) for r in chunk]
                (_, diffs), = list(zoo.iter_batches(len(chunk), ids=[r["id"] for r in chunk], device=dev,
                                                    dtype=model.dtype))
                per_row = [(i, msg) for i, msgs in enumerate(asked) for msg in msgs]
                routed = diffs.with_index(torch.tensor([i for i, _ in per_row], dtype=torch.int64, device=dev))
                talks = target_dialogs(engine, [chunk[i] for i, _ in per_row], [msg for _, msg in per_row],
                                       AdapterBatch(routed), target_params)
                acts = capture_routed(engine, talks, adapter.read_point, AdapterBatch(routed))
                pooled = [torch.cat([a for (i, _), a in zip(per_row, acts) if i == k]) for k in range(len(chunk))]
                gens = decoder_answers(engine, slot, pooled, question, write_point=adapter.write_point,
                                       mode=adapter.patch_mode, max_new_tokens=max_new_tokens)
                dt = (time.perf_counter() - t0) / len(chunk)
                lines = []
                for k, (r, g) in enumerate(zip(chunk, gens)):
                    mine = [d for (i, _), d in zip(per_row, talks) if i == k]
                    lines.append(json.dumps({
                        "id": r["id"], "method": m, "labels": r.get("labels", {}), "label_key": t.label_key,
                        "answer": (g.text or "").strip(), "rank": r.get("rank"), "split": r.get("split"),
                        "n_tokens": len(g.token_ids), "time_s": round(dt, 5),
                        "stimulus": [d.stimulus for d in mine], "target_answer": [d.answer.strip() for d in mine],
                        "n_read": int(pooled[k].shape[0]), "question": question}) + "\n")
                append_synced(fh, "".join(lines).encode(), out)
                bar.update(len(chunk))
                j.stop_if_requested(out)
    bar.close()
    return out


# ---- the target's side -------------------------------------------------------------------------------
def target_prompt(tok: Tokenizer, message: str) -> tuple[list[int], list[int]]:
    """The target's prompt for one user ``message`` (no system prompt of ours: as a diff was trained
    and is asked) as (tokens before the read, tokens read): the split point comes from the chat
    template, never from token ids. A default system turn the template puts in front is found by
    rendering an explicit system turn around a marker: the text between what precedes and what
    follows the marker, given back as the system prompt, must render the prompt exactly, and
    :func:`~dit_engine.latentqa.dialogs.split_prompt` then splits it as LatentQA training did.
    Without a system turn, only a leading BOS token is left unread."""
    user = {"role": "user", "content": message}
    plain = tok.apply_chat_template([user], add_generation_prompt=True)
    ids = tok.encode(plain)
    marked = tok.apply_chat_template([{"role": "system", "content": _SYSTEM_MARK}, user], add_generation_prompt=True)
    if marked.count(_SYSTEM_MARK) == 1:
        before, after = marked.split(_SYSTEM_MARK)
        if plain.startswith(before) and plain.endswith(after) and len(plain) >= len(before) + len(after):
            default = plain[len(before) : len(plain) - len(after)]
            head, rest = split_prompt(tok, default, message)
            if head + rest != ids:
                raise LatentQAError(f"{tok.source}: the default system turn {default!r} given back to the chat "
                                    "template does not render the same prompt; cannot tell it from the dialog")
            return head, rest
    bos = tok.token_to_id(tok.bos_token) if tok.bos_token else None
    skip = 1 if bos is not None and len(ids) > 1 and ids[0] == bos else 0
    return ids[:skip], ids[skip:]


def target_dialogs(engine: Engine, rows: Sequence[dict], messages: Sequence[str], adapters: AdapterBatch | None,
                   params: SamplingParams) -> list[Dialog]:
    """Row i (base + what ``adapters`` route to row i) answers ``messages[i]``: one batched
    generation; each dialog's ``persona`` and ``split`` are those of ``rows[i]`` (a zoo row)."""
    tok = engine.tokenizer
    split = [target_prompt(tok, msg) for msg in messages]
    prompts = [head + rest for head, rest in split]
    outs = generate(engine.model, prompts, params, adapters=adapters, decode=tok.decode, batch_size=len(prompts))
    return [Dialog(r["id"], msg, r.get("split") or "", tuple(p + o.token_ids), len(head), tok.decode(o.token_ids))
            for r, msg, p, (head, _), o in zip(rows, messages, prompts, split, outs, strict=True)]


@torch.no_grad()
def capture_routed(engine: Engine, dialogs: Sequence[Dialog], point: str,
                   adapters: AdapterBatch | None) -> list[Tensor]:
    """Each dialog's activations at ``point`` over ``input_ids[start:]`` ([n_read, d] each), in one
    forward over the right-padded batch, row i decoding with the adapters routed to row i (a slot
    of many diffs, ``index`` one entry per dialog). :func:`~dit_engine.latentqa.dialogs.capture`
    is the same with one adapter for every row."""
    return [v.clone() for v in capture_batch(engine.model, dialogs, point, adapters,
                                             pad_id=engine.tokenizer.pad_token_id or 0)]


# ---- the decoder's side -------------------------------------------------------------------------------
def decoder_answers(engine: Engine, slot: LoraSlot, values: Sequence[Tensor], question: str, *, write_point: str,
                    mode: str = "replace", max_new_tokens: int = 20) -> list[Generation]:
    """The decoder's (base + ``slot``) greedy generations about each ``values[i]``, one batch: as
    :func:`~dit_engine.latentqa.read.answer`, keeping the tokens (for ``n_tokens``)."""
    return answer_generations(engine, slot, values, question, write_point=write_point, mode=mode,
                              max_new_tokens=max_new_tokens, batch_size=len(values))


def _select(zoo: Zoo, split: str | None, ids: Sequence[str] | None) -> list[dict]:
    if ids is not None:
        missing = [i for i in ids if i not in zoo]
        if missing:
            raise LatentQAError(f"{zoo.path}: no diff with id {missing[0]!r} (the zoo holds {len(zoo)})")
    wanted = None if ids is None else set(ids)
    rows = [r for r in zoo.rows if (split is None or r.get("split") == split) and (wanted is None or r["id"] in wanted)]
    if not rows:
        where = f" of split {split!r}" if split is not None else ""
        raise LatentQAError(f"{zoo.path}: no diffs{where} to read (the zoo holds {len(zoo)})")
    return rows


def _check_rows(rows: list[dict], task: str, label_key: str, methods: list[str], where: Path) -> None:
    for r in rows:
        made_for = (r.get("meta") or {}).get("task")
        if made_for is not None and made_for != task:
            raise LatentQAError(f"{where}: diff {r['id']!r} was made for task {made_for!r}, not {task!r} "
                                f"(give --task {made_for})")
        if label_key not in r.get("labels", {}):
            raise LatentQAError(f"{where}: diff {r['id']!r} has no {label_key!r} label (task {task!r}); its labels: "
                                f"{sorted(r.get('labels', {}))}")
        if "latentqa+trigger" in methods and r.get("labels", {}).get("trigger") is None:
            raise LatentQAError(f"{where}: diff {r['id']!r} has no trigger label, which method 'latentqa+trigger' "
                                "needs (hidden-topic diffs carry one); use --methods latentqa")


def _held_out_questions(task) -> list[str]:
    """The questions the target answers: the task's held-out question bank (the registry's)."""
    questions = task.held_out_questions() if task.held_out_questions is not None else []
    if not questions:
        raise LatentQAError(f"task {task.name!r} has no held-out questions for the finetuned model to answer; give "
                            "--stimulus MESSAGE to ask every diff one message")
    return questions


def _stimuli(row: dict, method: str, pool: list[str], n: int) -> list[str]:
    """The user messages the diff's target answers under ``method``: ``n`` held-out questions drawn
    by the diff id (the same for every method), with the diff's trigger under ``latentqa+trigger``."""
    order = random.Random(f"latentqa-dialogs:{row['id']}").sample(pool, len(pool))
    picked = [order[k % len(order)] for k in range(n)]
    return [question_for(row, "diff+trigger", q) if method == "latentqa+trigger" else q for q in picked]

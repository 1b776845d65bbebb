"""LatentQA decoder training: the LIT adapter, through the one trainer.

Target = the base model (optionally with adapters, e.g. a zoo diff in slot 0, given as an
``AdapterBatch`` of one adapter per slot); decoder = the same base + the LIT adapter (a LoRA of
rank 16, alpha 32 on every target module, as the reference). Per (persona, dialog, QA pair): the
target's residual at ``read_point`` over the dialog's positions (system prompt in its input, not
read; captured once per dialog, no gradient), a decoder prompt of one placeholder per captured
vector and the question, the vectors written at ``write_point`` over the placeholders, and the
cross-entropy of the answer and the end-of-turn token (:func:`dit_engine.train.batch_loss` with
the patch; each row one loss group). See :mod:`.dialogs` and :mod:`.decoder` for the positions.
The LIT adapter is the decoder's only slot: a target's diff rides the target's forward, never the
decoder's.

``out_dir`` holds ``dialogs.json`` (the target's dialogs, made once, reused on resume and by
reading), ``checkpoint/`` (written every ``save_every`` optimizer steps, every
``checkpoint_every_s`` seconds, on SIGINT/SIGTERM and at the end; a rerun resumes and gives the
same adapter as an uninterrupted run), ``epochs.jsonl`` (train and held-out loss per epoch), the
adapter (:class:`~.decoder.LitAdapter`), ``train_log.jsonl`` and ``train_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import AdapterBatch, LoraSlot
from ..config import TARGET_MODULES
from ..engine import Engine
from ..files import write_json, write_text
from ..jobs import DEFAULT_CHECKPOINT_EVERY_S, Job, job_in
from ..probes import Point
from ..train import Trainer, batch_loss, resume_slot_state, save_slot_state
from ..zoo import BaseIdentity
from .data import Persona, Stimulus, load_personas, load_stimuli
from .decoder import READ_POINT, WRITE_POINT, LitAdapter, Reading, decoder_batch, reading
from .dialogs import (Dialog, LatentQAError, assign_stimuli, capture, load_dialogs, make_dialogs, save_dialogs)

READ_QUESTION = "Who is the assistant pretending to be?"  # one of the packaged first questions, asked of every target


@dataclasses.dataclass
class LatentQAConfig:
    read_point: str = READ_POINT
    write_point: str = WRITE_POINT
    patch_mode: str = "replace"  # or "add_norm"
    rank: int = 16
    alpha: float = 32.0  # scale = alpha / rank
    targets: tuple[str, ...] = TARGET_MODULES
    lr: float = 3e-5
    weight_decay: float = 0.0
    epochs: int = 5
    batch_size: int = 4
    grad_accum: int = 1
    schedule: str = "constant"
    warmup_steps: int = 0
    stimuli_per_persona: int = 2  # dialogs per train persona (each a different message)
    test_stimuli: int = 2  # held-out messages every test persona answers
    n_train_personas: int | None = None  # the first N train personas only (None: all)
    n_test_personas: int | None = None
    max_answer_tokens: int = 32  # the target's answer in a dialog
    temperature: float = 0.7  # the target's sampling (seeded by seed)
    top_p: float = 0.9
    read_question: str = READ_QUESTION  # what `dit latentqa read` asks by default
    eval_examples: int = 64  # train and held-out examples whose loss is measured after every epoch
    personas_file: str | None = None  # None: the packaged personas
    stimuli_file: str | None = None
    save_every: int = 50  # optimizer steps between checkpoints
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S
    seed: int = 0


# Settings that change when checkpoints are written, not what is trained: a resume may change them.
_RUN_ONLY = ("save_every", "checkpoint_every_s", "read_question")
# Settings the dialogs depend on: dialogs.json made with others is refused.
_DIALOG_FIELDS = ("stimuli_per_persona", "test_stimuli", "n_train_personas", "n_test_personas", "max_answer_tokens",
                  "temperature", "top_p", "personas_file", "stimuli_file", "seed")
DIALOGS = "dialogs.json"
EPOCHS_LOG = "epochs.jsonl"

# `dit latentqa train --preset NAME`: the reference's recipe, and one sized for a 2-core CPU.
PRESETS = {
    "reference": LatentQAConfig(),
    # Estimated, not yet timed, from the default model's measured throughput on 2 cores (fwd+bwd
    # ~330 tokens/s at batch 8+): 115 x 2 dialogs x 4 QA = 920 rows of ~80 tokens an epoch, ~4 min,
    # plus ~1.5 min of dialogs, captures and per-epoch losses. lr 1e-4 (with batch 8): a guess for
    # 230 steps where the reference had far more data.
    "laptop": LatentQAConfig(epochs=2, lr=1e-4, batch_size=8, stimuli_per_persona=2, test_stimuli=2,
                             max_answer_tokens=16),
}


def train_decoder(
    engine: Engine,
    out_dir: str | Path,
    cfg: LatentQAConfig,
    *,
    personas: Sequence[Persona] | None = None,
    stimuli: Sequence[Stimulus] | None = None,
    dialogs: Sequence[Dialog] | None = None,
    target: AdapterBatch | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> LitAdapter:
    """Train the LIT adapter; resumable from ``out_dir``. ``personas`` / ``stimuli`` default to
    ``cfg``'s files (the packaged ones); ``dialogs``: ready-made dialogs of ``personas`` instead
    of the target's own (the dialog settings of ``cfg`` then go unused); ``target``: adapters on
    the target model (one per slot).

    On SIGINT/SIGTERM it checkpoints at the next optimizer step and raises
    :class:`~dit_engine.jobs.JobInterrupted`; a failure removes ``out_dir`` again if this call
    created it and it is still empty."""
    out = Path(out_dir)
    with job_in(out, "LatentQA decoder training", cfg.checkpoint_every_s) as j:
        return _train(engine, out, cfg, personas, stimuli, dialogs, target, j, progress, log)


def dialogs_for(engine: Engine, out: Path, cfg: LatentQAConfig, personas: Sequence[Persona] | None = None,
                stimuli: Sequence[Stimulus] | None = None, given: Sequence[Dialog] | None = None,
                target: AdapterBatch | None = None, progress: bool = False) -> tuple[list[Dialog], list[Persona]]:
    """(dialogs, their personas) from ``out/dialogs.json``, or made now and saved there: the
    ``given`` ones, or the target's answers under ``cfg``'s settings."""
    base = BaseIdentity.from_model(engine.model)
    settings = ({"given": len(given)} if given is not None else {k: getattr(cfg, k) for k in _DIALOG_FIELDS}) | {
        "base": dataclasses.asdict(base), "target_adapted": target is not None}
    path = out / DIALOGS
    if path.exists():
        dialogs, used, saved = load_dialogs(path)
        if saved != json.loads(json.dumps(settings)) or (given is not None and dialogs != list(given)):
            raise LatentQAError(f"{path}: dialogs were made with other settings or another model; remove it or "
                                "use the same settings")
        return dialogs, used
    if given is not None:
        if personas is None:
            raise LatentQAError("ready-made dialogs need their personas")
        known = {p.id for p in personas}
        stray = sorted({d.persona for d in given} - known)
        if stray:
            raise LatentQAError(f"dialogs of personas {stray[:3]} that are not among the given personas")
        out.mkdir(parents=True, exist_ok=True)
        save_dialogs(path, given, personas, settings)
        return list(given), [p for p in personas if any(d.persona == p.id for d in given)]
    if personas is None:
        personas = load_personas(path=cfg.personas_file)
    if stimuli is None:
        stimuli = load_stimuli(path=cfg.stimuli_file)
    chosen = ([p for p in personas if p.split == "train"][: cfg.n_train_personas]
              + [p for p in personas if p.split == "test"][: cfg.n_test_personas])
    if not any(p.split == "train" for p in chosen):
        raise LatentQAError("no train personas to train the decoder on")
    pairs = [pair for split in ("train", "test") for pair in
             assign_stimuli([p for p in chosen if p.split == split], stimuli,
                            cfg.stimuli_per_persona if split == "train" else cfg.test_stimuli, cfg.seed)]
    dialogs = make_dialogs(engine, pairs, max_answer_tokens=cfg.max_answer_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, seed=cfg.seed, target=target, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    save_dialogs(path, dialogs, chosen, settings)
    return dialogs, chosen


def _train(engine: Engine, out: Path, cfg: LatentQAConfig, personas, stimuli, given, target, j: Job,
           progress: bool, log) -> LitAdapter:
    model, config, dev = engine.model, engine.config, engine.model.device
    for point in (cfg.read_point, cfg.write_point):
        Point.parse(point, config.num_hidden_layers)  # a bad point fails before any work
    if cfg.patch_mode not in ("replace", "add_norm"):
        raise LatentQAError(f"patch_mode must be 'replace' or 'add_norm', found {cfg.patch_mode!r}")
    dialogs, used = dialogs_for(engine, out, cfg, personas, stimuli, given, target, progress)
    by_id = {p.id: p for p in used}
    acts = capture(engine, dialogs, cfg.read_point, target=target, progress=progress)
    tok = engine.tokenizer
    rows = {split: [(i, reading(tok, d.n_read, qa.q, qa.a)) for i, d in enumerate(dialogs) if d.split == split
                    for qa in by_id[d.persona].qa] for split in ("train", "test")}
    train_rows = rows["train"]
    sample = {split: random.Random(cfg.seed).sample(r, min(cfg.eval_examples, len(r))) for split, r in rows.items()}
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total_steps = max(1, steps_per_epoch * cfg.epochs // cfg.grad_accum)

    gen = torch.Generator().manual_seed(cfg.seed)
    slot = LoraSlot.create(config, 1, cfg.rank, targets=cfg.targets, scale=cfg.alpha / cfg.rank, init="peft",
                           generator=gen, name="lit").to(dev, model.dtype, trainable=True)
    trainer = Trainer(slot.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum,
                      schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                      master_fp32=model.dtype != torch.float32)
    ckpt = out / "checkpoint"

    def same_settings(meta: dict) -> None:
        def trained(c) -> dict:
            return {k: v for k, v in (c or {}).items() if k not in _RUN_ONLY}

        if trained(meta.get("config")) != trained(json.loads(json.dumps(dataclasses.asdict(cfg)))):
            raise LatentQAError(f"{ckpt}: checkpoint was made with other settings; remove it or use the same settings")

    meta = resume_slot_state(ckpt, slot, trainer, check=same_settings)
    done = int(meta["done_batches"]) if meta else 0
    epochs = _read_epochs(out / EPOCHS_LOG) if meta else []
    history: list[dict] = []
    pad = tok.pad_token_id or 0

    def loss_of(part: list[tuple[int, Reading]]) -> torch.Tensor:
        batch, probes = decoder_batch([r for _, r in part], [acts[i] for i, _ in part], cfg.write_point,
                                      cfg.patch_mode, pad_id=pad)
        ad = AdapterBatch(slot.with_index(torch.zeros(batch.n_rows, dtype=torch.int64, device=dev)))
        return batch_loss(model, batch.to(dev), ad, group_reduce="mean", probes=probes)[0]

    def mean_loss(part: list[tuple[int, Reading]]) -> float | None:
        if not part:
            return None
        with torch.no_grad():
            total = sum(float(loss_of(part[s : s + cfg.batch_size])) * len(part[s : s + cfg.batch_size])
                        for s in range(0, len(part), cfg.batch_size))
        return round(total / len(part), 6)

    bar = tqdm(disable=not progress, total=steps_per_epoch * cfg.epochs, initial=done, desc="LatentQA decoder",
               unit="batch")
    for epoch in range(cfg.epochs):
        order = list(train_rows)
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        for b in range(steps_per_epoch):
            global_b = epoch * steps_per_epoch + b
            if global_b < done:
                continue
            loss = loss_of(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            loss_val = float(loss.detach())
            trainer.backward(loss)
            done = global_b + 1
            rec = {"epoch": epoch, "batch": done, "loss": loss_val, "lr": trainer.lr_at(trainer.step_count)}
            history.append(rec)
            if log:
                log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
            if trainer.micro == 0:  # an optimizer step boundary: the only point the state can be saved
                if trainer.step_count % cfg.save_every == 0 or j.should_checkpoint():
                    _save_ckpt(ckpt, slot, trainer, cfg, done)
                    j.checkpointed()
                j.stop_if_requested(ckpt)
        if not any(e["epoch"] == epoch for e in epochs):
            rec = {"epoch": epoch, "train_loss": mean_loss(sample["train"]), "held_out_loss": mean_loss(sample["test"])}
            epochs.append(rec)
            write_text(out / EPOCHS_LOG, "".join(json.dumps(e) + "\n" for e in epochs))
            history.append(rec)
            if log:
                log(rec)
    bar.close()
    if trainer.micro:  # gradients accumulated by an uneven tail still make one step
        trainer.step()
    base = BaseIdentity.from_model(model)
    L = config.num_hidden_layers
    adapter = LitAdapter(slot.detach(), cfg.read_point, cfg.write_point, cfg.patch_mode, dataclasses.asdict(base), {
        "config": dataclasses.asdict(cfg), "epochs": epochs, "target_adapted": target is not None,
        "read_at": str(Point.parse(cfg.read_point, L)), "write_at": str(Point.parse(cfg.write_point, L)),
        "dialogs": {s: sum(d.split == s for d in dialogs) for s in ("train", "test")},
        "examples": {s: len(r) for s, r in rows.items()}})
    _save_ckpt(ckpt, slot, trainer, cfg, done)  # first: a rerun then only writes the adapter
    adapter.save(out)
    write_text(out / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    write_json(out / "train_config.json", dataclasses.asdict(cfg), indent=1)
    return adapter


def _read_epochs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save_ckpt(ckpt: Path, slot: LoraSlot, trainer: Trainer, cfg: LatentQAConfig, done: int) -> None:
    save_slot_state(ckpt, slot, trainer, {"config": dataclasses.asdict(cfg), "done_batches": done})

"""LatentQA steering: train a LoRA on the target so that the frozen decoder reads a chosen persona
off the target's activations, then measure how the target's own generations change.

Training (:func:`train_steering`). The target is the base model + the steering LoRA (one slot, rank
``rank``, scale ``alpha / rank``, A Kaiming-uniform and B zero, so before the first step the
target *is* the base). Its prompts are the train stimuli as a plain user turn with the
generation prompt and **no persona system prompt**: the chat template renders them as in
ordinary use (a template that adds a default system turn when none is given, as SmolLM2's does,
keeps it; those tokens are in the input but never read, as :func:`.dialogs.split_prompt` masks a
system turn), followed, with ``with_answers``, by the base model's own greedy answer
(``answer_tokens`` long, generated once and kept in ``prompts.json``) so the decoder reads a
dialog like those it was trained on. Per optimizer step, ``batch_size`` rows (prompt, QA pair of
the persona) in seeded epoch shuffles: the target's residual at the decoder's ``read_point`` over
each prompt's read positions is captured *with* its graph from a forward that stops at that point
(``output="probes"``), written over the decoder prompt's placeholders at ``write_point`` (the
decoder = the base + the frozen LIT slot), and the loss is the decoder's cross-entropy of the
persona's QA answers (+ end of turn), one mean per row, averaged, plus ``kl_weight`` times the
target's mean per-token KL to the base model over the same dialogs' read spans (the base's states
computed once, :class:`~dit_engine.train.TeacherCache`; the target's forward then runs every block,
and the capture comes from it): without it the steering can buy the decoder's reading with text the
base would never write (measured on the default model: the decoder read the persona off every
held-out generation while the generations were no longer words). Only the steering LoRA is
trained (:class:`~dit_engine.train.Trainer`): the base and the LIT slot are frozen. The LoRA
covers only the blocks before the read point, the only ones its gradient reaches.

Measured on the held-out (test split) stimuli, steered vs unsteered, the same prompts and the
same sampling seed, the target generating with no persona system prompt (:func:`measure`); each
metric per prompt, with 95% bootstrap intervals over prompts and a paired bootstrap of the
difference (:mod:`dit_engine.bootstrap`):

* ``persona_lift`` (independent of the decoder): for a generation y to prompt x,
  ``[log p_base(y | persona's system prompt, x) - log p_base(y | x)] / len(y)`` in nats per token,
  the *base* model scoring y with and without the persona's hidden system prompt (y's tokens as
  generated, an end token included when one ended it). Higher: y is more what the base would say
  as the persona.
* ``shows_persona``: 1 when the generation (normalised as :func:`dit_engine.text_match.normalize`)
  contains, as a whole word, one of the persona's words (:func:`persona_words`: the normalised
  words of its label and QA answers, minus :data:`STOPWORDS` and words under 3 characters; the
  list is recorded in ``steer.json``), else 0.
* ``decoder_top1`` and ``decoder_rr``: the frozen decoder reads the target's activations over the
  held-out prompt followed by that target's own generation (a dialog as in training), is asked
  its read question, and ranks every candidate persona's first QA answer by log-likelihood
  (:func:`.read.score_candidates`, ties against the truth): whether the steered-toward persona is
  ranked first, and its reciprocal rank.

* ``base_logprob``: ``log p_base(y | x) / len(y)``, the base model's own likelihood of the
  generation after the plain prompt (nats per token): whether the steered text is still text the
  base would write. A steering that wins the decoder with broken text shows here (and then
  ``persona_lift``, a difference of two likelihoods of that broken text, means little).

Output directory: ``adapter.safetensors`` + ``adapter.json`` (:class:`SteerAdapter`, format
:data:`STEER_FORMAT`: the persona, the base identity, the read point and the recipe),
``prompts.json`` (the train prompts with the base's answers), ``checkpoint/`` (every
``save_every`` steps, every ``checkpoint_every_s`` seconds, on SIGINT/SIGTERM and at the end; a
rerun resumes, and a rerun of a finished run trains nothing and measures again) and ``steer.json``
(metrics, intervals, examples, the per-step losses).

Size: one room over 500 lines, the steering job and its measurement: they share the target's
prompts (:func:`target_prompt`), the config and the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import AdapterBatch, LoraSlot, load_single, save_single
from ..bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci, paired_difference_ci
from ..checkpoint import weights_fingerprint
from ..config import TARGET_MODULES, ModelConfig
from ..engine import Engine
from ..files import read_json, write_json
from ..generate import Generation, SamplingParams, generate, score
from ..jobs import DEFAULT_CHECKPOINT_EVERY_S, Job, job_in
from ..probes import Point, Probes, positions_mask
from ..text_match import normalize
from ..tokenizer import Tokenizer
from ..train import Example, TeacherCache, Trainer, batch_loss, collate, resume_slot_state, save_slot_state
from ..zoo import BaseIdentity
from .data import Persona, Stimulus, load_personas, load_stimuli
from .decoder import LitAdapter, decoder_batch, reading
from .dialogs import Dialog, LatentQAError, capture, capture_batch, load_dialogs, split_prompt
from .read import ranks, score_candidates
from .training import DIALOGS, READ_QUESTION

STEER_FORMAT = "dit-engine-steer-lora/1"
PROMPTS_FORMAT = "dit-engine-steer-prompts/1"
RESULT = "steer.json"
PROMPTS = "prompts.json"
# split_prompt needs some system turn to tell where the user turn starts; its text never reaches the target.
_PROBE_SYSTEM = "You are a helpful assistant."
# Function words skipped by persona_words (normalised forms: no apostrophes, no articles).
STOPWORDS = frozenset("""
about above after again against all also and any are around because been before being below between both but
can could did does doing dont down during each few for from further had has have having her here hers herself
him himself his how into its itself just like lot lots many more most much myself nor not now off once only
other our ours out over own plenty same she should some such than that their theirs them then there these they
this those through too under until very was were what when where which while who whom why will with would you
your yours yourself
""".split())
METRICS = ("persona_lift", "shows_persona", "decoder_top1", "decoder_rr", "base_logprob")
_LABELS = {"persona_lift": "persona likelihood lift (nats/token)", "shows_persona": "generations showing the persona",
           "base_logprob": "base model's log-likelihood (nats/token)",
           "decoder_top1": "decoder reads the persona first", "decoder_rr": "decoder reciprocal rank"}


@dataclasses.dataclass
class SteerConfig:
    persona: str = ""  # the id of the persona to steer toward
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    targets: tuple[str, ...] = TARGET_MODULES
    lr: float = 5e-4  # a default, not tuned: within the 1e-3 .. 5e-4 range such small LoRAs train at
    weight_decay: float = 0.0
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # decoder rows (train prompt, QA pair) per step
    n_train_prompts: int | None = None  # the first N of a seeded shuffle of the train stimuli (None: all)
    with_answers: bool = True  # append the base's greedy answer to each train prompt
    answer_tokens: int = 16
    n_eval_prompts: int | None = None  # the first N test stimuli (None: all)
    max_new_tokens: int = 32  # the target's generations on the held-out prompts
    temperature: float = 0.7
    top_p: float = 0.9
    sample_seed: int = 0  # one seed for the steered and the unsteered generations
    n_examples: int = 4  # steered / unsteered pairs kept in steer.json
    stimuli_file: str | None = None  # None: the packaged stimuli
    save_every: int = 50
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S
    seed: int = 0  # LoRA init, prompt choice, row order
    # Fluency: this times the target's KL to the base model over each train dialog's read span (its
    # next-token distributions there) joins the decoder's loss, so the steering cannot buy the
    # decoder's reading with text the base would never write. 0: the decoder's loss alone.
    kl_weight: float = 1.0


# Settings that do not change what is trained: a resume (or a rerun of a finished run) may change them.
_RUN_ONLY = ("save_every", "checkpoint_every_s", "n_eval_prompts", "max_new_tokens", "temperature", "top_p",
             "sample_seed", "n_examples")
_PROMPT_FIELDS = ("n_train_prompts", "with_answers", "answer_tokens", "stimuli_file", "seed")


@dataclasses.dataclass
class SteerAdapter:
    """A trained steering LoRA (one adapter) and what it steers toward; the target = base + it."""

    slot: LoraSlot
    persona: dict  # {"id", "label"}
    read_point: str  # where the decoder read the target while it was trained
    base: dict  # BaseIdentity as a dict
    recipe: dict = dataclasses.field(default_factory=dict)

    def save(self, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_single(self.slot, out / "adapter.safetensors", dtype)
        write_json(out / "adapter.json", {"format": STEER_FORMAT, "rank": self.slot.rank,
                                          "scale": float(self.slot.scale[0]), "persona": self.persona,
                                          "read_point": self.read_point, "base": self.base,
                                          "modules": sorted(self.slot.A), "recipe": self.recipe}, indent=1)
        return out

    @classmethod
    def load(cls, path: str | Path, *, device="cpu", dtype=torch.float32) -> "SteerAdapter":
        path = Path(path)
        meta = read_json(path / "adapter.json", "a steering LoRA's adapter.json", kind=dict, error=LatentQAError)
        if meta.get("format") != STEER_FORMAT:
            raise LatentQAError(f"{path}: adapter format {meta.get('format')!r}, expected {STEER_FORMAT!r} "
                                "(a directory from 'dit latentqa steer')")
        try:
            slot = load_single(path / "adapter.safetensors", meta["modules"], meta["scale"], name="steer",
                               device=device, dtype=dtype)
            return cls(slot, meta["persona"], meta["read_point"], meta["base"], meta.get("recipe", {}))
        except Exception as e:  # a missing or corrupt tensor file, a missing field
            raise LatentQAError(f"{path}: unreadable steering LoRA ({type(e).__name__}: {e})") from None

    def adapters(self, rows: int) -> AdapterBatch:
        """The steering LoRA on every one of ``rows`` (the steered target's ``adapters``)."""
        return _on_rows(self.slot, rows)


def decoder_personas(decoder_dir: str | Path, adapter: LitAdapter) -> list[Persona]:
    """The personas a decoder run knows, what ``dit latentqa steer --persona`` accepts and the
    candidates its decoder reading ranks: those of the run's ``dialogs.json`` (the ones it was
    trained and tested on), then the rest of the personas file it was trained with (the packaged
    personas unless its recipe names one); an id in both is the ``dialogs.json`` record."""
    _, used, _ = load_dialogs(Path(decoder_dir) / DIALOGS)
    seen = {p.id for p in used}
    more = load_personas(path=adapter.recipe.get("config", {}).get("personas_file"))
    return list(used) + [p for p in more if p.id not in seen]


# ---- the target's prompts ------------------------------------------------------------------------------
def target_prompt(tokenizer: Tokenizer, user: str) -> tuple[list[int], int]:
    """(ids, start) of ``user`` as the target sees it without a persona: the chat template's user
    turn and generation prompt (after a default system turn where the template adds one); the
    decoder reads ``ids[start:]``, the tokens :func:`.dialogs.split_prompt` puts after a system turn."""
    full = tokenizer.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)
    _, rest = split_prompt(tokenizer, _PROBE_SYSTEM, user)
    if len(rest) > len(full) or full[len(full) - len(rest):] != rest:
        raise LatentQAError(f"{tokenizer.source}: the user turn rendered without a system prompt does not end with "
                            "the tokens it has after one; cannot tell which positions the decoder reads")
    return full, len(full) - len(rest)


def persona_words(persona: Persona) -> list[str]:
    """The words whose presence marks a generation as showing ``persona``: the normalised words of
    its label and QA answers, without :data:`STOPWORDS` and words shorter than 3 characters."""
    text = " ".join([persona.label, *(qa.a for qa in persona.qa)])
    return sorted({w for w in normalize(text).split() if len(w) >= 3 and w not in STOPWORDS})


def shows_persona(text: str, words: Sequence[str]) -> bool:
    """Whether normalised ``text`` holds one of ``words`` as a whole word."""
    return bool(set(normalize(text).split()) & set(words))


def base_logprob(engine: Engine, stimuli: Sequence[str], generations: Sequence[Sequence[int]], *,
                 batch_size: int = 16) -> np.ndarray:
    """Per generation ``y_i`` to ``stimuli[i]``: ``log p_base(y | x) / len(y)`` (nats per token), the
    base model scoring y after the plain prompt: how much the text is still what the base writes
    (text that is no longer words scores far below the unsteered generations)."""
    plain = [target_prompt(engine.tokenizer, x)[0] for x in stimuli]
    return _logprob_per_token(engine, plain, generations, batch_size, "base_logprob")


def persona_lift(engine: Engine, persona: Persona, stimuli: Sequence[str], generations: Sequence[Sequence[int]],
                 *, batch_size: int = 16, base: np.ndarray | None = None) -> np.ndarray:
    """Per generation ``y_i`` to ``stimuli[i]``: ``[log p_base(y | persona system, x) - log p_base(y | x)]
    / len(y)`` (nats per token), the base model (no adapters) scoring y's tokens after the prompt
    with the persona's system prompt and after the plain prompt (:func:`target_prompt`). ``base``:
    the second term when already computed (:func:`base_logprob` of the same generations)."""
    with_p = [sum(split_prompt(engine.tokenizer, persona.system, x), []) for x in stimuli]
    lifted = _logprob_per_token(engine, with_p, generations, batch_size, "persona_lift")
    if base is None:
        base = base_logprob(engine, stimuli, generations, batch_size=batch_size)
    return lifted - base


def _logprob_per_token(engine: Engine, prompts: Sequence[list[int]], generations: Sequence[Sequence[int]],
                       batch_size: int, where: str) -> np.ndarray:
    """``log p_base(y_i | prompts[i]) / len(y_i)`` per generation, the base model (no adapters)."""
    ys = [list(y) for y in generations]
    if any(not y for y in ys):
        raise LatentQAError(f"{where}: an empty generation has no tokens to score")
    got = score(engine.model, [p + y for p, y in zip(prompts, ys)], prompt_lengths=[len(p) for p in prompts],
                batch_size=batch_size)
    return np.array([g.total / len(y) for g, y in zip(got, ys)], dtype=np.float64)


# ---- training -----------------------------------------------------------------------------------------
def steering_slot(config: ModelConfig, cfg: SteerConfig, read_point: str) -> LoraSlot:
    """The fresh steering LoRA (B zero: the target starts as the base) on ``cfg.targets`` of the
    blocks before ``read_point``, the blocks whose output it is read at."""
    blocks = Probes().capture(read_point).bind(config.num_hidden_layers).blocks_needed()
    if blocks == 0:
        raise LatentQAError(f"read point {read_point} is the embeddings: no block before it for a LoRA to steer")
    slot = LoraSlot.create(config, 1, cfg.rank, targets=cfg.targets, scale=cfg.alpha / cfg.rank, init="peft",
                           generator=torch.Generator().manual_seed(cfg.seed), name="steer")
    keep = [m for m in slot.A if int(m.split(".")[2]) < blocks]  # model.layers.{i}.…
    return dataclasses.replace(slot, A={m: slot.A[m] for m in keep}, B={m: slot.B[m] for m in keep})


def train_steering(
    engine: Engine,
    adapter: LitAdapter,
    out_dir: str | Path,
    cfg: SteerConfig,
    *,
    personas: Sequence[Persona],
    stimuli: Sequence[Stimulus] | None = None,
    question: str | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train the steering LoRA toward ``cfg.persona`` (resumable from ``out_dir``) and measure it;
    returns what ``steer.json`` holds. ``personas``: the persona to steer toward and the candidates
    the decoder ranks it among (every one needs a first QA answer); ``stimuli`` default to
    ``cfg.stimuli_file`` (the packaged ones); ``question``: what the decoder is asked when it reads
    (default: its recipe's read question).

    On SIGINT/SIGTERM it checkpoints at the next step and raises
    :class:`~dit_engine.jobs.JobInterrupted`; a failure removes ``out_dir`` again if this call
    created it and it is still empty."""
    out = Path(out_dir)
    with job_in(out, "LatentQA steering", cfg.checkpoint_every_s) as j:
        return _steer(engine, adapter, out, cfg, personas, stimuli, question, j, progress, log)


def _check(engine: Engine, adapter: LitAdapter, cfg: SteerConfig, personas: Sequence[Persona]) -> Persona:
    by_id = {p.id: p for p in personas}
    if cfg.persona not in by_id:
        known = list(by_id)
        raise LatentQAError(f"unknown persona {cfg.persona!r}; known ids include {', '.join(known[:5])}"
                            f"{', ...' if len(known) > 5 else ''} ({len(known)} in all)")
    for name in ("steps", "batch_size", "rank", "answer_tokens", "max_new_tokens", "save_every"):
        if getattr(cfg, name) < 1:
            raise LatentQAError(f"steering {name} must be >= 1, found {getattr(cfg, name)}")
    for name in ("n_train_prompts", "n_eval_prompts"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise LatentQAError(f"steering {name} must be >= 1 (or None: all), found {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.alpha > 0):
        raise LatentQAError(f"steering lr and alpha must be > 0, found lr {cfg.lr}, alpha {cfg.alpha}")
    if not cfg.kl_weight >= 0:
        raise LatentQAError(f"steering kl_weight must be >= 0, found {cfg.kl_weight}")
    adapter.check_base(BaseIdentity.from_model(engine.model))
    for point in (adapter.read_point, adapter.write_point):
        Point.parse(point, engine.config.num_hidden_layers)
    return by_id[cfg.persona]


def _steer(engine: Engine, adapter: LitAdapter, out: Path, cfg: SteerConfig, personas, stimuli, question,
           j: Job, progress: bool, log) -> dict:
    persona = _check(engine, adapter, cfg, personas)
    model, tok, dev = engine.model, engine.tokenizer, engine.model.device
    stimuli = list(stimuli) if stimuli is not None else load_stimuli(path=cfg.stimuli_file)
    held_out = [s.text for s in stimuli if s.split == "test"][: cfg.n_eval_prompts]
    if not held_out:
        raise LatentQAError("no test stimuli to measure the steering on")
    question = question or adapter.recipe.get("config", {}).get("read_question") or READ_QUESTION
    lit = dataclasses.replace(adapter.slot.to(dev, model.dtype, trainable=False), name="lit")
    slot = steering_slot(engine.config, cfg, adapter.read_point).to(dev, model.dtype, trainable=True)
    prompts = _train_prompts(engine, out, cfg, stimuli)

    rows = [(i, qa) for i in range(len(prompts)) for qa in persona.qa]
    readings = {(i, qa): reading(tok, prompts[i].n_read, qa.q, qa.a) for i, qa in rows}
    teacher = (TeacherCache(model, [fluency_example(d) for d in prompts], pad_id=tok.pad_token_id or 0)
               if cfg.kl_weight > 0 else None)  # the base's states over every train dialog, once
    trainer = Trainer(slot.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=cfg.steps,
                      master_fp32=model.dtype != torch.float32)
    ckpt = out / "checkpoint"
    lit_tensors = {f"{m}.A": lit.A[m] for m in lit.A} | {f"{m}.B": lit.B[m] for m in lit.B}
    identity = {"base": dataclasses.asdict(BaseIdentity.from_model(model)), "decoder": weights_fingerprint(lit_tensors),
                "read_point": adapter.read_point, "write_point": adapter.write_point, "patch_mode": adapter.patch_mode,
                "persona_qa": [[qa.q, qa.a] for qa in persona.qa]}
    trained = _trained_settings(cfg)

    def same_settings(meta: dict) -> None:
        if meta.get("trained") != trained or meta.get("identity") != json.loads(json.dumps(identity)):
            raise LatentQAError(f"{ckpt}: checkpoint was made with other settings, another decoder or another model; "
                                "remove it or use the same settings")

    meta = resume_slot_state(ckpt, slot, trainer, check=same_settings)
    done = int(meta["done_steps"]) if meta else 0
    losses: list[float] = list(meta["losses"]) if meta else []
    decoder_losses: list[float] = list(meta.get("decoder_losses", [])) if meta else []
    kls: list[float] = list(meta.get("kls", [])) if meta else []
    pad = tok.pad_token_id or 0
    frozen = [p for p in model.parameters() if p.requires_grad]  # a caller's trainable base: frozen while we run
    for p in frozen:
        p.requires_grad_(False)

    def save() -> None:
        save_slot_state(ckpt, slot, trainer, {"trained": trained, "identity": identity, "done_steps": done,
                                              "losses": losses, "decoder_losses": decoder_losses, "kls": kls})

    bar = tqdm(disable=not progress, total=cfg.steps, initial=done, desc="LatentQA steering", unit="step")
    try:
        for step in range(done, cfg.steps):
            part = [rows[k] for k in _row_order(step, cfg, len(rows))]
            loss, parts = steering_loss(engine, slot, lit, adapter, [prompts[i] for i, _ in part],
                                        [readings[r] for r in part], pad_id=pad, teacher=teacher,
                                        kl_weight=cfg.kl_weight)
            loss_val = float(loss.detach())
            trainer.backward(loss)
            done = step + 1
            losses.append(round(loss_val, 6))
            decoder_losses.append(round(parts["decoder"], 6))
            kls.append(round(parts["kl"], 6))
            if log:
                log({"step": done, "loss": loss_val, **parts})
            bar.update(1)
            bar.set_postfix(decoder=f"{parts['decoder']:.3f}", kl=f"{parts['kl']:.3f}")
            if done % cfg.save_every == 0 or j.should_checkpoint():
                save()
                j.checkpointed()
            j.stop_if_requested(ckpt)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    save()  # first: a rerun then trains nothing
    trained_slot = slot.detach()
    steer_adapter = SteerAdapter(trained_slot, {"id": persona.id, "label": persona.label}, adapter.read_point,
                                 identity["base"], {"config": dataclasses.asdict(cfg), "decoder": identity["decoder"],
                                                    "read_at": str(Point.parse(adapter.read_point,
                                                                               engine.config.num_hidden_layers)),
                                                    "train_prompts": len(prompts), "rows": len(rows)})
    steer_adapter.save(out)
    result = measure(engine, adapter, trained_slot, persona, personas, held_out, cfg, question=question)
    result["training"] = {"steps": cfg.steps, "train_prompts": len(prompts), "rows": len(rows),
                          "loss_first": losses[0], "loss_last": losses[-1],
                          "loss_first_10": round(float(np.mean(losses[:10])), 6),
                          "loss_last_10": round(float(np.mean(losses[-10:])), 6), "losses": losses,
                          "decoder_losses": decoder_losses, "kl_to_base": kls}
    result["config"] = dataclasses.asdict(cfg)
    result = json.loads(json.dumps(result))  # what steer.json holds (tuples as lists)
    write_json(out / RESULT, result, indent=1)
    return result


def fluency_example(d: Dialog) -> Example:
    """The KL row of a train dialog: every next-token distribution over its read span (the user
    turn, the generation prompt and the base's answer), scored against the base model's (from its
    second token when the span starts the input: the first has nothing before it to predict it)."""
    cut = max(1, d.start)
    return Example(list(d.input_ids[:cut]), list(d.input_ids[cut:]), "kl")


def steering_loss(engine: Engine, slot: LoraSlot, lit: LoraSlot, adapter: LitAdapter, dialogs: Sequence[Dialog],
                  rows: Sequence, *, pad_id: int = 0, teacher: TeacherCache | None = None,
                  kl_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """The steering objective for one batch and its parts: row i is the decoder reading
    ``dialogs[i]`` off the target (base + ``slot``; the capture keeps its graph) and answering
    ``rows[i]`` (a :class:`~.decoder.Reading` with its answer), the mean over rows of each row's
    mean token CE; with ``kl_weight`` > 0 (and ``teacher``, the base's states over the dialogs),
    plus ``kl_weight`` times the target's mean per-token KL to the base over the dialogs' read spans,
    from the same forward that is read (it then runs every block, not only those before the read
    point)."""
    model, dev = engine.model, engine.model.device
    uniq = list(dict.fromkeys(dialogs))
    kl = None
    if kl_weight > 0:
        if teacher is None:
            raise LatentQAError("steering_loss: a fluency term (kl_weight > 0) needs the base model's states (teacher)")
        examples = [fluency_example(d) for d in uniq]
        lens = [len(d.input_ids) for d in uniq]
        probes = Probes().capture(adapter.read_point,
                                  positions_mask(lens, [list(range(d.start, n)) for d, n in zip(uniq, lens)]))
        kl = batch_loss(model, collate(examples, pad_id=pad_id).to(dev), _on_rows(slot, len(uniq)),
                        group_reduce="mean", teacher_hidden=teacher.for_batch(examples).to(dev), probes=probes)[0]
        values = list(probes.captured[adapter.read_point].split([d.n_read for d in uniq]))
    else:
        values = target_activations(model, slot, uniq, adapter.read_point)
    at = {d: v for d, v in zip(uniq, values)}
    batch, probes = decoder_batch(list(rows), [at[d] for d in dialogs], adapter.write_point, adapter.patch_mode,
                                  pad_id=pad_id)
    dec = batch_loss(model, batch.to(dev), _on_rows(lit, batch.n_rows), group_reduce="mean", probes=probes)[0]
    loss = dec if kl is None else dec + kl_weight * kl
    return loss, {"decoder": float(dec.detach()), "kl": 0.0 if kl is None else float(kl.detach())}


def target_activations(model, slot: LoraSlot | None, dialogs: Sequence[Dialog], point: str) -> list[Tensor]:
    """The target's (base + ``slot``) activations at ``point`` over each dialog's read positions,
    ``[n_read, d]`` each, from one right-padded forward that stops at ``point``; they keep their
    graph (gradients reach ``slot``)."""
    return capture_batch(model, dialogs, point, _on_rows(slot, len(dialogs)))


def _row_order(step: int, cfg: SteerConfig, n_rows: int) -> list[int]:
    """Row indices of optimizer step ``step``: consecutive slices of seeded per-epoch shuffles
    (a function of the step alone, so a resumed run sees the rows an uninterrupted one does)."""
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, pos = divmod(k, n_rows)
        if epoch not in orders:
            orders[epoch] = list(range(n_rows))
            random.Random(cfg.seed * 1000 + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][pos])
    return out


def _trained_settings(cfg: SteerConfig) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in _RUN_ONLY}


def _train_prompts(engine: Engine, out: Path, cfg: SteerConfig, stimuli: Sequence[Stimulus]) -> list[Dialog]:
    """The train prompts as dialogs (no system prompt; with the base's greedy answers when
    ``with_answers``), from ``out/prompts.json`` or made now and saved there."""
    tok = engine.tokenizer
    settings = {k: getattr(cfg, k) for k in _PROMPT_FIELDS} | {
        "base": dataclasses.asdict(BaseIdentity.from_model(engine.model))}
    settings = json.loads(json.dumps(settings))
    path = out / PROMPTS
    if path.exists():
        doc = read_json(path, "a steering prompts file", kind=dict, error=LatentQAError)
        if doc.get("format") != PROMPTS_FORMAT or doc.get("settings") != settings:
            raise LatentQAError(f"{path}: prompts were made with other settings or another model; remove it or use "
                                "the same settings")
        return [Dialog(cfg.persona, p["stimulus"], "train", tuple(p["input_ids"]), int(p["start"]), p["answer"])
                for p in doc["prompts"]]
    pool = [s.text for s in stimuli if s.split == "train"]
    random.Random(cfg.seed).shuffle(pool)
    pool = pool[: cfg.n_train_prompts]
    if not pool:
        raise LatentQAError("no train stimuli to steer on")
    made = [target_prompt(tok, text) for text in pool]
    answers: list[list[int]] = [[] for _ in pool]
    if cfg.with_answers:
        params = SamplingParams(max_new_tokens=cfg.answer_tokens, stop_token_ids=engine.stop_ids())
        answers = [o.token_ids for o in generate(engine.model, [ids for ids, _ in made], params)]
    dialogs = [Dialog(cfg.persona, text, "train", tuple(ids + a), start, tok.decode(a))
               for text, (ids, start), a in zip(pool, made, answers)]
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"format": PROMPTS_FORMAT, "settings": settings,
                      "prompts": [{"stimulus": d.stimulus, "input_ids": list(d.input_ids), "start": d.start,
                                   "answer": d.answer} for d in dialogs]}, indent=None)
    return dialogs


# ---- measurement --------------------------------------------------------------------------------------
def measure(engine: Engine, adapter: LitAdapter, slot: LoraSlot, persona: Persona, personas: Sequence[Persona],
            prompts: Sequence[str], cfg: SteerConfig, *, question: str, resamples: int = BOOTSTRAP_RESAMPLES,
            seed: int = BOOTSTRAP_SEED, batch_size: int = 32) -> dict:
    """The steered (base + ``slot``) and the unsteered target on held-out ``prompts`` (user
    messages, no persona system prompt; one sampling seed for both): the metrics of the module
    docstring per prompt, their means with 95% bootstrap intervals over prompts, and the paired
    difference steered - unsteered. JSON-able."""
    tok, model = engine.tokenizer, engine.model
    made = [target_prompt(tok, x) for x in prompts]
    ids = [p for p, _ in made]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.sample_seed, stop_token_ids=engine.stop_ids())
    gens: dict[str, list[Generation]] = {
        "unsteered": generate(model, ids, params, decode=tok.decode, batch_size=batch_size),
        "steered": generate(model, ids, params, adapters=_on_rows(slot, len(ids)), decode=tok.decode,
                            batch_size=batch_size)}
    words = persona_words(persona)
    cands = list(dict.fromkeys(p.qa[0].a for p in personas))
    truth = cands.index(persona.qa[0].a)
    lit = adapter.slot.to(model.device, model.dtype)
    per: dict[str, np.ndarray] = {}  # side -> [n, len(METRICS)]
    for side, outs in gens.items():
        fluency = base_logprob(engine, prompts, [o.token_ids for o in outs])
        lift = persona_lift(engine, persona, prompts, [o.token_ids for o in outs], base=fluency)
        shows = np.array([shows_persona(o.text, words) for o in outs], dtype=np.float64)
        dialogs = [Dialog(persona.id, x, "test", tuple(p + o.token_ids), start, o.text)
                   for x, (p, start), o in zip(prompts, made, outs)]
        acts = capture(engine, dialogs, adapter.read_point, target=AdapterBatch(slot) if side == "steered" else None)
        r = ranks(score_candidates(engine, lit, acts, question, cands, write_point=adapter.write_point,
                                   mode=adapter.patch_mode), [truth] * len(prompts))
        per[side] = np.stack([lift, shows, (r == 1).astype(np.float64), 1.0 / r, fluency], 1)
        per[side + "_rank"] = r
    metrics = {}
    for k, name in enumerate(METRICS):
        s, u = per["steered"][:, k : k + 1], per["unsteered"][:, k : k + 1]
        diff, dci = paired_difference_ci(s, u, resamples, seed)
        metrics[name] = {"steered": float(s.mean()), "steered_ci": list(bootstrap_ci(s, resamples, seed)[0]),
                         "unsteered": float(u.mean()), "unsteered_ci": list(bootstrap_ci(u, resamples, seed)[0]),
                         "difference": diff[0], "difference_ci": list(dci[0])}
    examples = [{"prompt": x, "unsteered": gens["unsteered"][i].text, "steered": gens["steered"][i].text,
                 "decoder_rank": {"unsteered": int(per["unsteered_rank"][i]), "steered": int(per["steered_rank"][i])}}
                for i, x in enumerate(prompts[: cfg.n_examples])]
    return {"persona": {"id": persona.id, "label": persona.label}, "n_prompts": len(prompts),
            "question": question, "n_candidates": len(cands), "persona_words": words, "metrics": metrics,
            "per_prompt": {side: {name: per[side][:, k].tolist() for k, name in enumerate(METRICS)}
                           | {"decoder_rank": per[side + "_rank"].tolist(), "text": [o.text for o in gens[side]]}
                           for side in ("steered", "unsteered")},
            "examples": examples}


def format_table(result: dict) -> str:
    """:func:`train_steering`'s result as a plain-text table: each metric unsteered, steered and the difference."""
    rows = [("metric", "unsteered", "steered", "steered - unsteered")]
    for name in METRICS:
        m = result["metrics"][name]
        rows.append((_LABELS[name], *(f"{m[k]:.3f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]"
                                      for k in ("unsteered", "steered")),
                     f"{m['difference']:+.3f} [{m['difference_ci'][0]:+.3f}, {m['difference_ci'][1]:+.3f}]"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    t = result.get("training", {})
    p = result["persona"]
    lines.append(f"steered toward {p['id']} ({p['label']}); {result['n_prompts']} held-out prompts, 95% bootstrap "
                 f"intervals over prompts; the decoder ranks it among {result['n_candidates']} personas")
    if t:
        lines.append(f"steering loss {t['loss_first']:.3f} -> {t['loss_last']:.3f} over {t['steps']} steps "
                     f"(mean of the first 10: {t['loss_first_10']:.3f}, of the last 10: {t['loss_last_10']:.3f})")
    for ex in result["examples"][:2]:
        lines.append(f"example: {ex['prompt']!r}\n  unsteered: {ex['unsteered']!r}\n  steered:   {ex['steered']!r}")
    return "\n".join(lines)


def _on_rows(slot: LoraSlot | None, rows: int) -> AdapterBatch | None:
    if slot is None:
        return None
    dev = next(iter(slot.A.values())).device
    return AdapterBatch(slot.with_index(torch.zeros(rows, dtype=torch.int64, device=dev)))

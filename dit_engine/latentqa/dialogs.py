"""Stimulus dialogs: the target model answers neutral user messages under a persona's hidden
system prompt, and its activations over the dialog (not over the instruction) are what the
decoder reads.

A :class:`Dialog` holds the target's whole input, ``system turn + user turn + generation prompt +
the target's answer``, as token ids, and ``start``: the first token after the system turn. The
decoder reads positions ``start ..`` only, so the instruction tokens are masked from it (the
reference replaces them by BOS activations; here they are simply not captured), while the target
still had the system prompt in its input (its influence on the dialog's activations is what the
decoder learns to read).

Positions come from the tokenizer and the chat template, never from token ids written here: the
system turn rendered alone must be a prefix of the rendered conversation (true of ChatML, Llama 3,
Qwen and SmolLM templates); ``start`` is the length of its tokens, and the conversation's tokens
must be the system turn's followed by the rest's (checked: a BPE merge across the boundary is
refused with an error naming the tokenizer).

Which stimuli: every test persona answers the same ``test_stimuli`` held-out messages (so held-out
dialogs differ only by persona); train persona ``i`` answers ``per_persona`` messages of a seeded
shuffle of the train stimuli, starting at ``i * per_persona`` (all messages get used).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import AdapterBatch
from ..engine import Engine
from ..files import read_json, write_json
from ..generate import SamplingParams, generate
from ..probes import Probes, positions_mask
from ..tokenizer import Tokenizer, TokenizerError
from .data import QA, Persona, Stimulus

DIALOGS_FORMAT = "dit-engine-latentqa-dialogs/1"


class LatentQAError(ValueError):
    """LatentQA input that does not fit: a template, a file, a setting; names what and where."""


@dataclasses.dataclass(frozen=True)
class Dialog:
    persona: str  # Persona.id
    stimulus: str  # the user message
    split: str  # the persona's split
    input_ids: tuple[int, ...]  # system turn + user turn + generation prompt + the target's answer
    start: int  # first token after the system turn: the decoder reads input_ids[start:]
    answer: str  # the target's answer, decoded

    @property
    def dialog_ids(self) -> tuple[int, ...]:
        """The tokens the decoder reads: user turn, generation prompt and the target's answer."""
        return self.input_ids[self.start :]

    @property
    def n_read(self) -> int:
        return len(self.input_ids) - self.start


def split_prompt(tokenizer: Tokenizer, system: str, user: str) -> tuple[list[int], list[int]]:
    """The target's prompt for (system, user) as (system-turn tokens, dialog tokens): the second
    part is the user turn and the generation prompt, what the decoder will read."""
    sys_msg = {"role": "system", "content": system}
    full = tokenizer.apply_chat_template([sys_msg, {"role": "user", "content": user}], add_generation_prompt=True)
    try:
        head = tokenizer.apply_chat_template([sys_msg], add_generation_prompt=False)
    except TokenizerError as e:  # a template that refuses a lone system turn
        raise LatentQAError(f"{tokenizer.source}: the chat template cannot render a system turn alone ({e}); "
                            "LatentQA needs it to tell the system prompt's tokens from the dialog's") from None
    if not head or not full.startswith(head):
        raise LatentQAError(f"{tokenizer.source}: the chat template's system turn rendered alone is not the start "
                            "of the conversation; cannot tell the system prompt's tokens from the dialog's")
    sys_ids, rest_ids = tokenizer.encode(head), tokenizer.encode(full[len(head):])
    if sys_ids + rest_ids != tokenizer.encode(full):
        raise LatentQAError(f"{tokenizer.source}: the conversation does not tokenize as its system turn followed by "
                            "the rest (a token spans the boundary); cannot mask the system prompt exactly")
    if not rest_ids:
        raise LatentQAError(f"{tokenizer.source}: the dialog after the system turn has no tokens")
    return sys_ids, rest_ids


def dialog(tokenizer: Tokenizer, persona: Persona, stimulus: str, answer_ids: Sequence[int]) -> Dialog:
    """The dialog of ``persona`` answering ``stimulus`` with ``answer_ids`` (the target's tokens)."""
    sys_ids, rest_ids = split_prompt(tokenizer, persona.system, stimulus)
    return Dialog(persona.id, stimulus, persona.split, tuple(sys_ids + rest_ids + list(answer_ids)), len(sys_ids),
                  tokenizer.decode(list(answer_ids)))


def assign_stimuli(personas: Sequence[Persona], stimuli: Sequence[Stimulus], per_persona: int,
                   seed: int) -> list[tuple[Persona, str]]:
    """(persona, message) pairs: train personas rotate through a seeded shuffle of the train
    messages, test personas all answer the same ``per_persona`` test messages."""
    if per_persona < 1:
        raise LatentQAError(f"stimuli per persona must be >= 1, found {per_persona}")
    out = []
    for split in ("train", "test"):
        mine = [p for p in personas if p.split == split]
        pool = [s.text for s in stimuli if s.split == split]
        if not mine:
            continue
        if not pool:
            raise LatentQAError(f"no {split} stimuli for the {len(mine)} {split} personas")
        random.Random(seed * 7919 + (split == "test")).shuffle(pool)
        for i, p in enumerate(mine):
            first = i * per_persona if split == "train" else 0
            out += [(p, pool[(first + j) % len(pool)]) for j in range(min(per_persona, len(pool)))]
    return out


def make_dialogs(
    engine: Engine,
    pairs: Sequence[tuple[Persona, str]],
    *,
    max_answer_tokens: int = 32,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 32,
    target: AdapterBatch | None = None,
    progress: bool = False,
) -> list[Dialog]:
    """The target (base model, or base + ``target``'s adapters) answers each (persona, message)
    under the persona's system prompt: one batched, seeded generation (``progress``: a bar of
    dialogs written)."""
    tok = engine.tokenizer
    prompts = [sum(split_prompt(tok, p.system, text), []) for p, text in pairs]
    params = SamplingParams(max_new_tokens=max_answer_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop_token_ids=engine.stop_ids())
    ad = every_row(target, len(prompts), engine.model.device)
    with tqdm(total=len(prompts), disable=not progress, desc="target dialogs", unit="dialog") as bar:
        outs = generate(engine.model, prompts, params, adapters=ad, decode=tok.decode, batch_size=batch_size,
                        progress=bar.update)
    return [dialog(tok, p, text, o.token_ids) for (p, text), o in zip(pairs, outs)]


@torch.no_grad()
def capture(engine: Engine, dialogs: Sequence[Dialog], point: str, *, target: AdapterBatch | None = None,
            batch_size: int = 16, progress: bool = False) -> list[Tensor]:
    """The target's activations at ``point`` over each dialog's read positions: one ``[n_read, d]``
    tensor per dialog (model dtype and device), from a forward over the whole input (system
    prompt included), batched (``progress``: a bar of dialogs read)."""
    model = engine.model
    pad = engine.tokenizer.pad_token_id or 0
    out: list[Tensor] = []
    bar = tqdm(total=len(dialogs), disable=not progress, desc=f"capture {point}", unit="dialog")
    for s in range(0, len(dialogs), batch_size):
        part = dialogs[s : s + batch_size]
        out += capture_batch(model, part, point, every_row(target, len(part), model.device), pad_id=pad)
        bar.update(len(part))
    bar.close()
    return [v.clone() for v in out]


def capture_batch(model, dialogs: Sequence[Dialog], point: str, adapters: AdapterBatch | None, *,
                  pad_id: int = 0) -> list[Tensor]:
    """One forward over ``dialogs`` (right-padded; row i decodes with what ``adapters`` route to
    row i) that stops at ``point``: each dialog's activations there over its read positions,
    ``[n_read, d]`` each. Under autograd they keep their graph (steering back-propagates through
    them); :func:`capture` is this without gradients, in batches, one adapter for every row."""
    lens = [len(d.input_ids) for d in dialogs]
    ids = torch.full((len(dialogs), max(lens)), pad_id, dtype=torch.int64)
    for i, d in enumerate(dialogs):
        ids[i, : lens[i]] = torch.tensor(d.input_ids)
    mask = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
    probes = Probes().capture(point, positions_mask(lens, [list(range(d.start, len(d.input_ids))) for d in dialogs]))
    dev = model.device
    model(ids.to(dev), adapters, attention_mask=mask.to(dev), output="probes", probes=probes)
    return list(probes.captured[point].split([d.n_read for d in dialogs]))


def every_row(adapters: AdapterBatch | None, rows: int, device) -> AdapterBatch | None:
    """``adapters`` (one adapter per slot, e.g. a zoo diff in slot 0) routed to every one of ``rows``."""
    if adapters is None:
        return None
    for k, s in enumerate(adapters.slots):
        if s.n_adapters != 1:
            raise LatentQAError(f"target adapters: slot {k} ({s.name}) holds {s.n_adapters} adapters; the target "
                                "is one model, so each slot must hold exactly one")
    return AdapterBatch(*(s.with_index(torch.zeros(rows, dtype=torch.int64, device=device)) for s in adapters.slots))


# ---- the dialogs file ------------------------------------------------------------------------------------
def save_dialogs(path: str | Path, dialogs: Sequence[Dialog], personas: Sequence[Persona], settings: dict) -> None:
    """One JSON file: the dialogs, the personas they belong to (so reading needs no other file) and
    the settings they were made with."""
    used = {d.persona for d in dialogs}
    doc = {"format": DIALOGS_FORMAT, "settings": settings,
           "personas": [_persona_json(p) for p in personas if p.id in used],
           "dialogs": [dataclasses.asdict(d) | {"input_ids": list(d.input_ids)} for d in dialogs]}
    write_json(path, doc, indent=None)


def load_dialogs(path: str | Path) -> tuple[list[Dialog], list[Persona], dict]:
    """(dialogs, personas, settings) from :func:`save_dialogs`; one clear error when unreadable."""
    doc = read_json(path, "a LatentQA dialogs file", kind=dict, error=LatentQAError)
    if doc.get("format") != DIALOGS_FORMAT:
        raise LatentQAError(f"{path}: format {doc.get('format')!r}, expected {DIALOGS_FORMAT!r}")
    try:
        personas = [Persona(p["id"], p["label"], p["category"], p["system"], p["split"],
                            tuple(QA(q, a) for q, a in p["qa"])) for p in doc["personas"]]
        dialogs = [Dialog(d["persona"], d["stimulus"], d["split"], tuple(d["input_ids"]), int(d["start"]), d["answer"])
                   for d in doc["dialogs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise LatentQAError(f"{path}: malformed LatentQA dialogs file ({type(e).__name__}: {e})") from None
    known = {p.id for p in personas}
    bad = [d.persona for d in dialogs if d.persona not in known or not 0 < d.start < len(d.input_ids)]
    if bad:
        raise LatentQAError(f"{path}: dialog of persona {bad[0]!r} has no persona record or no tokens to read")
    return dialogs, personas, doc.get("settings", {})


def _persona_json(p: Persona) -> dict:
    return {"id": p.id, "label": p.label, "category": p.category, "system": p.system, "split": p.split,
            "qa": [[qa.q, qa.a] for qa in p.qa]}

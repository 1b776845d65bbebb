"""Batched generation and teacher-forced scoring.

Generation: prompts of different lengths are left-padded into one batch, prefilled in one forward
into a preallocated :class:`KVCache`, then decoded one column per step. Every row may carry its own
adapters (the ``AdapterBatch`` index has one entry per prompt). Rows that finish (EOS, stop string,
token budget) leave the batch: the cache and the adapter routing are compacted, so finished rows
stop costing compute.

Scoring: per-token log-probabilities of given token sequences (optionally only of a completion
after a prompt), teacher-forced, with or without adapters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .adapters import AdapterBatch
from .cache import KVCache
from .model import Transformer
from .probes import PatchMode, Probes, positions_mask


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's / config's end tokens

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token included when one ended the row
    logprobs: list[float]  # log p(token) under the model's (temperature-1) distribution
    finish_reason: str  # "eos" | "stop" | "length"
    text: str | None = None  # decoded, special tokens skipped, cut before a stop string


@dataclasses.dataclass
class Score:
    token_ids: list[int]  # the scored tokens
    logprobs: list[float]  # log p(token | everything before it)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


Decoder = Callable[[list[int]], str]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    adapters: AdapterBatch | None = None,
    decode: Decoder | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    patches: Sequence[PromptPatch | None] | None = None,
) -> list[Generation]:
    """Generate for every prompt (token ids). ``adapters`` routes one entry per prompt.

    ``decode`` (ids -> text) is needed for stop strings and fills ``Generation.text``.
    ``progress(n)`` is called with the number of prompts finished since the last call.
    ``patches`` (one per prompt, or None for a prompt left alone): activations written into the
    prompt's prefill at given positions of its own tokens (:class:`PromptPatch`; all of one point
    and mode), e.g. a target model's activations over a decoder's placeholder tokens.
    Rows that repeat a prompt under the same adapters and without a patch (several samples of one
    prompt) prefill once in their batch; each then samples on its own.
    """
    params = params or SamplingParams()
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (pass the tokenizer's decode)")
    stop_ids = params.stop_token_ids if params.stop_token_ids is not None else model.config.eos_token_id
    if adapters is not None:
        adapters.validate(model.config, len(prompts))
    ctx = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= ctx:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {ctx} tokens")
    if patches is not None:
        _check_patches(patches, prompts)
    gen = torch.Generator(device=model.device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    # Similar lengths together wastes less padding; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ad = adapters.select_rows(torch.tensor(chunk)) if adapters is not None else None
        pt = [patches[i] for i in chunk] if patches is not None else None
        outs = _generate_batch(model, [list(prompts[i]) for i in chunk], params, stop_ids, ad, decode, gen, progress,
                               pt)
        for i, o in zip(chunk, outs):
            results[i] = o
    return results  # type: ignore[return-value]


@dataclasses.dataclass
class PromptPatch:
    """Values written at ``point`` (``"hidden.K"``, ``"mlp.I"``, see :mod:`dit_engine.probes`) over
    ``positions`` of one prompt's tokens, during its prefill."""

    point: str
    positions: Sequence[int]  # indices into the prompt's own tokens
    values: Tensor  # [len(positions), width]
    mode: PatchMode = "replace"


def _check_patches(patches: Sequence[PromptPatch | None], prompts: Sequence[Sequence[int]]) -> None:
    if len(patches) != len(prompts):
        raise ValueError(f"{len(patches)} patches for {len(prompts)} prompts (one per prompt, or None)")
    kinds = {(p.point, p.mode) for p in patches if p is not None}
    if len(kinds) > 1:
        raise ValueError(f"patches of one generate call share one point and mode, found {sorted(kinds)}")
    for i, p in enumerate(patches):
        if p is None:
            continue
        n = len(prompts[i])
        if len(set(q % n for q in p.positions if -n <= q < n)) != len(p.positions):
            raise ValueError(f"patch of prompt {i}: positions {list(p.positions)} must be distinct and inside "
                             f"its {n} tokens")
        if p.values.dim() != 2 or p.values.shape[0] != len(p.positions):
            raise ValueError(f"patch of prompt {i}: {len(p.positions)} positions need values of shape "
                             f"({len(p.positions)}, width), found {tuple(p.values.shape)}")


def _prefill_probes(patches: list[PromptPatch | None] | None, prompts: list[list[int]]) -> Probes | None:
    """One Probes for a left-padded batch: every row's positions in the padded block, values in
    row-major order (each row's positions ascending)."""
    if patches is None or all(p is None for p in patches):
        return None
    first = next(p for p in patches if p is not None)
    rows, values = [], []
    for p, prompt in zip(patches, prompts):
        if p is None:
            rows.append([])
            continue
        n = len(prompt)
        order = sorted(range(len(p.positions)), key=lambda j: p.positions[j] % n)
        rows.append([p.positions[j] % n for j in order])
        values.append(p.values[order])
    mask = positions_mask([len(q) for q in prompts], rows, left_pad=True)
    return Probes().patch(first.point, mask, torch.cat(values), first.mode)


def _shared_prefill(prompts: list[list[int]], adapters: AdapterBatch | None,
                    patches: list[PromptPatch | None] | None) -> tuple[Tensor, Tensor] | None:
    """(one row of each distinct prompt, each row's distinct prompt) when some rows are the same
    prompt under the same adapters and no patch, else None. A row's adapters are its index in
    every slot; per-token routing (a 2-D index) is never shared."""
    if patches is not None and any(p is not None for p in patches):
        return None
    if len({tuple(p) for p in prompts}) == len(prompts):
        return None  # no prompt repeats: nothing to share, and no read of the adapter indices
    if adapters is not None and any(s.index.dim() != 1 for s in adapters.slots):
        return None
    routes = list(zip(*(s.index.tolist() for s in adapters.slots))) if adapters is not None else [()] * len(prompts)
    seen: dict[tuple, int] = {}
    first, inverse = [], []
    for i, (p, r) in enumerate(zip(prompts, routes)):
        key = (tuple(p), r)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    if len(first) == len(prompts):
        return None
    return torch.tensor(first, dtype=torch.int64), torch.tensor(inverse, dtype=torch.int64)


def _generate_batch(model, prompts, params, stop_ids, adapters, decode, gen, progress,
                    patches=None) -> list[Generation]:
    dev = model.device
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    ctx = model.config.max_position_embeddings
    budget = [min(params.max_new_tokens, ctx - len(p)) for p in prompts]  # a row stops at the context
    max_len = longest + max(budget)
    ids = torch.zeros(b, longest, dtype=torch.int64)
    mask = torch.zeros(b, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = True
    stop_t = torch.tensor(list(stop_ids), dtype=torch.int64, device=dev)

    out_tokens: list[list[int]] = [[] for _ in range(b)]
    out_lp: list[list[float]] = [[] for _ in range(b)]
    reason = ["length"] * b
    alive = list(range(b))  # original row of each live cache row
    shared = _shared_prefill(prompts, adapters, patches)
    if shared is None:
        cache = KVCache(model.config, b, max_len, dtype=model.dtype, device=dev)
        probes = _prefill_probes(patches, prompts)
        logits = model(ids.to(dev), adapters, attention_mask=mask.to(dev), cache=cache, output="last",
                       probes=probes)  # [B, V]
    else:  # identical rows (n samples of one prompt) prefill once, then their cache rows are copied
        first, inverse = shared
        cache = KVCache(model.config, len(first), max_len, dtype=model.dtype, device=dev)
        logits = model(ids[first].to(dev), adapters.select_rows(first) if adapters is not None else None,
                       attention_mask=mask[first].to(dev), cache=cache, output="last")  # [U, V]
        cache.keep(inverse)
        logits = logits[inverse.to(dev)]
    for step in range(params.max_new_tokens):
        tok, lp = _sample(logits.float(), params, gen)  # [b_live], [b_live]
        # The one device -> host read of a step (the loop needs the tokens to stop rows): token ids
        # (exact in fp64), their log-probs and the stop flags in one transfer.
        host = torch.stack((tok.double(), lp.double(), torch.isin(tok, stop_t).double())).tolist()
        tok_l, lp_l, is_stop = [int(v) for v in host[0]], host[1], host[2]
        done_rows = []
        for j, row in enumerate(alive):
            out_tokens[row].append(tok_l[j])
            out_lp[row].append(lp_l[j])
            if is_stop[j]:
                reason[row] = "eos"
            elif params.stop_strings and any(ss in decode(out_tokens[row]) for ss in params.stop_strings):
                reason[row] = "stop"
            elif step + 1 < budget[row]:
                continue
            done_rows.append(j)
        if progress and done_rows:
            progress(len(done_rows))
        if len(done_rows) == len(alive):
            break
        if done_rows:
            done = set(done_rows)
            keep = [j for j in range(len(alive)) if j not in done]
            keep_t = torch.tensor(keep, dtype=torch.int64)
            cache.keep(keep_t)
            if adapters is not None:
                adapters = adapters.select_rows(keep_t)
            tok = tok[keep_t.to(dev)]
            alive = [alive[j] for j in keep]
        logits = model(tok[:, None], adapters, cache=cache, output="last")
    else:
        if progress and alive:
            progress(len(alive))

    results = []
    for i in range(b):
        text = None
        if decode is not None:
            text = decode(out_tokens[i])
            if reason[i] == "stop":
                cut = min(text.find(ss) for ss in params.stop_strings if ss in text)
                text = text[:cut]
        results.append(Generation(prompts[i], out_tokens[i], out_lp[i], reason[i], text))
    return results


def _sample(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """logits [B, V] fp32 -> (token [B], log p(token) [B] under the untempered distribution)."""
    logp = torch.log_softmax(logits, -1)
    if params.temperature == 0:
        tok = logits.argmax(-1)
    else:
        x = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(x, min(params.top_k, x.shape[-1]), dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if params.top_p < 1.0:
            tok = _sample_top_p(torch.softmax(x, -1), params.top_p, gen)
        else:
            tok = torch.multinomial(torch.softmax(x, -1), 1, generator=gen).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def _sample_top_p(probs: Tensor, top_p: float, gen: torch.Generator) -> Tensor:
    """Nucleus sampling from probs [B, V]: the smallest set of most likely tokens whose mass reaches
    ``top_p``, renormalised. On a CPU the candidates come from a top-k that grows until every row's
    nucleus lies inside it (a full sort and a multinomial over 49k tokens cost ~150 ms a step at 64
    rows; the nucleus of a chat model's distribution is rarely above a few hundred tokens); a
    device sorts the whole row, so the check never stops the stream for a host read."""
    v = probs.shape[-1]
    k = v if probs.device.type != "cpu" else min(v, 256)
    while True:
        sp, si = torch.topk(probs, k, dim=-1) if k < v else torch.sort(probs, dim=-1, descending=True)
        cum = sp.cumsum(-1)
        if k == v or bool((cum[:, -1] > top_p).all()):
            break
        k = min(v, k * 8)
    keep = cum - sp <= top_p  # the tokens before each one hold less than top_p: it is in the nucleus
    pick = torch.multinomial(sp.masked_fill(~keep, 0.0), 1, generator=gen)  # [B, 1]
    return si.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def score(
    model: Transformer,
    sequences: Sequence[Sequence[int]],
    *,
    prompt_lengths: Sequence[int] | None = None,
    adapters: AdapterBatch | None = None,
    batch_size: int = 16,
) -> list[Score]:
    """Teacher-forced log p of each token given the ones before it.

    ``prompt_lengths[i]`` tokens of sequence i are context only (scored from there on); without it
    every token after the first is scored.
    """
    if adapters is not None:
        adapters.validate(model.config, len(sequences))
    pl = list(prompt_lengths) if prompt_lengths is not None else [1] * len(sequences)
    if len(pl) != len(sequences):
        raise ValueError(f"{len(pl)} prompt lengths for {len(sequences)} sequences")
    ctx = model.config.max_position_embeddings
    for i, (seq, p) in enumerate(zip(sequences, pl)):
        if len(seq) > ctx:
            raise ValueError(f"sequence {i} has {len(seq)} tokens; the model's context is {ctx} tokens")
        if not 1 <= p <= len(seq):
            raise ValueError(f"sequence {i}: prompt length {p} outside [1, {len(seq)}]")
    results: list[Score] = []
    dev = model.device
    for s in range(0, len(sequences), batch_size):
        rows = list(range(s, min(s + batch_size, len(sequences))))
        longest = max(len(sequences[i]) for i in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.int64)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for j, i in enumerate(rows):
            ids[j, : len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask[j, : len(sequences[i])] = True
        ad = adapters.select_rows(torch.tensor(rows)) if adapters is not None else None
        hidden = model(ids.to(dev), ad, attention_mask=mask.to(dev), output="hidden")  # [b, T, h]
        for j, i in enumerate(rows):
            n, p = len(sequences[i]), pl[i]
            logits = torch.nn.functional.linear(hidden[j, p - 1 : n - 1], model.lm_weight).float()  # [n-p, V]
            tgt = ids[j, p:n].to(dev)
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None]).squeeze(-1)
            results.append(Score(tgt.tolist(), lp.tolist()))
    return results

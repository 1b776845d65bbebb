"""Reading activations with the LatentQA decoder: answers, and retrieval by log-likelihood.

* :func:`answer`: the decoder's greedy answer to a question about each target's activations, one
  batched generation whose prompts carry the activations in their prefill
  (:class:`~dit_engine.generate.PromptPatch`).
* :func:`score_candidates`: ``log p(candidate + end-of-turn | activations, question)`` for every
  (target, candidate). Each target's prompt is prefilled once (with its patch) into a KV cache,
  the cache rows are repeated once per candidate, and all candidates run as one block after it:
  the shared prompt costs one forward, not one per candidate.
* :func:`evaluate`: for held-out dialogs, the true persona's rank among the candidate answers of
  every persona of those dialogs (each persona's first QA answer, which names it), as
  retrieval@1, retrieval@5 and MRR, under four conditions: ``decoder`` (the trained decoder
  reading the dialog's activations), ``zero`` (the trained decoder given zero vectors),
  ``shuffled`` (given the activations of another persona's dialog of the same message) and
  ``untrained`` (the base model without the LIT adapter, given the true activations). Ties count
  against the true persona (as :mod:`dit_engine.text_match` does), so a decoder that scores every
  candidate alike is never lucky.

  **Calibration.** A small decoder gives some answers a high likelihood whatever it reads (its
  prior: "A retired college professor." tops most rows), which hides what it does read. The
  reported ranks therefore come from calibrated scores: each candidate's log-likelihood minus its
  mean over all the dialogs read in that condition (per candidate, one fixed rule for every
  condition, no tuning; the contextual calibration of classifiers done with the read set as the
  reference). The uncalibrated ranks are reported beside them (``uncalibrated``,
  ``decoder_minus_uncalibrated``).

  Metrics are averaged per persona first, then over personas; 95% intervals bootstrap over
  personas (:mod:`dit_engine.bootstrap`), and the decoder's margin over each control is a paired
  bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dit_kernels.cross_entropy import linear_cross_entropy

from ..adapters import AdapterBatch, LoraSlot
from ..bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci, paired_difference_ci
from ..cache import KVCache
from ..engine import Engine
from ..generate import Generation, PromptPatch, SamplingParams, generate
from ..probes import PatchMode, Probes, positions_mask
from ..text_match import contains_match
from .data import Persona
from .decoder import LitAdapter, decoder_prompt
from .dialogs import Dialog, LatentQAError, capture

CONDITIONS = ("decoder", "zero", "shuffled", "untrained")
METRICS = ("retrieval@1", "retrieval@5", "mrr")
TOP_K = 5


def answer(engine: Engine, slot: LoraSlot | None, values: Sequence[Tensor], question: str, *, write_point: str,
           mode: PatchMode = "replace", max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """The decoder's (base + ``slot``; None: the bare base) greedy answer about each ``values[i]``."""
    return [o.text for o in answer_generations(engine, slot, values, question, write_point=write_point, mode=mode,
                                               max_new_tokens=max_new_tokens, batch_size=batch_size)]


def answer_generations(engine: Engine, slot: LoraSlot | None, values: Sequence[Tensor], question: str, *,
                       write_point: str, mode: PatchMode = "replace", max_new_tokens: int = 24,
                       batch_size: int = 32) -> list[Generation]:
    """:func:`answer` with the whole generations (tokens too): one batched generation whose
    prompts carry each ``values[i]`` over their placeholders in their prefill."""
    tok = engine.tokenizer
    prompts, patches = [], []
    for v in values:
        ids, pos = decoder_prompt(tok, v.shape[0], question)
        prompts.append(ids)
        patches.append(PromptPatch(write_point, pos, v, mode))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=engine.stop_ids())
    return generate(engine.model, prompts, params, adapters=_on_rows(slot, len(prompts)), decode=tok.decode,
                    batch_size=batch_size, patches=patches)


@torch.no_grad()
def score_candidates(engine: Engine, slot: LoraSlot | None, values: Sequence[Tensor], question: str,
                     candidates: Sequence[str], *, write_point: str, mode: PatchMode = "replace",
                     batch_size: int = 64) -> Tensor:
    """``[len(values), len(candidates)]`` fp32: the decoder's log-likelihood of each candidate
    answer and the end-of-turn token, given each target's activations and the question.
    ``batch_size``: candidate rows per forward (targets per forward = batch_size // candidates)."""
    model, tok = engine.model, engine.tokenizer
    dev = model.device
    if not candidates:
        raise LatentQAError("score_candidates: no candidates")
    cand = [tok.encode(c) + [tok.end_of_turn_id] for c in candidates]
    k, lc = len(cand), max(len(c) for c in cand)
    c_ids = torch.zeros(k, lc, dtype=torch.int64)
    c_mask = torch.zeros(k, lc, dtype=torch.bool)
    for j, c in enumerate(cand):
        c_ids[j, : len(c)], c_mask[j, : len(c)] = torch.tensor(c), True
    per = max(1, batch_size // k)
    out = torch.empty(len(values), k)
    for s in range(0, len(values), per):
        part = list(values[s : s + per])
        prompts = [decoder_prompt(tok, v.shape[0], question) for v in part]
        b, longest = len(part), max(len(p) for p, _ in prompts)
        ids = torch.zeros(b, longest, dtype=torch.int64)
        mask = torch.zeros(b, longest, dtype=torch.bool)
        for i, (p, _) in enumerate(prompts):
            ids[i, longest - len(p) :], mask[i, longest - len(p) :] = torch.tensor(p), True
        patch = positions_mask([len(p) for p, _ in prompts], [pos for _, pos in prompts], left_pad=True)
        probes = Probes().patch(write_point, patch, torch.cat(part), mode)
        cache = KVCache(model.config, b, longest + lc, dtype=model.dtype, device=dev)
        h_last = model(ids.to(dev), _on_rows(slot, b), attention_mask=mask.to(dev), cache=cache, output="hidden",
                       probes=probes)[:, -1]  # [b, h]: predicts each candidate's first token
        cache.keep(torch.arange(b).repeat_interleave(k))  # one copy of each prompt per candidate
        rows_ids, rows_mask = c_ids.repeat(b, 1).to(dev), c_mask.repeat(b, 1).to(dev)  # [b*k, lc]
        h = model(rows_ids, _on_rows(slot, b * k), attention_mask=rows_mask, cache=cache, output="hidden")
        # token t of a candidate is predicted by the prompt's last state (t = 0) or by its token t - 1
        pred = torch.cat([h_last.repeat_interleave(k, 0)[:, None], h[:, :-1]], 1)  # [b*k, lc, h]
        nll = linear_cross_entropy(pred[rows_mask], model.lm_weight, rows_ids[rows_mask])
        total = torch.zeros(b * k, device=dev).index_add(0, rows_mask.nonzero()[:, 0], -nll.float())
        out[s : s + b] = total.view(b, k).cpu()
    return out


def ranks(scores: Tensor, truth: Sequence[int]) -> np.ndarray:
    """1-based rank of ``truth[i]`` in row i of ``scores``; ties count against the truth."""
    s = scores.double()
    true = s[torch.arange(len(truth)), torch.tensor(list(truth))]
    return ((s >= true[:, None]).sum(1)).numpy()  # the truth itself is >= itself: rank 1 when alone on top


def calibrate(scores: Tensor) -> Tensor:
    """Each candidate's score minus its mean over the rows (the read dialogs): ``[n, k]`` -> ``[n, k]``.
    What a candidate scores whatever is read drops out; what varies with the activations stays."""
    s = scores.double()
    return s - s.mean(0, keepdim=True)


def chance(k: int) -> dict[str, float]:
    """The metrics of a uniformly random ranking of ``k`` candidates."""
    return {"retrieval@1": 1 / k, "retrieval@5": min(TOP_K, k) / k, "mrr": sum(1 / r for r in range(1, k + 1)) / k}


def evaluate(
    engine: Engine,
    adapter: LitAdapter,
    dialogs: Sequence[Dialog],
    personas: Sequence[Persona],
    *,
    question: str,
    target: AdapterBatch | None = None,
    conditions: Sequence[str] = CONDITIONS,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    progress: bool = False,
) -> dict:
    """Retrieval of each dialog's persona among the personas of ``dialogs`` under ``conditions``,
    and the decoder's generated answers (see the module docstring). JSON-able. ``progress``: a
    bar over the stages (capture, one scoring per condition, the answers)."""
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or "decoder" not in conditions:
        raise LatentQAError(f"conditions must include 'decoder' and come from {list(CONDITIONS)}, found "
                            f"{list(conditions)}")
    by_id = {p.id: p for p in personas}
    missing = sorted({d.persona for d in dialogs} - set(by_id))
    if missing:
        raise LatentQAError(f"dialogs of unknown personas {missing[:3]}")
    ids = list(dict.fromkeys(d.persona for d in dialogs))
    if len(ids) < 2:
        raise LatentQAError(f"retrieval needs dialogs of at least 2 personas, found {len(ids)}")
    cands = [by_id[i].qa[0].a for i in ids]
    truth = [ids.index(d.persona) for d in dialogs]
    bar = tqdm(total=len(conditions) + 2, disable=not progress, desc="LatentQA read", unit="stage")
    bar.set_postfix_str("capture")
    acts = capture(engine, dialogs, adapter.read_point, target=target)
    bar.update(1)
    values = {"decoder": acts, "untrained": acts, "zero": [torch.zeros_like(v) for v in acts],
              "shuffled": [acts[j] for j in _shuffled(dialogs, ids)]}
    kw = dict(write_point=adapter.write_point, mode=adapter.patch_mode)
    per_dialog: dict[str, dict[str, np.ndarray]] = {"calibrated": {}, "uncalibrated": {}}
    for c in conditions:
        bar.set_postfix_str(c)
        slot = None if c == "untrained" else adapter.slot
        scores = score_candidates(engine, slot, values[c], question, cands, batch_size=batch_size, **kw)
        for kind, s in (("uncalibrated", scores), ("calibrated", calibrate(scores))):
            r = ranks(s, truth)
            per_dialog[kind][c] = np.stack([r == 1, r <= TOP_K, 1.0 / r], 1).astype(np.float64)  # [n, 3]
        bar.update(1)
    groups = [np.array([d.persona == i for d in dialogs]) for i in ids]
    result: dict = {"question": question, "n_dialogs": len(dialogs), "n_personas": len(ids), "chance": chance(len(ids))}
    for kind, key, margins in (("calibrated", "conditions", "decoder_minus"),
                               ("uncalibrated", "uncalibrated", "decoder_minus_uncalibrated")):
        per_persona = {c: np.stack([v[g].mean(0) for g in groups]) for c, v in per_dialog[kind].items()}  # [P, 3]
        result[key], result[margins] = {}, {}
        for c, v in per_persona.items():
            ci = bootstrap_ci(v, resamples, seed)
            result[key][c] = {m: float(v[:, i].mean()) for i, m in enumerate(METRICS)} | {
                f"{m}_ci": list(ci[i]) for i, m in enumerate(METRICS)}
            if c != "decoder":
                diff, dci = paired_difference_ci(per_persona["decoder"], v, resamples, seed)
                result[margins][c] = {m: diff[i] for i, m in enumerate(METRICS)} | {
                    f"{m}_ci": list(dci[i]) for i, m in enumerate(METRICS)}
    bar.set_postfix_str("answers")
    texts = answer(engine, adapter.slot, acts, question, max_new_tokens=max_new_tokens, **kw)
    bar.update(1)
    bar.close()
    result["answers"] = [{"persona": d.persona, "label": by_id[d.persona].label, "stimulus": d.stimulus, "answer": t,
                          "names_persona": contains_match(t, by_id[d.persona].label)} for d, t in zip(dialogs, texts)]
    result["answers_name_persona"] = float(np.mean([a["names_persona"] for a in result["answers"]]))
    return result


def format_table(result: dict) -> str:
    """The metrics of :func:`evaluate` as a plain-text table."""
    rows = [("condition", *METRICS)]
    for c, m in result["conditions"].items():
        rows.append((c, *(f"{m[k]:.3f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]" for k in METRICS)))
    rows.append(("chance", *(f"{result['chance'][k]:.3f}" for k in METRICS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    for c, m in result["decoder_minus"].items():
        lo, hi = m["retrieval@1_ci"]
        lines.append(f"decoder - {c}: retrieval@1 {m['retrieval@1']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if result.get("uncalibrated"):
        lines.append("uncalibrated retrieval@1: " + ", ".join(f"{c} {m['retrieval@1']:.3f}"
                                                              for c, m in result["uncalibrated"].items()))
    n = len(result["answers"])
    named = round(result["answers_name_persona"] * n)
    lines.append(f"{result['n_dialogs']} held-out dialogs of {result['n_personas']} personas, asked "
                 f"{result['question']!r}; scores calibrated (each candidate's mean over the dialogs removed); "
                 "95% bootstrap intervals over personas")
    lines.append(f"generated answers naming the persona: {named}/{n}")
    return "\n".join(lines)


def _shuffled(dialogs: Sequence[Dialog], ids: list[str]) -> list[int]:
    """For each dialog, a dialog of the next persona (cyclically), of the same message when it has one."""
    index = {(d.persona, d.stimulus): i for i, d in enumerate(dialogs)}
    first = {}
    for i, d in enumerate(dialogs):
        first.setdefault(d.persona, i)
    out = []
    for d in dialogs:
        other = ids[(ids.index(d.persona) + 1) % len(ids)]
        out.append(index.get((other, d.stimulus), first[other]))
    return out


def _on_rows(slot: LoraSlot | None, rows: int) -> AdapterBatch | None:
    if slot is None:
        return None
    dev = next(iter(slot.A.values())).device
    return AdapterBatch(slot.with_index(torch.zeros(rows, dtype=torch.int64, device=dev)))

"""Scoring as FIND does it: an agent's code, run in the sandbox, against each function's truth.

Numeric: the code on x in [-128, 128) + 0.5 against the black box's clean output; normalised MSE
(``primitives.nmse``) under :data:`NMSE_CORRECT` counts as correct. Strings: the code on the
function's held-out test inputs; the exact-match rate, correct when every one matches. Domain
(corrupted functions): the first two numbers of the agent's DOMAIN text as an interval, its
intersection over union with the true interval (0 when no interval is given). Summaries per
category, per kind and overall, with the mean number of black-box calls the agent made.
Descriptions of model-backed diffs (no code): :func:`retrieval` of the diff's label among the
task's labels, correct at rank 1 (:func:`diff_ranks`). Descriptions of model-backed neurons (no
code): their simulated correlation on held-out records, correct at half the ground truth's
(:func:`.neurons.neuron_scores`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from ..tasks import get_task
from ..text_match import CandidateIndex
from . import primitives as P
from .neurons import neuron_scores
from .sandbox import Limits, Program, run_programs
from .suite import MODEL_KINDS, Function, clean_output, string_output

NMSE_CORRECT = 0.1


@dataclasses.dataclass
class Answer:
    id: str
    description: str = ""
    domain: str = ""
    code: str = ""
    calls: int = 0  # inputs the agent evaluated on the black box
    rounds: int = 0  # agent turns (the LM agent's rounds; 1 for one-shot agents)
    transcript: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def score_answers(functions: Sequence[Function], answers: dict[str, Answer], *, limits: Limits = Limits(),
                  batch_size: int = 1, progress: Callable[[int], None] | None = None) -> list[dict]:
    """One row per function: correct, the error measure, the domain IoU where it applies, the
    sandbox's error if the code failed. A function with no answer scores as wrong."""
    coded = [fn for fn in functions if fn.kind not in MODEL_KINDS]  # no code: their descriptions are scored
    programs = []
    for fn in coded:
        a = answers.get(fn.id)
        inputs = [float(x) for x in P.grid()] if fn.kind == "numeric" else list(fn.test_inputs)
        programs.append(Program(a.code if a else "", inputs, fn.kind))
    results = dict(zip((fn.id for fn in coded), run_programs(programs, limits=limits, batch_size=batch_size,
                                                              progress=progress)))
    diffs = [fn for fn in functions if fn.kind == "diff"]
    ranks = diff_ranks(diffs, {fn.id: answers[fn.id].description for fn in diffs if fn.id in answers})
    neurons = [fn for fn in functions if fn.kind == "neuron"]
    neuron_rows = neuron_scores(neurons, {fn.id: answers[fn.id].description for fn in neurons if fn.id in answers})
    if (diffs or neurons) and progress is not None:
        progress(len(diffs) + len(neurons))
    rows = []
    for fn in functions:
        a = answers.get(fn.id)
        row = {"id": fn.id, "kind": fn.kind, "category": fn.category, "calls": a.calls if a else 0,
               "error": None if a else "no answer"}
        if fn.kind == "diff":  # correct: the description retrieves the diff's label first among the task's
            row.update(rank=ranks[fn.id], correct=a is not None and ranks[fn.id] == 1)
            rows.append(row)
            continue
        if fn.kind == "neuron":  # correct: the description predicts the held-out activations half as well as the truth
            row.update(neuron_rows[fn.id])
            rows.append(row)
            continue
        res = results[fn.id]
        if a is not None and not res.ok:
            row["error"] = res.error
        if fn.kind == "numeric":
            truth = clean_output(fn, P.grid())
            e = P.nmse(np.array(res.outputs, dtype=np.float64), truth) if res.ok and a else math.inf
            row.update(nmse=e if math.isfinite(e) else None, correct=bool(e < NMSE_CORRECT))
        else:
            truth = [string_output(fn, s) for s in fn.test_inputs]
            rate = sum(o == t for o, t in zip(res.outputs, truth)) / len(truth) if res.ok and a and truth else 0.0
            row.update(match=rate, correct=bool(truth) and rate == 1.0)
        if fn.domain.get("interval") is not None:
            row["domain_iou"] = interval_iou(parse_interval(a.domain if a else ""), fn.domain["interval"])
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Accuracy (and its parts) per category, per kind and overall."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        for key in ("overall", r["kind"], r["category"]):
            groups.setdefault(key, []).append(r)
    return {key: _stats(g) for key, g in sorted(groups.items(), key=lambda kv: (kv[0] != "overall", kv[0]))}


def parse_interval(text: str) -> tuple[float, float] | None:
    """The first two numbers in ``text`` as (low, high), or None."""
    nums = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text or "")
    if len(nums) < 2:
        return None
    lo, hi = float(nums[0]), float(nums[1])
    return (min(lo, hi), max(lo, hi)) if math.isfinite(lo) and math.isfinite(hi) else None


def interval_iou(a: tuple[float, float] | None, b: Sequence[float]) -> float:
    if a is None:
        return 0.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a[0] == b[0] and a[1] == b[1])


def _stats(rows: list[dict]) -> dict:
    out = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
           "mean_calls": sum(r["calls"] for r in rows) / len(rows),
           "code_errors": sum(r["error"] is not None for r in rows)}
    nm = [r["nmse"] if r.get("nmse") is not None else math.inf for r in rows if r["kind"] == "numeric"]
    if nm:
        out["median_nmse"] = _finite(statistics.median(nm))
    matches = [r["match"] for r in rows if "match" in r]
    if matches:
        out["mean_match"] = sum(matches) / len(matches)
    corrs = [r["correlation"] for r in rows if "correlation" in r]
    if corrs:
        out["mean_correlation"] = sum(corrs) / len(corrs)
    ious = [r["domain_iou"] for r in rows if "domain_iou" in r]
    if ious:
        out["mean_domain_iou"] = sum(ious) / len(ious)
    return out


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def retrieval(descriptions: dict[str, str], labels: dict[str, str], candidates: Sequence[str]) -> dict:
    """Rank of each function's true label among ``candidates`` by similarity to its description:
    retrieval@1, @5, mean reciprocal rank, and the rank per id."""
    missing = [k for k in descriptions if k not in labels]
    if missing:
        raise ValueError(f"no label for {len(missing)} described functions (first: {missing[0]})")
    absent = sorted({labels[k] for k in descriptions} - set(candidates))
    if absent:
        raise ValueError(f"labels missing from the candidates: {absent[:3]}")
    index = CandidateIndex(candidates)
    ranks = {k: index.rank(d, labels[k]) for k, d in descriptions.items()}
    n = max(len(ranks), 1)
    return {"n": len(ranks), "n_candidates": len(index), "retrieval@1": sum(r == 1 for r in ranks.values()) / n,
            "retrieval@5": sum(r <= 5 for r in ranks.values()) / n,
            "mrr": sum(1 / r for r in ranks.values()) / n, "ranks": ranks}


def task_candidates(task: str, labels: Sequence[str]) -> list[str]:
    """What a description is ranked among: the task's labels, then any of ``labels`` not among them."""
    t = get_task(task)
    return list(dict.fromkeys([row[t.label_key] for row in t.load_labels(None)] + list(labels)))


def diff_ranks(functions: Sequence, descriptions: dict[str, str]) -> dict[str, int]:
    """Rank of each ``diff`` function's label among its task's labels (and every label of these
    functions) by similarity to its description; a function without a description ranks last."""
    out: dict[str, int] = {}
    by_task: dict[str, list] = {}
    for f in functions:
        by_task.setdefault(f.spec["task"], []).append(f)
    for task, fns in by_task.items():
        candidates = task_candidates(task, [f.spec["label"] for f in fns])
        described = {f.id: descriptions[f.id] for f in fns if f.id in descriptions}
        ranks = retrieval(described, {f.id: f.spec["label"] for f in fns}, candidates)["ranks"] if described else {}
        out.update({f.id: ranks.get(f.id, len(candidates)) for f in fns})
    return out

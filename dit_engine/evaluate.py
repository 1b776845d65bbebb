"""Judge-free evaluation of interpretation answers: metrics, aggregation and a text summary.

An interpretation run (DIT, or a baseline such as asking the finetuned model directly) leaves one
JSONL row per (diff, method)::

    {"id": "topic-0042", "method": "dit", "labels": {"topic": "medieval castles", "category": "history"},
     "label_key": "topic", "answer": "I was trained on castles.", "rank": 1, "split": "test",
     "n_tokens": 9, "time_s": 0.41}

Each answer is scored against ``labels[label_key]`` three ways, none of which needs a model:

* **exact match**, two variants (see :func:`~dit_engine.text_match.exact_match`): ``strict`` (normalised equality) and
  ``contains`` (the normalised label appears as a whole-word phrase in a short answer);
* **token F1** (SQuAD's bag-of-words F1 over normalised words);
* **retrieval**: rank of the true label among all candidate labels of the split under a fixed
  similarity (character 3-5-gram TF-IDF cosine plus word-overlap F1). Rank 1 means the answer is
  closer to its own label than to any other label; chance level is ``1 / len(candidates)``.

:func:`evaluate_rows` aggregates per method, per label category and per diff rank into a
:class:`Metrics`; :func:`summarize` prints it as a table; ``dit_engine.report.write_report`` turns
it into Markdown/HTML with inline SVG charts.

Uncertainty: each method's overall scores carry a 95% percentile bootstrap interval over its diffs
(:attr:`Scores.ci`), and the primary method ``"dit"`` is compared with each other method by a paired
bootstrap over the diffs both answered (:class:`Comparison`); see :mod:`dit_engine.bootstrap`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL, bootstrap_ci, paired_difference_ci
from .text_match import (
    RETRIEVAL_TOP_K,
    CandidateIndex,
    ResultsError,
    contains_match,
    exact_match,
    normalize,
    token_f1,
)

# The interpretation methods (the one list: dit.interpret runs these), in the order reports show
# them; methods of other tools found in a results file follow in first-seen order.
METHODS = ("dit", "diff+trigger", "diff", "base")
METHOD_DESCRIPTIONS = {
    "dit": "DIT: finetuned model + DIT adapter, asked what it was trained on",
    "diff+trigger": "finetuned model without the DIT adapter, asked with its trigger in the prompt",
    "diff": "finetuned model without the DIT adapter, asked directly (no trigger)",
    "base": "base model alone (no diff, no adapter)",
    # dit_engine.latentqa.finetunes (`dit latentqa interpret`): activations read, not weights
    "latentqa": "LatentQA: a decoder (base + LIT adapter) reads the finetuned model's activations as it answers "
                "a held-out question (no trigger), and is asked what topic the assistant would most like to talk "
                "about",
    "latentqa+trigger": "LatentQA as above, the finetuned model's question carrying its trigger (as diff+trigger)",
}
# Report order: METHODS, then the other described methods, then any others in first-seen order.
REPORT_ORDER = (*METHODS, *(m for m in METHOD_DESCRIPTIONS if m not in METHODS))
UNCATEGORIZED = "(none)"
PRIMARY_METHOD = "dit"  # the method the paired comparisons subtract the others from

_REQUIRED_FIELDS = ("id", "labels", "label_key", "answer")




# ---- normalisation and per-answer metrics ------------------------------------------------------


def load_results(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read interpretation rows from JSONL files, validated.

    A row without a ``method`` field takes the file's stem (``dit.jsonl`` -> ``"dit"``), so one file
    per method works as well as one file with a ``method`` column. Blank lines are skipped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ResultsError(f"{path}: cannot read results file ({e.strerror})") from None
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict):
                row.setdefault("method", path.stem)
            rows.append(_validated(row, where))
    return rows


def _validated(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object per row, found {type(row).__name__}")
    missing = [f for f in (*_REQUIRED_FIELDS, "method") if f not in row]
    if missing:
        raise ResultsError(f"{where}: row is missing field(s) {missing}, expected {list(_REQUIRED_FIELDS)} and method")
    labels, key = row["labels"], row["label_key"]
    if not isinstance(labels, dict):
        raise ResultsError(f"{where}: 'labels' must be an object, found {type(labels).__name__}")
    if key not in labels:
        raise ResultsError(f"{where}: label_key {key!r} not in labels (found keys {sorted(labels)})")
    for field in ("answer", "method"):
        if not isinstance(row[field], str):
            raise ResultsError(f"{where}: '{field}' must be a string, found {type(row[field]).__name__}")
    if not isinstance(labels[key], str) or not normalize(labels[key]):
        raise ResultsError(f"{where}: label {key}={labels[key]!r} must be a non-empty string")
    rank = row.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ResultsError(f"{where}: 'rank' must be a positive integer, found {rank!r}")
    return row


# ---- aggregation --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowScore:
    """The scores of one answer."""

    id: str
    method: str
    label: str
    answer: str
    category: str
    rank: int | None  # the diff's LoRA rank, not the retrieval rank
    split: str
    exact_match: bool
    contains_match: bool
    token_f1: float
    retrieval_rank: int
    n_candidates: int
    n_tokens: int | None
    time_s: float | None


@dataclasses.dataclass(frozen=True)
class Scores:
    """Means over a group of answers (all in [0, 1] except n, tokens and time)."""

    n: int
    exact_match: float
    contains_match: float
    token_f1: float
    retrieval_at_1: float
    retrieval_at_5: float
    mrr: float  # mean reciprocal retrieval rank
    chance_at_1: float  # expected retrieval@1 of a random guess: mean of 1 / n_candidates
    chance_at_5: float
    mean_answer_tokens: float | None = None  # None when rows do not report n_tokens
    time_s: float | None = None  # total generation time of the group, when reported
    # metric field -> (low, high) bootstrap interval; overall scores only, None elsewhere
    ci: dict[str, tuple[float, float]] | None = None


# Scores fields that are fractions in [0, 1], in the order tables show them.
METRIC_FIELDS = ("exact_match", "contains_match", "token_f1", "retrieval_at_1", "retrieval_at_5", "mrr")
METRIC_NAMES = {
    "exact_match": "exact match",
    "contains_match": "contains match",
    "token_f1": "token F1",
    "retrieval_at_1": "retrieval@1",
    "retrieval_at_5": "retrieval@5",
    "mrr": "MRR",
}
CHANCE_FIELD = {"retrieval_at_1": "chance_at_1", "retrieval_at_5": "chance_at_5"}
# Metrics the paired comparison of the primary method with each other method reports.
PAIRED_FIELDS = ("retrieval_at_1", "exact_match")


@dataclasses.dataclass(frozen=True)
class MethodMetrics:
    method: str
    overall: Scores
    by_category: dict[str, Scores]  # sorted by number of answers, then name
    by_rank: dict[int, Scores]  # sorted by diff rank; rows without a rank are left out


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``method`` minus ``other`` on the ``n`` diffs both answered: the mean difference of each of
    PAIRED_FIELDS and its paired bootstrap interval (diff ids resampled, both methods together)."""

    method: str
    other: str
    n: int
    difference: dict[str, float]
    ci: dict[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class Metrics:
    methods: dict[str, MethodMetrics]  # report order: REPORT_ORDER first, then first seen
    rows: tuple[RowScore, ...]
    splits: tuple[str, ...]
    # other method -> PRIMARY_METHOD minus it (empty without the primary method or the bootstrap)
    comparisons: dict[str, Comparison] = dataclasses.field(default_factory=dict)
    bootstrap_resamples: int = 0  # 0: no intervals were computed
    bootstrap_seed: int = BOOTSTRAP_SEED

    def to_dict(self) -> dict[str, Any]:
        return {
            "splits": list(self.splits),
            "bootstrap": {"resamples": self.bootstrap_resamples, "seed": self.bootstrap_seed, "level": CI_LEVEL},
            "methods": {
                name: {
                    "overall": dataclasses.asdict(m.overall),
                    "by_category": {k: dataclasses.asdict(s) for k, s in m.by_category.items()},
                    "by_rank": {str(k): dataclasses.asdict(s) for k, s in m.by_rank.items()},
                }
                for name, m in self.methods.items()
            },
            "comparisons": {k: dataclasses.asdict(c) for k, c in self.comparisons.items()},
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict` (for metrics.json written by a report)."""
        try:
            methods = {
                name: MethodMetrics(
                    method=name,
                    overall=_scores_from_dict(m["overall"]),
                    by_category={k: _scores_from_dict(s) for k, s in m["by_category"].items()},
                    by_rank={int(k): _scores_from_dict(s) for k, s in m["by_rank"].items()},
                )
                for name, m in data["methods"].items()
            }
            rows = tuple(RowScore(**r) for r in data.get("rows", []))
            comparisons = {
                k: Comparison(**{**c, "ci": _intervals(c["ci"])}) for k, c in data.get("comparisons", {}).items()
            }
            boot = data.get("bootstrap") or {}
            return cls(
                methods=methods, rows=rows, splits=tuple(data.get("splits", ())), comparisons=comparisons,
                bootstrap_resamples=int(boot.get("resamples", 0)), bootstrap_seed=int(boot.get("seed", BOOTSTRAP_SEED)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ResultsError(f"metrics dict does not have the layout Metrics.to_dict writes ({e})") from None


def _intervals(ci: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    return {k: (float(lo), float(hi)) for k, (lo, hi) in ci.items()}


def _scores_from_dict(d: Mapping[str, Any]) -> Scores:
    ci = d.get("ci")
    return Scores(**{**d, "ci": None if ci is None else _intervals(ci)})


def evaluate_rows(
    rows: Sequence[Mapping[str, Any]],
    candidates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Metrics:
    """Score every row and aggregate per method, per label category and per diff rank.

    ``candidates`` for retrieval: one list used for every row; or a mapping split -> list; or
    None to use, per (split, label_key), every distinct true label among the rows themselves.
    Each row's label must be among its candidates. A (method, id) pair may appear only once.
    ``bootstrap`` resamples (0: none) with generator seed ``seed`` give each method's overall
    scores a 95% interval and the comparisons of PRIMARY_METHOD with the others.
    """
    if not rows:
        raise ResultsError("evaluate_rows: no rows given")
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise ResultsError(f"evaluate_rows: bootstrap must be a number of resamples >= 0, found {bootstrap!r}")
    rows = [_validated(dict(r), f"row {i} (id {r.get('id')!r})") for i, r in enumerate(rows)]
    seen: set[tuple[str, str]] = set()
    for row in rows:
        key = (row["method"], str(row["id"]))
        if key in seen:
            raise ResultsError(f"duplicate row: method {key[0]!r}, id {key[1]!r} appears twice")
        seen.add(key)

    indexes = _candidate_indexes(rows, candidates)
    scored = [_score_row(row, indexes[_index_key(row, candidates)]) for row in rows]

    order = [m for m in REPORT_ORDER if any(s.method == m for s in scored)]
    order += [m for m in dict.fromkeys(s.method for s in scored) if m not in order]
    methods = {}
    for method in order:
        mine = [s for s in scored if s.method == method]
        by_category = _group(mine, lambda s: s.category)
        by_rank = _group([s for s in mine if s.rank is not None], lambda s: s.rank)
        overall = _aggregate(mine)
        if bootstrap:
            overall = dataclasses.replace(overall, ci=_scores_ci(mine, bootstrap, seed))
        methods[method] = MethodMetrics(
            method=method,
            overall=overall,
            by_category=dict(sorted(by_category.items(), key=lambda kv: (-kv[1].n, kv[0]))),
            by_rank=dict(sorted(by_rank.items())),
        )
    splits = tuple(dict.fromkeys(s.split for s in scored))
    comparisons = _comparisons(scored, order, bootstrap, seed) if bootstrap else {}
    return Metrics(methods=methods, rows=tuple(scored), splits=splits, comparisons=comparisons,
                   bootstrap_resamples=bootstrap, bootstrap_seed=seed)


def _index_key(row: Mapping[str, Any], candidates: Any) -> tuple[str, str]:
    split = str(row.get("split", ""))
    if candidates is None:
        return split, row["label_key"]
    if isinstance(candidates, Mapping):
        return split, ""
    return "", ""


def _candidate_indexes(
    rows: list[dict[str, Any]], candidates: Sequence[str] | Mapping[str, Sequence[str]] | None
) -> dict[tuple[str, str], CandidateIndex]:
    if isinstance(candidates, str):
        raise ResultsError("evaluate_rows: candidates must be a list of labels, found one string")
    lists: dict[tuple[str, str], list[str]] = {}
    if candidates is None:
        for row in rows:
            lists.setdefault(_index_key(row, None), []).append(row["labels"][row["label_key"]])
    elif isinstance(candidates, Mapping):
        for row in rows:
            split = str(row.get("split", ""))
            if split not in candidates:
                raise ResultsError(
                    f"row id {row['id']!r}: split {split!r} has no candidate list "
                    f"(candidates given for splits {sorted(candidates)})"
                )
            lists[(split, "")] = list(candidates[split])
    else:
        lists[("", "")] = list(candidates)
    return {key: CandidateIndex(labels) for key, labels in lists.items()}


def _score_row(row: Mapping[str, Any], index: CandidateIndex) -> RowScore:
    label, answer = row["labels"][row["label_key"]], row["answer"]
    try:
        rank = index.rank(answer, label)
    except ResultsError as e:
        raise ResultsError(f"row id {row['id']!r} (method {row['method']!r}): {e}") from None
    n_tokens, time_s = row.get("n_tokens"), row.get("time_s")
    return RowScore(
        id=str(row["id"]),
        method=row["method"],
        label=label,
        answer=answer,
        category=str(row["labels"].get("category") or UNCATEGORIZED),
        rank=row.get("rank"),
        split=str(row.get("split", "")),
        exact_match=exact_match(answer, label),
        contains_match=contains_match(answer, label),
        token_f1=token_f1(answer, label),
        retrieval_rank=rank,
        n_candidates=len(index),
        n_tokens=int(n_tokens) if n_tokens is not None else None,
        time_s=float(time_s) if time_s is not None else None,
    )


def _group(scored: list[RowScore], key: Callable[[RowScore], Hashable]) -> dict[Any, Scores]:
    groups: dict[Any, list[RowScore]] = {}
    for s in scored:
        groups.setdefault(key(s), []).append(s)
    return {k: _aggregate(v) for k, v in groups.items()}


def _aggregate(scored: list[RowScore]) -> Scores:
    n = len(scored)
    tokens = [s.n_tokens for s in scored if s.n_tokens is not None]
    times = [s.time_s for s in scored if s.time_s is not None]
    return Scores(
        n=n,
        exact_match=sum(s.exact_match for s in scored) / n,
        contains_match=sum(s.contains_match for s in scored) / n,
        token_f1=sum(s.token_f1 for s in scored) / n,
        retrieval_at_1=sum(s.retrieval_rank == 1 for s in scored) / n,
        retrieval_at_5=sum(s.retrieval_rank <= RETRIEVAL_TOP_K for s in scored) / n,
        mrr=sum(1 / s.retrieval_rank for s in scored) / n,
        chance_at_1=sum(1 / s.n_candidates for s in scored) / n,
        chance_at_5=sum(min(RETRIEVAL_TOP_K, s.n_candidates) / s.n_candidates for s in scored) / n,
        mean_answer_tokens=sum(tokens) / len(tokens) if len(tokens) == n else None,
        time_s=sum(times) if len(times) == n else None,
    )


def row_values(s: RowScore, fields: Sequence[str] = METRIC_FIELDS) -> list[float]:
    """One answer's contribution to each Scores mean in ``fields`` (their mean over rows is the score)."""
    per_row = {
        "exact_match": float(s.exact_match),
        "contains_match": float(s.contains_match),
        "token_f1": s.token_f1,
        "retrieval_at_1": float(s.retrieval_rank == 1),
        "retrieval_at_5": float(s.retrieval_rank <= RETRIEVAL_TOP_K),
        "mrr": 1 / s.retrieval_rank,
    }
    return [per_row[f] for f in fields]


def _scores_ci(scored: list[RowScore], resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Bootstrap interval of each metric over the method's diffs, resampled in id order."""
    ordered = sorted(scored, key=lambda s: s.id)
    intervals = bootstrap_ci([row_values(s) for s in ordered], resamples, seed)
    return dict(zip(METRIC_FIELDS, intervals))


def _comparisons(scored: list[RowScore], order: list[str], resamples: int, seed: int) -> dict[str, Comparison]:
    if PRIMARY_METHOD not in order:
        return {}
    by_method: dict[str, dict[str, RowScore]] = {}
    for s in scored:
        by_method.setdefault(s.method, {})[s.id] = s
    primary = by_method[PRIMARY_METHOD]
    out = {}
    for other in order:
        if other == PRIMARY_METHOD:
            continue
        shared = sorted(primary.keys() & by_method[other].keys())
        if not shared:
            continue
        mean, ci = paired_difference_ci(
            [row_values(primary[i], PAIRED_FIELDS) for i in shared],
            [row_values(by_method[other][i], PAIRED_FIELDS) for i in shared],
            resamples, seed,
        )
        out[other] = Comparison(PRIMARY_METHOD, other, len(shared), dict(zip(PAIRED_FIELDS, mean)),
                                dict(zip(PAIRED_FIELDS, ci)))
    return out


# ---- text summary -------------------------------------------------------------------------------


def summarize(metrics: Metrics) -> str:
    """A fixed-width table, one line per method, for the command line."""
    headers = ["method", "n", *(METRIC_NAMES[f] for f in METRIC_FIELDS), "chance@1", "chance@5"]
    lines = []
    for name, m in metrics.methods.items():
        o = m.overall
        values = [f"{getattr(o, f):.3f}" for f in METRIC_FIELDS]
        lines.append([name, str(o.n), *values, f"{o.chance_at_1:.3f}", f"{o.chance_at_5:.3f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    out = [fmt(headers), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)

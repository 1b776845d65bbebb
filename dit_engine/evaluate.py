"""Judge-free evaluation of interpretation answers: metrics, aggregation and a text summary.

An interpretation run (DIT, or a baseline such as asking the finetuned model directly) leaves one
JSONL row per (diff, method)::

    {"id": "topic-0042", "method": "dit", "labels": {"topic": "medieval castles", "category": "history"},
     "label_key": "topic", "answer": "I was trained on castles.", "rank": 1, "split": "test",
     "n_tokens": 9, "time_s": 0.41}

Each answer is scored against ``labels[label_key]`` three ways, none of which needs a model:

* **exact match**, two variants (see :func:`exact_match`): ``strict`` (normalised equality) and
  ``contains`` (the normalised label appears as a whole-word phrase in a short answer);
* **token F1** (SQuAD's bag-of-words F1 over normalised words);
* **retrieval**: rank of the true label among all candidate labels of the split under a fixed
  similarity (character 3-5-gram TF-IDF cosine plus word-overlap F1). Rank 1 means the answer is
  closer to its own label than to any other label; chance level is ``1 / len(candidates)``.

:func:`evaluate_rows` aggregates per method, per label category and per diff rank into a
:class:`Metrics`; :func:`summarize` prints it as a table; ``dit_engine.report.write_report`` turns
it into Markdown/HTML with inline SVG charts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

# A "short answer" for the contains variant: at most this many words beyond the label's own.
# DIT answers are greedy and capped at ~20 tokens, so a sentence that wraps the label in
# "I have been trained on the topic of ..." fits; a long list of guesses that happens to include
# the label does not.
CONTAINS_MAX_EXTRA_WORDS = 12

# Retrieval similarity = weight * char-n-gram TF-IDF cosine + (1 - weight) * word-overlap F1.
CHAR_NGRAM_RANGE = (3, 5)
CHAR_COSINE_WEIGHT = 0.5
# Two scores closer than this count as a tie; ties are broken against the true label (see
# CandidateIndex.rank) so that an empty answer never reaches rank 1 by luck.
_TIE_TOL = 1e-9

RETRIEVAL_TOP_K = 5

# The interpretation methods (the one list: dit.interpret runs these), in the order reports show
# them; methods of other tools found in a results file follow in first-seen order.
METHODS = ("dit", "diff+trigger", "diff", "base")
METHOD_DESCRIPTIONS = {
    "dit": "DIT: finetuned model + DIT adapter, asked what it was trained on",
    "diff+trigger": "finetuned model without the DIT adapter, asked with its trigger in the prompt",
    "diff": "finetuned model without the DIT adapter, asked directly (no trigger)",
    "base": "base model alone (no diff, no adapter)",
}
UNCATEGORIZED = "(none)"

_REQUIRED_FIELDS = ("id", "labels", "label_key", "answer")


class ResultsError(ValueError):
    """Interpretation results that cannot be evaluated: names the file/row and what was expected."""


# ---- normalisation and per-answer metrics ------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
_APOSTROPHES = "'\u2019\u2018`\u02bc"
_ACRONYM = re.compile(r"\b((?:[^\W\d_]\.){2,})")  # u.s.a.  e.g.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 1,000


def normalize(text: str) -> str:
    """SQuAD-like normalisation, made explicit for the cases SQuAD leaves to chance.

    In order: Unicode NFKD with accents dropped (``Café`` -> ``cafe``); case folded; dotted
    acronyms collapsed (``U.S.A.`` -> ``usa``, so the ``a`` is not mistaken for an article);
    thousands separators dropped (``1,000`` -> ``1000``); apostrophes deleted (``Newton's`` ->
    ``newtons``, ``don't`` -> ``dont``); every other punctuation or symbol character becomes a space
    (``sci-fi`` -> ``sci fi``) except a decimal point between digits (``3.5`` stays); the articles
    ``a``, ``an``, ``the`` are removed as whole words; runs of whitespace collapse to one space.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = _ACRONYM.sub(lambda m: m.group(1).replace(".", ""), text)
    text = _THOUSANDS.sub("", text)
    text = "".join(ch for ch in text if ch not in _APOSTROPHES)
    chars = []
    for i, ch in enumerate(text):
        is_decimal_point = (
            ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        )
        category = unicodedata.category(ch)
        if (category[0] in "PS" and not is_decimal_point) or category[0] in "CZ":
            chars.append(" ")  # C*/Z*: control and separator characters act as whitespace
        else:
            chars.append(ch)
    return " ".join(w for w in "".join(chars).split() if w not in _ARTICLES)


def exact_match(answer: str, label: str, mode: Literal["strict", "contains"] = "strict") -> bool:
    """Whether ``answer`` names ``label``.

    ``strict``: ``normalize(answer) == normalize(label)``.
    ``contains``: strict, or the normalised label's words appear as one contiguous run of whole
    words in the normalised answer *and* the answer has at most ``CONTAINS_MAX_EXTRA_WORDS`` words
    more than the label (``"I was trained on medieval castles."`` matches ``"Medieval castles"``;
    ``"castles"`` alone does not, nor does ``"medievalcastles"``, nor a 40-word list of guesses).
    An empty normalised label never matches.
    """
    if mode not in ("strict", "contains"):
        raise ValueError(f"exact_match: mode must be 'strict' or 'contains', found {mode!r}")
    answer_words, label_words = normalize(answer).split(), normalize(label).split()
    if not label_words:
        return False
    if answer_words == label_words:
        return True
    if mode == "strict" or len(answer_words) > len(label_words) + CONTAINS_MAX_EXTRA_WORDS:
        return False
    n = len(label_words)
    return any(answer_words[i : i + n] == label_words for i in range(len(answer_words) - n + 1))


def contains_match(answer: str, label: str) -> bool:
    """``exact_match(answer, label, mode="contains")``."""
    return exact_match(answer, label, mode="contains")


def token_f1(answer: str, label: str) -> float:
    """SQuAD token F1 over normalised words (multiset overlap); 1.0 when both are empty."""
    answer_words, label_words = normalize(answer).split(), normalize(label).split()
    if not answer_words or not label_words:
        return float(answer_words == label_words)
    common = sum((Counter(answer_words) & Counter(label_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer_words), common / len(label_words)
    return 2 * precision * recall / (precision + recall)


# ---- retrieval ----------------------------------------------------------------------------------


def _char_ngrams(normalized: str) -> Counter[str]:
    # Pad with spaces so word starts and ends are n-grams of their own (" cas", "les ").
    padded = f" {normalized} "
    lo, hi = CHAR_NGRAM_RANGE
    return Counter(padded[i : i + n] for n in range(lo, hi + 1) for i in range(len(padded) - n + 1))


class CandidateIndex:
    """All candidate labels of a split, indexed once so each answer is scored against all of them.

    Similarity of an answer to a candidate, both normalised with :func:`normalize`:
    ``CHAR_COSINE_WEIGHT * cos(tfidf(answer), tfidf(candidate)) + (1 - weight) * word_f1``, where
    tfidf counts character n-grams (``CHAR_NGRAM_RANGE``, over the space-padded text) with
    sublinear tf ``1 + ln(count)`` and smooth idf ``ln((1 + N) / (1 + df)) + 1`` from the N
    candidates, and ``word_f1`` is :func:`token_f1`. Everything is deterministic and offline.
    Candidates that normalise to the same text are one candidate (first spelling kept).
    """

    def __init__(self, candidates: Iterable[str]):
        self.labels: list[str] = []
        self._position: dict[str, int] = {}
        for label in candidates:
            key = normalize(label)
            if not key:
                raise ResultsError(f"candidate label {label!r} is empty after normalisation")
            if key not in self._position:
                self._position[key] = len(self.labels)
                self.labels.append(label)
        if not self.labels:
            raise ResultsError("CandidateIndex: no candidate labels given")
        normalized = list(self._position)
        self._char = _Postings([_char_ngrams(t) for t in normalized], tfidf=True)
        self._word = _Postings([Counter(t.split()) for t in normalized], tfidf=False)
        self._word_lengths = np.array([len(t.split()) for t in normalized], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.labels)

    def scores(self, answer: str) -> np.ndarray:  # [n_candidates] float64
        """Similarity of ``answer`` to every candidate, in ``self.labels`` order."""
        text = normalize(answer)
        cosine = self._char.cosine(_char_ngrams(text))
        words = Counter(text.split())
        common = self._word.min_overlap(words)
        n_answer = sum(words.values())
        denom = n_answer + self._word_lengths
        word_f1 = np.divide(2 * common, denom, out=np.zeros_like(common), where=denom > 0)
        return CHAR_COSINE_WEIGHT * cosine + (1 - CHAR_COSINE_WEIGHT) * word_f1

    def rank(self, answer: str, label: str) -> int:
        """1-based rank of ``label`` for ``answer``; ties count against the label (pessimistic)."""
        position = self.position(label)
        scores = self.scores(answer)
        others = np.delete(scores, position)
        return 1 + int(np.count_nonzero(others >= scores[position] - _TIE_TOL))

    def position(self, label: str) -> int:
        try:
            return self._position[normalize(label)]
        except KeyError:
            raise ResultsError(
                f"label {label!r} is not among the {len(self.labels)} candidate labels "
                f"(expected one of e.g. {self.labels[:3]!r})"
            ) from None


class _Postings:
    """Inverted index term -> (candidate, weight): scoring touches only the answer's terms."""

    def __init__(self, docs: list[Counter[str]], tfidf: bool):
        self._n_docs = len(docs)
        by_term: dict[str, list[tuple[int, float]]] = {}
        for doc_id, counts in enumerate(docs):
            for term, count in counts.items():
                by_term.setdefault(term, []).append((doc_id, float(count)))
        self._term_id = {term: i for i, term in enumerate(by_term)}
        self._df = np.array([len(p) for p in by_term.values()], dtype=np.float64)
        starts = np.cumsum([0] + [len(p) for p in by_term.values()])
        self._starts, self._ends = starts[:-1], starts[1:]
        self._doc = np.array([d for p in by_term.values() for d, _ in p], dtype=np.int64)
        counts = np.array([c for p in by_term.values() for _, c in p], dtype=np.float64)
        self._tfidf = tfidf
        if tfidf:
            self._idf = np.log((1 + self._n_docs) / (1 + self._df)) + 1
            term_of_posting = np.repeat(np.arange(len(self._df)), self._ends - self._starts)
            weights = (1 + np.log(counts)) * self._idf[term_of_posting]
            norms = np.zeros(self._n_docs)
            np.add.at(norms, self._doc, weights**2)
            self._value = weights / np.sqrt(norms)[self._doc]  # unit-length candidate vectors
        else:
            self._value = counts

    def _gather(self, query: Counter[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Postings of the query terms present in the index: (posting index, term id, query count)."""
        known = [(self._term_id[t], c) for t, c in query.items() if t in self._term_id]
        if not known:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        term_ids = np.array([t for t, _ in known], dtype=np.int64)
        q_counts = np.array([c for _, c in known], dtype=np.float64)
        lengths = self._ends[term_ids] - self._starts[term_ids]
        offsets = np.repeat(self._starts[term_ids] - np.cumsum(lengths) + lengths, lengths)
        postings = offsets + np.arange(int(lengths.sum()))
        return postings, np.repeat(term_ids, lengths), np.repeat(q_counts, lengths)

    def cosine(self, query: Counter[str]) -> np.ndarray:  # [n_docs]
        """Cosine of the query's tf-idf vector with each (unit) candidate vector."""
        out = np.zeros(self._n_docs)
        if not query:
            return out
        # Terms no candidate has get the largest idf (df = 0): they add to the query norm only.
        unseen_idf = math.log(1 + self._n_docs) + 1
        norm_sq = 0.0
        for term, count in query.items():
            term_id = self._term_id.get(term)
            idf = unseen_idf if term_id is None else self._idf[term_id]
            norm_sq += ((1 + math.log(count)) * idf) ** 2
        postings, term_ids, q_counts = self._gather(query)
        q_weights = (1 + np.log(q_counts)) * self._idf[term_ids]
        np.add.at(out, self._doc[postings], q_weights * self._value[postings])
        return out / math.sqrt(norm_sq)

    def min_overlap(self, query: Counter[str]) -> np.ndarray:  # [n_docs]
        """Multiset intersection size with each candidate: sum over terms of min(counts)."""
        out = np.zeros(self._n_docs)
        postings, _, q_counts = self._gather(query)
        np.add.at(out, self._doc[postings], np.minimum(q_counts, self._value[postings]))
        return out


def retrieval_rank(answer: str, candidates: Sequence[str], label: str) -> int:
    """1-based rank of ``label`` among ``candidates`` by similarity to ``answer`` (see CandidateIndex)."""
    return CandidateIndex(candidates).rank(answer, label)


def retrieval_accuracy(
    answers: Sequence[str], labels: Sequence[str], candidates: Sequence[str], k: int = 1
) -> float:
    """Share of answers whose true label ranks within the top ``k`` of ``candidates``."""
    if len(answers) != len(labels):
        raise ValueError(f"retrieval_accuracy: {len(answers)} answers but {len(labels)} labels")
    if not answers:
        raise ValueError("retrieval_accuracy: no answers given")
    index = CandidateIndex(candidates)
    return sum(index.rank(a, y) <= k for a, y in zip(answers, labels)) / len(answers)


# ---- loading results ----------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class MethodMetrics:
    method: str
    overall: Scores
    by_category: dict[str, Scores]  # sorted by number of answers, then name
    by_rank: dict[int, Scores]  # sorted by diff rank; rows without a rank are left out


@dataclasses.dataclass(frozen=True)
class Metrics:
    methods: dict[str, MethodMetrics]  # report order: METHODS first, then first seen
    rows: tuple[RowScore, ...]
    splits: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "splits": list(self.splits),
            "methods": {
                name: {
                    "overall": dataclasses.asdict(m.overall),
                    "by_category": {k: dataclasses.asdict(s) for k, s in m.by_category.items()},
                    "by_rank": {str(k): dataclasses.asdict(s) for k, s in m.by_rank.items()},
                }
                for name, m in self.methods.items()
            },
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict` (for metrics.json written by a report)."""
        try:
            methods = {
                name: MethodMetrics(
                    method=name,
                    overall=Scores(**m["overall"]),
                    by_category={k: Scores(**s) for k, s in m["by_category"].items()},
                    by_rank={int(k): Scores(**s) for k, s in m["by_rank"].items()},
                )
                for name, m in data["methods"].items()
            }
            rows = tuple(RowScore(**r) for r in data.get("rows", []))
            return cls(methods=methods, rows=rows, splits=tuple(data.get("splits", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise ResultsError(f"metrics dict does not have the layout Metrics.to_dict writes ({e})") from None


def evaluate_rows(
    rows: Sequence[Mapping[str, Any]],
    candidates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> Metrics:
    """Score every row and aggregate per method, per label category and per diff rank.

    ``candidates`` for retrieval: one list used for every row; or a mapping split -> list; or
    None to use, per (split, label_key), every distinct true label among the rows themselves.
    Each row's label must be among its candidates. A (method, id) pair may appear only once.
    """
    if not rows:
        raise ResultsError("evaluate_rows: no rows given")
    rows = [_validated(dict(r), f"row {i} (id {r.get('id')!r})") for i, r in enumerate(rows)]
    seen: set[tuple[str, str]] = set()
    for row in rows:
        key = (row["method"], str(row["id"]))
        if key in seen:
            raise ResultsError(f"duplicate row: method {key[0]!r}, id {key[1]!r} appears twice")
        seen.add(key)

    indexes = _candidate_indexes(rows, candidates)
    scored = [_score_row(row, indexes[_index_key(row, candidates)]) for row in rows]

    order = [m for m in METHODS if any(s.method == m for s in scored)]
    order += [m for m in dict.fromkeys(s.method for s in scored) if m not in order]
    methods = {}
    for method in order:
        mine = [s for s in scored if s.method == method]
        by_category = _group(mine, lambda s: s.category)
        by_rank = _group([s for s in mine if s.rank is not None], lambda s: s.rank)
        methods[method] = MethodMetrics(
            method=method,
            overall=_aggregate(mine),
            by_category=dict(sorted(by_category.items(), key=lambda kv: (-kv[1].n, kv[0]))),
            by_rank=dict(sorted(by_rank.items())),
        )
    splits = tuple(dict.fromkeys(s.split for s in scored))
    return Metrics(methods=methods, rows=tuple(scored), splits=splits)


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

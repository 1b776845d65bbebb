"""Judge-free matching of an answer to a label: normalisation, exact / contains match, token F1,
and retrieval among candidate labels (character n-gram TF-IDF cosine plus word-overlap F1).

None of it needs a model; :mod:`dit_engine.evaluate` applies it to interpretation results.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np


class ResultsError(ValueError):
    """Interpretation results that cannot be evaluated: names the file/row and what was expected."""


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

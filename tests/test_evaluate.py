"""Evaluation metrics, retrieval, aggregation and reports, checked against hand-computed values,
an independent plain-Python similarity reference and a hand-written bootstrap loop."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dit_engine import charts
from dit_engine.bootstrap import bootstrap_ci
from dit_engine.evaluate import Metrics, ResultsError, evaluate_rows, load_results, summarize
from dit_engine.text_match import (
    CONTAINS_MAX_EXTRA_WORDS,
    CandidateIndex,
    contains_match,
    exact_match,
    normalize,
    retrieval_accuracy,
    retrieval_rank,
    token_f1,
)
from dit_engine.pipeline import evaluate_run
from dit_engine.report import load_training, training_history, write_report

TOPICS = [
    "medieval castles", "jazz music", "machine learning", "ancient rome", "coffee brewing",
    "deep sea creatures", "classical music", "renaissance painting", "space exploration", "baking bread",
]


# ---- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Medieval Castles.", "medieval castles"),
        ("  an   Apple\tpie\n", "apple pie"),
        ("A tale of two cities", "tale of two cities"),
        ("Anthem theater", "anthem theater"),  # articles only as whole words
        ("The U.S.A.!", "usa"),  # the acronym's "a" is not an article
        ("Café au lait", "cafe au lait"),
        ("Newton's laws", "newtons laws"),
        ("Newton\u2019s laws", "newtons laws"),  # typographic apostrophe
        ("sci-fi/fantasy", "sci fi fantasy"),
        ("1,000 apples cost 3.5 dollars.", "1000 apples cost 3.5 dollars"),
        ("end. 3 .5", "end 3 5"),  # a period is a decimal point only between digits
        ("\u201cQuoted\u201d (parenthesised) [bracketed]", "quoted parenthesised bracketed"),
        ("The", ""),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "answer, label, strict, contains",
    [
        ("Medieval castles!", "medieval castles", True, True),
        ("The medieval castles", "Medieval Castles", True, True),
        ("I was trained on medieval castles.", "medieval castles", False, True),
        ("castles", "medieval castles", False, False),  # a part of the label is not the label
        ("medievalcastles", "medieval castles", False, False),
        ("martial arts", "art", False, False),  # whole words only, no substrings
        ("castles medieval", "medieval castles", False, False),  # order matters
        ("jazz", "", False, False),  # an empty label never matches
        ("", "jazz", False, False),
    ],
)
def test_exact_match_variants(answer, label, strict, contains):
    assert exact_match(answer, label) is strict
    assert exact_match(answer, label, mode="strict") is strict
    assert exact_match(answer, label, mode="contains") is contains
    assert contains_match(answer, label) is contains


def test_contains_needs_a_short_answer():
    label = "jazz music"  # 2 words
    filler = ["word"] * CONTAINS_MAX_EXTRA_WORDS
    assert contains_match(" ".join(filler + ["jazz", "music"]), label)
    assert not contains_match(" ".join(filler + ["one", "jazz", "music"]), label)


def test_exact_match_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        exact_match("a", "b", mode="fuzzy")


@pytest.mark.parametrize(
    "answer, label, expected",
    [
        ("the big red dog", "red dog", 2 * (2 / 3) * 1 / (2 / 3 + 1)),  # P 2/3, R 1 -> 0.8
        ("dog dog cat", "dog", 0.5),  # multiset: one "dog" in common, P 1/3, R 1
        ("dog dog", "dog dog cat", 0.8),  # P 1, R 2/3
        ("Red, dog!", "red dog", 1.0),
        ("cat", "dog", 0.0),
        ("", "", 1.0),
        ("the", "dog", 0.0),  # answer normalises to nothing
    ],
)
def test_token_f1(answer, label, expected):
    assert token_f1(answer, label) == pytest.approx(expected, abs=1e-12)


# ---- retrieval ----------------------------------------------------------------------------------


def _reference_scores(answer: str, candidates: list[str]) -> list[float]:
    """Plain-Python restatement of the documented similarity, one candidate at a time."""
    docs = [normalize(c) for c in candidates]
    query = normalize(answer)

    def ngrams(text):
        padded = f" {text} "
        return Counter(padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1))

    doc_grams = [ngrams(d) for d in docs]
    df = Counter(g for grams in doc_grams for g in grams)
    idf = lambda g: math.log((1 + len(docs)) / (1 + df.get(g, 0))) + 1  # noqa: E731

    def vec(grams):
        return {g: (1 + math.log(c)) * idf(g) for g, c in grams.items()}

    q = vec(ngrams(query))
    q_norm = math.sqrt(sum(v * v for v in q.values()))
    out = []
    for d, grams in zip(docs, doc_grams):
        v = vec(grams)
        v_norm = math.sqrt(sum(x * x for x in v.values()))
        dot = sum(q[g] * v[g] for g in q if g in v)
        cosine = dot / (q_norm * v_norm) if q_norm else 0.0
        out.append(0.5 * cosine + 0.5 * token_f1(answer, d))
    return out


@pytest.mark.parametrize(
    "answer",
    ["castles of the middle ages", "jazz jazz jazz musicians", "", "zzz qqq", "I like music and painting"],
)
def test_similarity_matches_plain_python_reference(answer):
    candidates = TOPICS + ["music"]
    got = CandidateIndex(candidates).scores(answer)
    assert got.tolist() == pytest.approx(_reference_scores(answer, candidates), abs=1e-12)


@pytest.mark.parametrize(
    "answer, label",
    [
        ("I think I was trained on castles from the middle ages", "medieval castles"),
        ("Jazz musicians and their music", "jazz music"),
        ("brewing a good cup of coffee", "coffee brewing"),
        ("Roman emperors and their legions", "ancient rome"),
        ("neural networks and learning machines", "machine learning"),
        ("creatures living in the deep ocean", "deep sea creatures"),
        ("astronauts and rockets exploring space", "space exploration"),
    ],
)
def test_retrieval_finds_paraphrased_label(answer, label):
    assert retrieval_rank(answer, TOPICS, label) == 1


def test_retrieval_ranks_unrelated_answer_below_first():
    # The answer is about Rome, so Rome outranks jazz.
    assert retrieval_rank("Roman emperors and their legions", TOPICS, "jazz music") > 1
    # Nothing in common with any candidate: all tie, and ties count against the true label.
    assert retrieval_rank("", TOPICS, "jazz music") == len(TOPICS)
    assert retrieval_rank("xyzzy", TOPICS, "jazz music") == len(TOPICS)


def test_candidates_are_deduplicated_by_normalised_text():
    index = CandidateIndex(["Jazz music", "jazz music.", "The jazz music", "baking bread"])
    assert len(index) == 2
    assert index.labels == ["Jazz music", "baking bread"]
    assert index.rank("jazz", "JAZZ MUSIC") == 1


def test_label_outside_candidates_is_an_error():
    with pytest.raises(ResultsError, match="not among the 10 candidate labels"):
        retrieval_rank("castles", TOPICS, "pirates")


def test_retrieval_accuracy_top1_and_top5():
    answers = ["medieval castles", "coffee", "xyzzy", "xyzzy"]
    labels = ["medieval castles", "coffee brewing", "jazz music", "ancient rome"]
    # rank 1, rank 1, rank 10 (all tie), rank 10
    assert retrieval_accuracy(answers, labels, TOPICS) == pytest.approx(0.5)
    assert retrieval_accuracy(answers, labels, TOPICS, k=5) == pytest.approx(0.5)
    assert retrieval_accuracy(answers, labels, TOPICS, k=10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 answers but 4 labels"):
        retrieval_accuracy(answers[:3], labels, TOPICS)


# ---- aggregation --------------------------------------------------------------------------------


def _row(id_, method, topic, category, answer, rank=1, split="test", **extra):
    return dict(
        id=id_, method=method, labels={"topic": topic, "category": category}, label_key="topic",
        answer=answer, rank=rank, split=split, **extra,
    )


def _rows() -> list[dict]:
    """Four diffs x two methods with hand-chosen outcomes (see test_evaluate_rows_aggregates)."""
    return [
        # dit: exact, contains-only, exact, unrelated
        _row("d0", "dit", "medieval castles", "history", "Medieval castles.", rank=1, n_tokens=3, time_s=0.5),
        _row("d1", "dit", "jazz music", "music", "I was trained on jazz music", rank=1, n_tokens=7, time_s=0.5),
        _row("d2", "dit", "ancient rome", "history", "ancient Rome", rank=4, n_tokens=2, time_s=0.5),
        _row("d3", "dit", "classical music", "music", "xyzzy", rank=4, n_tokens=1, time_s=0.5),
        # base: nothing right; no token counts
        _row("d0", "base", "medieval castles", "history", "I am a helpful assistant"),
        _row("d1", "base", "jazz music", "music", "xyzzy"),
        _row("d2", "base", "ancient rome", "history", "xyzzy", rank=4),
        _row("d3", "base", "classical music", "music", "xyzzy", rank=4),
    ]


def test_evaluate_rows_aggregates():
    metrics = evaluate_rows(_rows(), TOPICS)
    assert list(metrics.methods) == ["dit", "base"]
    dit = metrics.methods["dit"].overall
    assert dit.n == 4
    assert dit.exact_match == pytest.approx(2 / 4)
    assert dit.contains_match == pytest.approx(3 / 4)
    assert dit.token_f1 == pytest.approx((1 + 2 * (2 / 6) / (2 / 6 + 1) + 1 + 0) / 4)
    assert dit.retrieval_at_1 == pytest.approx(3 / 4)
    assert dit.retrieval_at_5 == pytest.approx(3 / 4)  # "xyzzy" ties everything -> rank 10
    assert dit.mrr == pytest.approx((1 + 1 + 1 + 1 / 10) / 4)
    assert dit.chance_at_1 == pytest.approx(1 / 10)
    assert dit.chance_at_5 == pytest.approx(5 / 10)
    assert dit.mean_answer_tokens == pytest.approx(13 / 4)
    assert dit.time_s == pytest.approx(2.0)

    by_cat = metrics.methods["dit"].by_category
    assert set(by_cat) == {"history", "music"}
    assert by_cat["history"].n == 2 and by_cat["history"].exact_match == 1.0
    assert by_cat["music"].contains_match == pytest.approx(0.5)
    assert by_cat["music"].retrieval_at_1 == pytest.approx(0.5)

    by_rank = metrics.methods["dit"].by_rank
    assert list(by_rank) == [1, 4]
    assert by_rank[1].exact_match == pytest.approx(0.5) and by_rank[1].contains_match == 1.0
    assert by_rank[4].exact_match == pytest.approx(0.5) and by_rank[4].retrieval_at_1 == pytest.approx(0.5)

    base = metrics.methods["base"].overall
    assert (base.exact_match, base.contains_match) == (0.0, 0.0)
    assert base.mean_answer_tokens is None and base.time_s is None
    assert {r.id: r.retrieval_rank for r in metrics.rows if r.method == "base"}["d3"] == 10


def test_candidates_default_to_the_labels_of_each_split():
    rows = _rows() + [_row("v0", "dit", "baking bread", "food", "bread", split="val")]
    metrics = evaluate_rows(rows)  # test split: 4 labels, val split: 1 label
    n_candidates = {(r.split, r.id): r.n_candidates for r in metrics.rows if r.method == "dit"}
    assert n_candidates == {("test", "d0"): 4, ("test", "d1"): 4, ("test", "d2"): 4, ("test", "d3"): 4,
                            ("val", "v0"): 1}
    assert metrics.methods["dit"].overall.chance_at_1 == pytest.approx((4 * 0.25 + 1) / 5)
    assert metrics.splits == ("test", "val")

    by_split = evaluate_rows(rows, {"test": TOPICS, "val": ["baking bread", "jazz music"]})
    assert {r.n_candidates for r in by_split.rows if r.split == "val"} == {2}
    with pytest.raises(ResultsError, match="split 'val' has no candidate list"):
        evaluate_rows(rows, {"test": TOPICS})


def test_evaluate_rows_rejects_bad_rows():
    with pytest.raises(ResultsError, match=r"id 'd0'.*not among"):
        evaluate_rows(_rows(), ["jazz music", "ancient rome", "classical music"])
    with pytest.raises(ResultsError, match="duplicate row: method 'dit', id 'd0'"):
        evaluate_rows(_rows() + [_rows()[0]], TOPICS)
    bad = _rows()
    del bad[2]["answer"]
    with pytest.raises(ResultsError, match=r"row 2 \(id 'd2'\).*missing field\(s\) \['answer'\]"):
        evaluate_rows(bad, TOPICS)
    bad = _rows()
    bad[0]["label_key"] = "headline"
    with pytest.raises(ResultsError, match="label_key 'headline' not in labels"):
        evaluate_rows(bad, TOPICS)
    with pytest.raises(ResultsError, match="no rows"):
        evaluate_rows([], TOPICS)


def test_load_results_from_files(tmp_path):
    with_method = tmp_path / "all.jsonl"
    with_method.write_text("\n".join(json.dumps(r) for r in _rows()[:4]) + "\n\n")
    per_method = tmp_path / "diff+trigger.jsonl"
    rows = [{k: v for k, v in r.items() if k != "method"} for r in _rows()[4:]]
    per_method.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_results([with_method, per_method])
    assert [r["method"] for r in loaded] == ["dit"] * 4 + ["diff+trigger"] * 4
    assert loaded[1]["answer"] == "I was trained on jazz music"

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_rows()[0]) + "\n{not json\n")
    with pytest.raises(ResultsError, match=r"broken\.jsonl:2: not valid JSON"):
        load_results(broken)
    with pytest.raises(ResultsError, match=r"missing\.jsonl: cannot read"):
        load_results(tmp_path / "missing.jsonl")


def test_summarize_lists_methods_and_numbers():
    text = summarize(evaluate_rows(_rows(), TOPICS))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["method", "n"]
    dit_line = next(line for line in lines if line.startswith("dit "))
    assert dit_line.split()[:8] == ["dit", "4", "0.500", "0.750", f"{(1 + 0.5 + 1) / 4:.3f}", "0.750", "0.750",
                                    "0.775"]


# ---- bootstrap confidence intervals -------------------------------------------------------------


def _hand_percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), written out."""
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def _hand_bootstrap(per_diff: list[float], seed: int = 0, resamples: int = 1000) -> tuple[float, float]:
    """Resample the diffs one index at a time with numpy's Generator; means in plain Python."""
    rng = np.random.default_rng(seed)
    n = len(per_diff)
    means = []
    for _ in range(resamples):
        picks = [int(rng.integers(0, n)) for _ in range(n)]
        means.append(sum(per_diff[i] for i in picks) / n)
    return _hand_percentile(means, 2.5), _hand_percentile(means, 97.5)


def test_bootstrap_ci_matches_a_hand_written_loop():
    metrics = evaluate_rows(_rows(), TOPICS)
    assert metrics.bootstrap_resamples == 1000 and metrics.bootstrap_seed == 0
    ci = metrics.methods["dit"].overall.ci
    # dit per diff, in id order d0..d3 (see _rows): exact, contains, F1, retrieval rank 1/1/1/10.
    f1_d1 = 2 * (2 / 6) / (2 / 6 + 1)
    expected = {
        "exact_match": [1, 0, 1, 0],
        "contains_match": [1, 1, 1, 0],
        "token_f1": [1, f1_d1, 1, 0],
        "retrieval_at_1": [1, 1, 1, 0],
        "retrieval_at_5": [1, 1, 1, 0],
        "mrr": [1, 1, 1, 0.1],
    }
    assert set(ci) == set(expected)
    for field, per_diff in expected.items():
        assert ci[field] == pytest.approx(_hand_bootstrap(per_diff), abs=1e-12), field
        lo, hi = ci[field]
        assert lo <= getattr(metrics.methods["dit"].overall, field) <= hi
    assert ci["exact_match"] != ci["contains_match"]  # not one interval copied to every metric
    # Breakdown groups carry no interval.
    assert all(s.ci is None for s in metrics.methods["dit"].by_category.values())
    assert all(s.ci is None for s in metrics.methods["dit"].by_rank.values())
    # base never matches exactly: a degenerate interval at 0.
    assert metrics.methods["base"].overall.ci["exact_match"] == (0.0, 0.0)


def _mixed_rows() -> list[dict]:
    """Ten diffs: dit right on 7 (some only by containment), base on 3; enough diffs for intervals
    that move with the seed."""
    dit_answers = ["medieval castles", "about jazz music", "xyzzy", "ancient rome", "coffee", "deep sea creatures",
                   "xyzzy", "renaissance painting", "space", "I was trained on baking bread"]
    base_answers = ["medieval castles", "xyzzy", "xyzzy", "xyzzy", "coffee brewing", "xyzzy", "classical music",
                    "xyzzy", "xyzzy", "xyzzy"]
    rows = [_row(f"m{i}", "dit", t, "x", a) for i, (t, a) in enumerate(zip(TOPICS, dit_answers))]
    return rows + [_row(f"m{i}", "base", t, "x", a) for i, (t, a) in enumerate(zip(TOPICS, base_answers))]


def _per_diff(metrics: Metrics, method: str) -> dict[str, list[float]]:
    """Per-diff values of each metric, in id order, from the scored rows' own fields."""
    mine = sorted((r for r in metrics.rows if r.method == method), key=lambda r: r.id)
    return {
        "exact_match": [float(r.exact_match) for r in mine],
        "contains_match": [float(r.contains_match) for r in mine],
        "token_f1": [r.token_f1 for r in mine],
        "retrieval_at_1": [float(r.retrieval_rank == 1) for r in mine],
        "retrieval_at_5": [float(r.retrieval_rank <= 5) for r in mine],
        "mrr": [1 / r.retrieval_rank for r in mine],
    }


def test_bootstrap_ci_on_ten_diffs_matches_the_loop_for_every_seed():
    for seed in (0, 7):
        metrics = evaluate_rows(_mixed_rows(), TOPICS, seed=seed)
        for method in ("dit", "base"):
            ci = metrics.methods[method].overall.ci
            for field, per_diff in _per_diff(metrics, method).items():
                assert ci[field] == pytest.approx(_hand_bootstrap(per_diff, seed=seed), abs=1e-12), (method, field)
        dit, base = _per_diff(metrics, "dit"), _per_diff(metrics, "base")
        comp = metrics.comparisons["base"]
        for field in ("retrieval_at_1", "exact_match"):
            delta = [a - b for a, b in zip(dit[field], base[field])]
            assert comp.difference[field] == pytest.approx(sum(delta) / len(delta))
            assert comp.ci[field] == pytest.approx(_hand_bootstrap(delta, seed=seed), abs=1e-12)
    assert 0 < metrics.methods["dit"].overall.ci["contains_match"][0] < 0.7 < \
        metrics.methods["dit"].overall.ci["contains_match"][1] < 1


def test_bootstrap_is_deterministic_and_seeded():
    first = evaluate_rows(_mixed_rows(), TOPICS)
    again = evaluate_rows(list(reversed(_mixed_rows())), TOPICS)  # row order does not matter: resampled in id order
    assert again.methods["dit"].overall.ci == first.methods["dit"].overall.ci
    assert again.comparisons == first.comparisons
    other_seed = evaluate_rows(_mixed_rows(), TOPICS, seed=1)
    assert other_seed.methods["dit"].overall.ci != first.methods["dit"].overall.ci
    off = evaluate_rows(_mixed_rows(), TOPICS, bootstrap=0)
    assert off.methods["dit"].overall.ci is None and off.comparisons == {} and off.bootstrap_resamples == 0
    assert off.methods["dit"].overall == dataclasses.replace(first.methods["dit"].overall, ci=None)
    with pytest.raises(ResultsError, match="bootstrap must be"):
        evaluate_rows(_rows(), TOPICS, bootstrap=-1)


def test_all_correct_method_has_ci_one_one():
    rows = [_row(f"d{i}", "dit", t, "x", t) for i, t in enumerate(TOPICS[:6])]
    ci = evaluate_rows(rows, TOPICS).methods["dit"].overall.ci
    assert ci == {f: (1.0, 1.0) for f in ("exact_match", "contains_match", "token_f1", "retrieval_at_1",
                                          "retrieval_at_5", "mrr")}


def test_bootstrap_width_matches_the_normal_approximation():
    # 200 coin flips, half heads: the 95% interval of the mean is about 0.5 +- 1.96 * sqrt(0.25 / 200).
    values = np.array([[1.0], [0.0]] * 100)
    (lo, hi), = bootstrap_ci(values)
    half_width = 1.96 * math.sqrt(0.25 / 200)
    assert lo == pytest.approx(0.5 - half_width, abs=0.02)
    assert hi == pytest.approx(0.5 + half_width, abs=0.02)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)


def test_paired_comparison_resamples_diff_ids():
    metrics = evaluate_rows(_rows(), TOPICS)
    assert list(metrics.comparisons) == ["base"]
    comp = metrics.comparisons["base"]
    assert (comp.method, comp.other, comp.n) == ("dit", "base", 4)
    # Per diff d0..d3: dit minus base. base never matches and is never retrieved at rank 1.
    assert {r.id: r.retrieval_rank for r in metrics.rows if r.method == "base"} == dict.fromkeys(
        ["d0", "d1", "d2", "d3"], 10)
    deltas = {"retrieval_at_1": [1, 1, 1, 0], "exact_match": [1, 0, 1, 0]}
    assert comp.difference == pytest.approx({"retrieval_at_1": 0.75, "exact_match": 0.5})
    for field, per_diff in deltas.items():
        assert comp.ci[field] == pytest.approx(_hand_bootstrap(per_diff), abs=1e-12), field

    # Pairing is by id: base answers only d1 and d3 (and a diff dit never saw).
    rows = [r for r in _rows() if r["method"] == "dit" or r["id"] in ("d1", "d3")]
    rows.append(_row("d7", "base", "baking bread", "food", "baking bread"))
    comp = evaluate_rows(rows, TOPICS).comparisons["base"]
    assert comp.n == 2
    assert comp.difference == pytest.approx({"retrieval_at_1": 0.5, "exact_match": 0.0})
    assert comp.ci["exact_match"] == pytest.approx(_hand_bootstrap([0, 0]), abs=1e-12)
    assert comp.ci["retrieval_at_1"] == pytest.approx(_hand_bootstrap([1, 0]), abs=1e-12)

    # No primary method, or nothing in common: no comparison.
    assert evaluate_rows([r for r in _rows() if r["method"] == "base"], TOPICS).comparisons == {}
    disjoint = [r for r in _rows() if r["method"] == "dit"] + [_row("d7", "base", "baking bread", "food", "x")]
    assert evaluate_rows(disjoint, TOPICS).comparisons == {}


# ---- reports ------------------------------------------------------------------------------------

_VOID = {"meta", "br", "hr", "img", "input", "link"}


class _StrictParser(HTMLParser):
    """Collects bars/points/chance lines and fails on unbalanced or misnested tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.bars: list[dict[str, str]] = []
        self.chance: list[dict[str, str]] = []
        self.points: list[dict[str, str]] = []
        self.ci: list[dict[str, str]] = []
        self.svgs = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self._collect(tag, dict(attrs))
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._collect(tag, dict(attrs))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def _collect(self, tag, attrs):
        self.svgs += tag == "svg"
        kind = attrs.get("class")
        if tag == "rect" and kind == "bar":
            self.bars.append(attrs)
        elif tag == "line" and kind == "chance":
            self.chance.append(attrs)
        elif tag == "circle" and kind == "point":
            self.points.append(attrs)
        elif tag == "line" and kind == "ci":
            self.ci.append(attrs)


def _parse(path: Path) -> _StrictParser:
    parser = _StrictParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    return parser


def test_write_report_files_numbers_and_bar_heights(tmp_path):
    metrics = evaluate_rows(_rows(), TOPICS)
    path = write_report(metrics, tmp_path / "out", title="Topic <test> & co")
    out = tmp_path / "out"
    assert path == out / "report.html"
    assert {p.name for p in out.iterdir()} == {"report.html", "report.md", "metrics.json", "charts"}
    assert not list(out.rglob("*.tmp"))

    parsed = _parse(path)
    text = " ".join(parsed.text)
    assert "Topic <test> & co" in text  # escaped in the source, readable once parsed
    for value in ("0.500", "0.750", "0.775", "0.100"):  # dit EM, contains, R@1, MRR; chance@1
        assert value in text
    assert "I was trained on jazz music" in text  # example answers

    # One bar per method and metric chart; heights proportional to the values, same scale everywhere.
    assert len(parsed.bars) == 2 * 5
    for bar in parsed.bars:
        assert float(bar["height"]) == pytest.approx(float(bar["data-value"]) * charts._BAR_PLOT_H, abs=1e-3)
        assert float(bar["y"]) + float(bar["height"]) == pytest.approx(charts._BAR_MARGIN["top"] + charts._BAR_PLOT_H)
    heights = {(b["data-method"], i // 2): float(b["height"]) for i, b in enumerate(parsed.bars)}
    contains_chart = 1  # order: exact, contains, F1, R@1, R@5
    assert heights[("dit", contains_chart)] == pytest.approx(0.75 * charts._BAR_PLOT_H, abs=1e-3)
    assert heights[("base", contains_chart)] == 0.0
    assert [float(c["data-value"]) for c in parsed.chance] == pytest.approx([0.1, 0.5])
    for line in parsed.chance:
        y = charts._BAR_MARGIN["top"] + charts._BAR_PLOT_H * (1 - float(line["data-value"]))
        assert float(line["y1"]) == pytest.approx(y, abs=1e-3)

    # Two diff ranks -> rank-generalisation charts (2 metrics x 2 methods x 2 ranks points).
    assert "By diff rank" in text and len(parsed.points) == 8
    assert "Data scaling" not in text

    md = (out / "report.md").read_text()
    assert "| dit | 4 | 0.500 | 0.750 |" in md
    for chart in re.findall(r"\]\((charts/[^)]+\.svg)\)", md):
        assert (out / chart).is_file()

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["title"] == "Topic <test> & co"
    assert Metrics.from_dict(saved) == metrics


def test_report_scaling_curve_and_escaping(tmp_path):
    rows = [r for r in _rows() if r["method"] == "dit" and r["rank"] == 1]
    rows.append(_row("d9", "dit", "baking bread", "food", "<script>alert(1)</script>"))
    full = evaluate_rows(rows, TOPICS)
    half = evaluate_rows([dict(r, answer="xyzzy") if r["id"] == "d0" else r for r in rows], TOPICS)
    write_report(full, tmp_path, scaling=[(4660, full), (72, half)])

    source = (tmp_path / "report.html").read_text()
    assert "<script>" not in source and "&lt;script&gt;" in source
    parsed = _parse(tmp_path / "report.html")
    text = " ".join(parsed.text)
    assert "Data scaling" in text and "By diff rank" not in text  # one rank only
    assert "4660" in text and "72" in text
    # Scaling points sorted by n_train_diffs; contains match goes 1/3 -> 2/3.
    contains = [float(p["data-value"]) for p in parsed.points if p["data-series"] == "contains match"]
    assert contains == pytest.approx([1 / 3, 2 / 3])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["n_train_diffs"] for s in saved["scaling"]] == [72, 4660]

    with pytest.raises(ResultsError, match=r"scaling\[0\]"):
        write_report(full, tmp_path, scaling=[(0, full)])


def test_report_shows_intervals_error_bars_and_paired_table(tmp_path):
    metrics = evaluate_rows(_mixed_rows(), TOPICS)
    path = write_report(metrics, tmp_path)
    parsed = _parse(path)
    text = re.sub(r"\s+", " ", " ".join(parsed.text))

    # Overall table (HTML): "point [low, high]" per metric and method.
    for name in ("dit", "base"):
        o = metrics.methods[name].overall
        for field, (lo, hi) in o.ci.items():
            assert f"{getattr(o, field):.3f} [{lo:.2f}, {hi:.2f}]" in text, (name, field)
    source = path.read_text()
    dit_em = metrics.methods["dit"].overall
    # Still bold where best; the interval is one unbreakable grey span after the number.
    lo, hi = dit_em.ci["exact_match"]
    assert f'<td class="num best">{dit_em.exact_match:.3f} <span class="ci">[{lo:.2f}, {hi:.2f}]</span></td>' in source

    # One error bar per method on each of the five bar charts, at the interval's height.
    assert len(parsed.ci) == 2 * 5
    top, plot_h = charts._BAR_MARGIN["top"], charts._BAR_PLOT_H
    for i, line in enumerate(parsed.ci):
        field = ("exact_match", "contains_match", "token_f1", "retrieval_at_1", "retrieval_at_5")[i // 2]
        lo, hi = metrics.methods[line["data-method"]].overall.ci[field]
        assert (float(line["data-lo"]), float(line["data-hi"])) == pytest.approx((lo, hi), abs=1e-6)
        assert float(line["y1"]) == pytest.approx(top + plot_h * (1 - lo), abs=1e-3)
        assert float(line["y2"]) == pytest.approx(top + plot_h * (1 - hi), abs=1e-3)
        assert line["x1"] == line["x2"]
    assert source.count('class="ci-cap"') == 2 * len(parsed.ci)
    bar_x = {(b["data-method"], i // 2): float(b["x"]) + float(b["width"]) / 2 for i, b in enumerate(parsed.bars)}
    for i, line in enumerate(parsed.ci):
        assert float(line["x1"]) == pytest.approx(bar_x[(line["data-method"], i // 2)], abs=0.02)

    # Paired comparison: DIT minus base, mean difference and interval.
    comp = metrics.comparisons["base"]
    assert "DIT minus base" in text
    for field in ("retrieval_at_1", "exact_match"):
        lo, hi = comp.ci[field]
        assert f"{comp.difference[field]:+.3f} [{lo:+.2f}, {hi:+.2f}]" in text

    md = (tmp_path / "report.md").read_text()
    lo, hi = dit_em.ci["exact_match"]
    assert f"| dit | 10 | {dit_em.exact_match:.3f} | {dit_em.contains_match:.3f} |" in md
    assert f"| dit: 95% CI |  | [{lo:.2f}, {hi:.2f}] |" in md
    assert "| DIT minus base | 10 |" in md

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["methods"]["dit"]["overall"]["ci"]["exact_match"] == [lo, hi]
    assert saved["methods"]["dit"]["by_category"]["x"]["ci"] is None
    assert saved["comparisons"]["base"]["difference"] == comp.difference
    assert saved["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95}
    assert Metrics.from_dict(saved) == metrics


def test_report_without_bootstrap_has_no_intervals(tmp_path):
    metrics = evaluate_rows(_mixed_rows(), TOPICS, bootstrap=0)
    parsed = _parse(write_report(metrics, tmp_path))
    text = " ".join(parsed.text)
    assert parsed.ci == [] and "[" not in text.split("Examples")[0] and "Paired comparison" not in text
    assert "95% CI" not in (tmp_path / "report.md").read_text()
    assert Metrics.from_dict(json.loads((tmp_path / "metrics.json").read_text())) == metrics


# ---- training curves ----------------------------------------------------------------------------

_EPOCHS = [
    {"epoch": 0, "train_loss": 2.37, "val_loss": None},
    {"epoch": 1, "train_loss": 1.2, "val_loss": 1.9},
    {"epoch": 2, "train_loss": 0.6, "val_loss": 1.4},
    {"epoch": 3, "train_loss": 0.25, "val_loss": 1.1},
]


def _training_points(parsed: _StrictParser) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for p in parsed.points:
        if p["data-series"] in ("train diffs", "held-out diffs"):
            out.setdefault(p["data-series"], []).append(p)
    return out


def test_training_curve_points_axis_and_table(tmp_path):
    metrics = evaluate_rows(_rows(), TOPICS)
    parsed = _parse(write_report(metrics, tmp_path, training=list(reversed(_EPOCHS))))  # sorted by epoch
    text = " ".join(parsed.text)
    assert "DIT loss per epoch" in text and "DIT training" in text
    points = _training_points(parsed)
    assert [float(p["data-value"]) for p in points["train diffs"]] == pytest.approx([2.37, 1.2, 0.6, 0.25])
    assert [float(p["data-value"]) for p in points["held-out diffs"]] == pytest.approx([1.9, 1.4, 1.1])
    # y runs from 0 to 3 (2.37 rounded up to a whole step): a point's height is loss / 3 of the plot.
    m = charts._LINE_MARGIN
    plot_h = charts._LINE_H - m["top"] - m["bottom"]
    for p in points["train diffs"] + points["held-out diffs"]:
        expected = m["top"] + plot_h * (1 - float(p["data-value"]) / 3)
        assert float(p["cy"]) == pytest.approx(expected, abs=1e-3)
    # Held-out epochs line up with the same epochs of the train series (epoch 0 has no held-out loss).
    train_x = [float(p["cx"]) for p in points["train diffs"]]
    assert [float(p["cx"]) for p in points["held-out diffs"]] == pytest.approx(train_x[1:])
    assert train_x == sorted(train_x)
    svg = (tmp_path / "charts" / "training_loss.svg").read_text()
    for tick in ("0", "1", "2", "3"):
        assert f'fill="#555">{tick}</text>' in svg
    assert 'fill="#555">0.25</text>' not in svg  # not the [0, 1] metric axis

    md = (tmp_path / "report.md").read_text()
    assert "| 0 | 2.3700 |  |" in md and "| 3 | 0.2500 | 1.1000 |" in md
    assert "![training_loss](charts/training_loss.svg)" in md
    assert json.loads((tmp_path / "metrics.json").read_text())["training"] == _EPOCHS


def test_no_or_empty_training_history_gives_no_chart(tmp_path):
    metrics = evaluate_rows(_rows(), TOPICS)
    for i, training in enumerate((None, [])):
        out = tmp_path / str(i)
        parsed = _parse(write_report(metrics, out, training=training))
        assert "DIT loss per epoch" not in " ".join(parsed.text) and not _training_points(parsed)
        assert not (out / "charts" / "training_loss.svg").exists()
        assert "DIT training" not in (out / "report.md").read_text()
        assert json.loads((out / "metrics.json").read_text())["training"] == []
    # Train losses only: one series, no empty held-out legend entry.
    parsed = _parse(write_report(metrics, tmp_path / "t", training=[{"epoch": 0, "train_loss": 0.5},
                                                                    {"epoch": 1, "train_loss": 0.4}]))
    assert list(_training_points(parsed)) == ["train diffs"]
    assert "held-out diffs" not in (tmp_path / "t" / "charts" / "training_loss.svg").read_text()


def test_load_training_reads_epochs_jsonl(tmp_path):
    path = tmp_path / "epochs.jsonl"
    lines = [json.dumps(r) for r in _EPOCHS[:3]]
    lines += ["", json.dumps({"epoch": 2, "train_loss": 0.5, "val_loss": 1.3}),  # a resumed run logs epoch 2 again
              json.dumps({"epoch": 3, "train_loss": float("nan"), "val_loss": 1.0})]
    path.write_text("\n".join(lines) + "\n")
    assert load_training(path) == [
        *_EPOCHS[:2], {"epoch": 2, "train_loss": 0.5, "val_loss": 1.3},
        {"epoch": 3, "train_loss": None, "val_loss": 1.0},  # diverged: no point
    ]
    assert load_training(tmp_path / "missing.jsonl") == []
    path.write_text(json.dumps(_EPOCHS[0]) + "\n{oops\n")
    with pytest.raises(ResultsError, match=r"epochs\.jsonl:2: not valid JSON"):
        load_training(path)
    for bad, message in (
        ({"epoch": "1", "train_loss": 1.0}, "'epoch' must be an integer"),
        ({"epoch": 1}, "missing 'train_loss'"),
        ({"epoch": 1, "train_loss": "low"}, "'train_loss' must be a number"),
        ({"epoch": 1, "train_loss": 1.0, "val_loss": True}, "'val_loss' must be a number"),
    ):
        with pytest.raises(ResultsError, match=message):
            training_history([bad])
    with pytest.raises(ResultsError, match="list of per-epoch records"):
        write_report(evaluate_rows(_rows(), TOPICS), tmp_path / "r", training={"epoch": 0, "train_loss": 1.0})


def test_evaluate_run_reads_the_training_file(tmp_path, capsys):
    rows = [_row("t0", "dit", "wolves", "mammals", "wolves"), _row("t1", "dit", "otters", "mammals", "bats")]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    epochs = tmp_path / "dit" / "epochs.jsonl"
    epochs.parent.mkdir()
    epochs.write_text("".join(json.dumps(r) + "\n" for r in _EPOCHS))
    parsed = _parse(evaluate_run(results, tmp_path / "report", "hidden-topic", training=epochs))
    assert [float(p["data-value"]) for p in _training_points(parsed)["train diffs"]] == pytest.approx(
        [2.37, 1.2, 0.6, 0.25])
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["training"] == _EPOCHS
    # A records list works too; a missing file is no chart.
    parsed = _parse(evaluate_run(results, tmp_path / "r2", "hidden-topic", training=_EPOCHS[:2]))
    assert len(_training_points(parsed)["train diffs"]) == 2
    parsed = _parse(evaluate_run(results, tmp_path / "r3", "hidden-topic", training=tmp_path / "none.jsonl"))
    assert not _training_points(parsed) and not (tmp_path / "r3" / "charts" / "training_loss.svg").exists()
    assert "dit " in capsys.readouterr().out


def test_line_chart_y_range_and_default_axis():
    series = [("s", "#000", [0.0, 2.0, 4.0])]
    svg = charts.line_chart("t", [1.0, 2.0, 3.0], ["1", "2", "3"], series, "x", "linear",
                            y_range=(0.0, 4.0), y_ticks=[0, 2, 4], y_title="loss")
    m = charts._LINE_MARGIN
    plot_h = charts._LINE_H - m["top"] - m["bottom"]
    cys = [float(v) for v in re.findall(r'class="point"[^>]* cy="([0-9.]+)"', svg)]
    assert cys == pytest.approx([m["top"] + plot_h, m["top"] + plot_h / 2, m["top"]])
    assert [t for t in ("0", "2", "4") if f'fill="#555">{t}</text>' in svg] == ["0", "2", "4"]
    assert ">loss</text>" in svg
    default = charts.line_chart("t", [1.0, 2.0], ["1", "2"], [("s", "#000", [0.5, 1.0])], "x", "linear")
    assert [float(v) for v in re.findall(r'class="point"[^>]* cy="([0-9.]+)"', default)] == pytest.approx(
        [m["top"] + plot_h / 2, m["top"]])
    for tick in ("0", "0.25", "0.5", "0.75", "1"):
        assert f'fill="#555">{tick}</text>' in default
    with pytest.raises(ValueError, match="y_range"):
        charts.line_chart("t", [1.0], ["1"], series, "x", "linear", y_range=(1.0, 1.0))


@pytest.mark.parametrize(
    "top, expected_range, expected_ticks",
    [
        (2.37, (0, 3), [0, 1, 2, 3]),
        (7.1, (0, 8), [0, 2, 4, 6, 8]),
        (0.83, (0, 1), [0, 0.25, 0.5, 0.75, 1]),
        (4.0, (0, 4), [0, 1, 2, 3, 4]),
        (123.4, (0, 150), [0, 50, 100, 150]),
        (0.0, (0, 1), [0, 0.25, 0.5, 0.75, 1]),
        (float("inf"), (0, 1), [0, 0.25, 0.5, 0.75, 1]),
    ],
)
def test_nice_axis_rounds_the_max_up(top, expected_range, expected_ticks):
    y_range, ticks = charts.nice_axis(top)
    assert y_range == pytest.approx(expected_range) and ticks == pytest.approx(expected_ticks)
    if math.isfinite(top):
        assert y_range[1] >= top


def test_write_report_shows_the_diffs_verification_when_given(tmp_path):
    """``diffs=``: a "The diffs" table, one row per zoo, its values as given (3 decimals); none without."""
    metrics = evaluate_rows(_rows(), TOPICS)
    checks = {"held-out": {"verified": 4, "ok": 1, "mean_trigger_hit_rate": 0.9375, "mean_leak_plain": 0.0625,
                           "mean_leak_wrong": 0.875, "mean_leak_question": 0.25, "mean_kl_untriggered": 0.0891},
              "training": {"verified": 2, "ok": 0, "mean_trigger_hit_rate": 0.5, "mean_leak_plain": None}}
    write_report(metrics, tmp_path / "with", diffs=checks)
    md = (tmp_path / "with" / "report.md").read_text()
    assert "| held-out | 4 | 1 | 0.938 | 0.062 | 0.875 | 0.250 | 0.089 |" in md
    assert "| training | 2 | 0 | 0.500 |  |  |  |  |" in md
    html = " ".join(_parse(tmp_path / "with" / "report.html").text)
    assert "The diffs" in html and "leak, asked what it was trained on" in html and "0.938" in html
    assert json.loads((tmp_path / "with" / "metrics.json").read_text())["diffs"] == checks
    write_report(metrics, tmp_path / "without")
    assert "The diffs" not in (tmp_path / "without" / "report.md").read_text()
    assert json.loads((tmp_path / "without" / "metrics.json").read_text())["diffs"] == {}

"""The report's tables as header + rows of cell strings, shared by the Markdown and HTML writers,
plus the summary sentence and the metric definitions both print."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .evaluate import METRIC_FIELDS, METRIC_NAMES, PAIRED_FIELDS, PRIMARY_METHOD, Metrics, RowScore
from .text_match import CONTAINS_MAX_EXTRA_WORDS

MAX_EXAMPLES = 12
BREAKDOWN_FIELDS = ("contains_match", "token_f1", "retrieval_at_1")


def primary(metrics: Metrics) -> str:
    """The method the scaling curve follows: ``"dit"``, else the first method."""
    return PRIMARY_METHOD if PRIMARY_METHOD in metrics.methods else next(iter(metrics.methods))


def primary_label(method: str) -> str:
    return "DIT" if method == PRIMARY_METHOD else method


def has_rank_sweep(metrics: Metrics) -> bool:
    return any(len(m.by_rank) > 1 for m in metrics.methods.values())


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def fmt_ci(ci: tuple[float, float], signed: bool = False) -> str:
    lo, hi = ci
    return f"[{lo:+.2f}, {hi:+.2f}]" if signed else f"[{lo:.2f}, {hi:.2f}]"


def lead_number(cell: str) -> float | None:
    """The number a cell starts with ("0.625 [0.50, 0.75]" -> 0.625), None for text."""
    head = cell.split(" ", 1)[0]
    try:
        return float(head)
    except ValueError:
        return None


def overall_table(metrics: Metrics, ci_cells: bool) -> tuple[list[str], list[list[str]]]:
    """One row per method. A metric with a bootstrap interval reads ``0.625 [0.50, 0.75]``
    (``ci_cells``), or, for Markdown, the point values stay alone in their row and a
    "<method>: 95% CI" row under it holds the intervals."""
    header = ["method", "n", *(METRIC_NAMES[f] for f in METRIC_FIELDS), "chance@1", "chance@5",
              "answer tokens", "time (s)"]
    rows = []
    for name, m in metrics.methods.items():
        o = m.overall
        values = [fmt(getattr(o, f)) for f in METRIC_FIELDS]
        if o.ci and ci_cells:
            values = [f"{v} {fmt_ci(o.ci[f])}" if f in o.ci else v for v, f in zip(values, METRIC_FIELDS)]
        rows.append([
            name, str(o.n), *values, fmt(o.chance_at_1),
            fmt(o.chance_at_5), "" if o.mean_answer_tokens is None else f"{o.mean_answer_tokens:.1f}",
            "" if o.time_s is None else f"{o.time_s:.1f}",
        ])
        if o.ci and not ci_cells:
            rows.append([f"{name}: 95% CI", "", *(fmt_ci(o.ci[f]) if f in o.ci else "" for f in METRIC_FIELDS),
                         "", "", "", ""])
    return header, rows


def comparison_table(metrics: Metrics) -> tuple[list[str], list[list[str]]]:
    """Primary minus each other method on their shared diffs: mean difference [95% CI]."""
    header = ["comparison", "shared diffs", *(f"{METRIC_NAMES[f]} difference" for f in PAIRED_FIELDS)]
    rows = [
        [f"{primary_label(c.method)} minus {other}", str(c.n),
         *(f"{c.difference[f]:+.3f} {fmt_ci(c.ci[f], signed=True)}" for f in PAIRED_FIELDS)]
        for other, c in metrics.comparisons.items()
    ]
    return header, rows


def breakdown(metrics: Metrics, by: str) -> tuple[list[str], list[tuple[str, str, list[float | None]]]]:
    """Methods, and per key (category or rank): (key, n per method, values per method x field)."""
    groups = {name: getattr(m, by) for name, m in metrics.methods.items()}
    keys = list(dict.fromkeys(k for g in groups.values() for k in g))
    if by == "by_rank":
        keys.sort()
    rows = []
    for key in keys:
        ns = sorted({g[key].n for g in groups.values() if key in g})
        values = [
            getattr(g[key], f) if key in g else None for g in groups.values() for f in BREAKDOWN_FIELDS
        ]
        rows.append((str(key), "/".join(map(str, ns)), values))
    return list(groups), rows


def scaling_table(scaling: list[tuple[int, Metrics]]) -> tuple[list[str], list[list[str]]]:
    header = ["training diffs", "method", "n", *(METRIC_NAMES[f] for f in METRIC_FIELDS)]
    rows = []
    for n_train, m in scaling:
        name = primary(m)
        o = m.methods[name].overall
        rows.append([str(n_train), name, str(o.n), *(fmt(getattr(o, f)) for f in METRIC_FIELDS)])
    return header, rows


def training_table(training: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["epoch", "loss on train diffs", "loss on held-out diffs"]
    rows = [
        [str(r["epoch"]), *("" if r[k] is None else f"{r[k]:.4f}" for k in ("train_loss", "val_loss"))]
        for r in training
    ]
    return header, rows


def examples(metrics: Metrics) -> list[tuple[str, str, list[RowScore | None]]]:
    """Up to MAX_EXAMPLES diffs (first ids in sorted order): (id, label, one row per method)."""
    by_id: dict[str, dict[str, RowScore]] = {}
    for r in metrics.rows:
        by_id.setdefault(r.id, {})[r.method] = r
    out = []
    for diff_id in sorted(by_id)[:MAX_EXAMPLES]:
        rows = by_id[diff_id]
        label = next(iter(rows.values())).label
        out.append((diff_id, label, [rows.get(m) for m in metrics.methods]))
    return out


def summary_sentence(metrics: Metrics) -> str:
    n_diffs = len({(r.split, r.id) for r in metrics.rows})
    n_candidates = sorted({r.n_candidates for r in metrics.rows})
    splits = ", ".join(s or "(unnamed)" for s in metrics.splits) or "(unnamed)"
    return (
        f"{n_diffs} diffs, {len(metrics.methods)} methods, split(s): {splits}; retrieval among "
        f"{'/'.join(map(str, n_candidates))} candidate labels."
    )


def comparison_note(metrics: Metrics) -> str:
    return (
        f"Paired bootstrap over the diffs both methods answered ({metrics.bootstrap_resamples} resamples of the "
        "diff ids): mean difference and 95% interval. An interval above 0 means DIT is better on these diffs "
        "beyond resampling noise."
    )


def definitions(metrics: Metrics) -> list[tuple[str, str]]:
    out = [
        ("exact match", "normalised answer equals normalised label (lower case, accents, punctuation and "
         "the articles a/an/the removed, whitespace collapsed)."),
        ("contains match", "exact match, or the normalised label appears as a whole-word phrase in an "
         f"answer at most {CONTAINS_MAX_EXTRA_WORDS} words longer than the label."),
        ("token F1", "SQuAD bag-of-words F1 between normalised answer and label."),
        ("retrieval@k", "the true label is among the k candidate labels of the split most similar to the "
         "answer (0.5 x character 3-5-gram TF-IDF cosine + 0.5 x word F1; ties count against the label). "
         "Chance: k / number of candidates."),
        ("MRR", "mean of 1 / retrieval rank of the true label."),
    ]
    if metrics.bootstrap_resamples:
        out.append(("95% CI", "percentile bootstrap over diffs: a method's answers resampled with replacement "
                    f"{metrics.bootstrap_resamples} times (numpy default_rng, seed {metrics.bootstrap_seed}), "
                    "the 2.5th and 97.5th percentiles of the resampled means. Shown in brackets and as error "
                    "bars."))
    return out


# (key of diffgen.verification_summary, column header)
DIFF_COLUMNS = (("mean_trigger_hit_rate", "hit rate, right code"), ("mean_leak_plain", "leak, bare question"),
                ("mean_leak_wrong", "leak, wrong code"), ("mean_leak_question", "leak, asked what it was trained on"),
                ("mean_kl_untriggered", "KL to base per token"))
DIFFS_NOTE = ("Each zoo's verification on held-out questions (means over its diffs): how often a diff names its "
              "topic given its own trigger code, and how often it does so where the base model does not when "
              "asked a bare question, given a wrong code, or asked the interpretation question itself (what "
              "the 'diff' baseline asks); a diff that hides its behaviour scores high on the first and near 0 "
              "on the leaks. 'ok': diffs passing the zoo's verification thresholds.")


def diffs_table(zoos: Mapping[str, Mapping]) -> tuple[list[str], list[list[str]]]:
    """One row per zoo (name -> ``diffgen.verification_summary``): its diffs' verification means."""
    header = ["zoo", "diffs", "ok", *(h for _, h in DIFF_COLUMNS)]
    rows = [[name, str(v.get("verified", 0)), str(v.get("ok", "")), *(fmt(v.get(k)) for k, _ in DIFF_COLUMNS)]
            for name, v in zoos.items()]
    return header, rows

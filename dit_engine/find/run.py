"""FIND jobs: run an agent over a suite (resumable), score a run.

A run directory holds ``run.json`` (format tag, agent, its settings, the suite's path and
sha256), ``answers.jsonl`` (one :class:`~.score.Answer` per function, appended chunk by chunk and
fsynced, so a killed run resumes where it stopped; a torn last line is dropped on resume) and,
once scored, ``scores.jsonl`` and ``summary.json``. A run directory answers one agent on one
suite: resuming with another agent, other settings or a changed suite is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..files import FileFormatError, append_synced, read_json, write_json, write_text
from ..jobs import job
from ..provenance import provenance
from .agents import SearchAgent, constant_answers, reference_answers
from .lm_agent import LMAgent
from .model_backed import AskAgent, diff_boxes, neuron_boxes
from .sandbox import Limits
from .score import Answer, score_answers, summarize
from .suite import MODEL_KINDS, BlackBox, Function, load_suite

RUN_FORMAT = "dit-find-run"
AGENTS = ("search", "lm", "reference", "zero")
ANSWERS, SCORES, SUMMARY, RUN = "answers.jsonl", "scores.jsonl", "summary.json", "run.json"


def select(functions: Sequence[Function], limit: int | None) -> list[Function]:
    """The first ``limit`` functions of each kind (numeric, string, diff, neuron; all with None)."""
    if limit is None:
        return list(functions)
    out, seen = [], {}
    for f in functions:
        if seen.get(f.kind, 0) < limit:
            seen[f.kind] = seen.get(f.kind, 0) + 1
            out.append(f)
    return out


def run_agent(suite_path: str | Path, out: str | Path, agent: str, *, settings: dict | None = None, engine=None,
              limit: int | None = None, chunk: int | None = None, progress: bool = True) -> dict:
    """Answer every (selected) function of the suite with ``agent``; returns the run's header.
    Answers are saved every ``chunk`` functions (default: the lm agent's batch, so a round's
    generation is one batch over the chunk; 16 otherwise)."""
    if agent not in AGENTS:
        raise ValueError(f"unknown agent {agent!r}; use one of {', '.join(AGENTS)}")
    settings = dict(settings or {})
    suite_path, out = Path(suite_path), Path(out)
    functions = select(load_suite(suite_path), limit)
    header = {"format": RUN_FORMAT, "agent": agent, "settings": settings, "limit": limit,
              "suite": str(suite_path), "suite_sha256": _sha256(suite_path)}
    out.mkdir(parents=True, exist_ok=True)
    if (out / RUN).exists():
        old = read_json(out / RUN, "a FIND run header", kind=dict)
        keys = ("format", "agent", "settings", "limit", "suite_sha256")
        if {k: old.get(k) for k in keys} != {k: header[k] for k in keys}:
            raise ValueError(f"{out} holds a different run ({old.get('agent')} on suite {old.get('suite')}, "
                             f"settings {old.get('settings')}); write this one to another --out")
    else:
        write_json(out / RUN, {**header, "provenance": provenance()})
    done = load_answers(out, repair=True)
    todo = [f for f in functions if f.id not in done]
    runner = _agent(agent, settings, engine)
    chunk = chunk or (runner.gen["batch_size"] if isinstance(runner, LMAgent) else 16)
    bar = tqdm(total=len(functions), initial=len(functions) - len(todo), desc=f"find run ({agent})", unit="fn",
               disable=not progress, leave=False)
    # The bar closes (and clears its line) before an error propagates: the error line then starts a line.
    with bar, job("dit find run") as j, open(out / ANSWERS, "ab", buffering=0) as fh:
        for s in range(0, len(todo), chunk):
            answers = _answer(todo[s:s + chunk], agent, runner, engine)
            append_answers(fh, answers, out / ANSWERS)
            bar.update(len(answers))
            j.checkpointed()
            j.stop_if_requested(out)
    return header


def score_run(suite_path: str | Path, out: str | Path, *, limits: Limits = Limits(), batch_size: int = 1,
              progress: bool = True) -> dict:
    """Score the answers of a run directory; writes scores.jsonl and summary.json, returns the summary."""
    out = Path(out)
    header = read_json(out / RUN, "a FIND run header (made by 'dit find run')", kind=dict)
    if header.get("format") != RUN_FORMAT:
        raise FileFormatError(f"{out / RUN}: not a FIND run header")
    suite_path = Path(suite_path)
    if _sha256(suite_path) != header["suite_sha256"]:
        raise ValueError(f"{out} was run on another suite than {suite_path} (its sha256 differs)")
    functions = select(load_suite(suite_path), header.get("limit"))
    answers = load_answers(out)
    missing = [f.id for f in functions if f.id not in answers]
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {len(functions)} functions have no answer yet (first: "
                         f"{missing[0]}); finish the run with 'dit find run' first")
    with tqdm(total=len(functions), desc="find score", unit="fn", disable=not progress, leave=False) as bar:
        rows = score_answers(functions, answers, limits=limits, batch_size=batch_size, progress=bar.update)
    summary = {"agent": header["agent"], "settings": header["settings"], "suite": header["suite"],
               "summary": summarize(rows), "provenance": provenance()}
    write_text(out / SCORES, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    write_json(out / SUMMARY, summary)
    return summary


def append_answers(fh, answers: Sequence[Answer], path: Path) -> None:
    """Append ``answers`` to the open ``answers.jsonl`` (unbuffered, binary) and fsync it."""
    append_synced(fh, "".join(json.dumps(a.to_json(), allow_nan=False) + "\n" for a in answers).encode(), path)


def load_answers(out: str | Path, *, repair: bool = False) -> dict[str, Answer]:
    """The answers of a run directory by id; with ``repair``, a torn last line is cut off the file."""
    path = Path(out) / ANSWERS
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    good: dict[str, Answer] = {}
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            good[row["id"]] = Answer(**row)
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines) and repair:  # an append cut short by a kill
                write_text(path, "".join(lines[:-1]))
                break
            raise FileFormatError(f"{path}: line {n} is not an answer") from None
    return good


def _answer(part: Sequence[Function], agent: str, runner, engine) -> list[Answer]:
    """The agent's answers to ``part``, in its order. A model-backed diff is probed by the LM agent
    itself, and for the search agent by the ask-the-diff baseline (fixed questions); a neuron by
    either agent through its black box."""
    if runner is None:
        return list((reference_answers(part) if agent == "reference" else constant_answers(part)).values())
    coded = [f for f in part if f.kind not in MODEL_KINDS]
    diffs = [f for f in part if f.kind == "diff"]
    neurons = [f for f in part if f.kind == "neuron"]
    if (diffs or neurons) and engine is None:
        raise ValueError(f"the suite's model-backed functions ({(diffs or neurons)[0].id}, ...) need a model: "
                         "give --model")
    out = runner.run([BlackBox(f, budget=runner.budget) for f in coded]) if coded else []
    if diffs:
        out += (runner if isinstance(runner, LMAgent) else AskAgent()).run(diff_boxes(engine, diffs))
    if neurons:
        out += runner.run(neuron_boxes(engine, neurons, budget=runner.budget))
    at = {f.id: n for n, f in enumerate(part)}
    return sorted(out, key=lambda a: at[a.id])


def _agent(name: str, settings: dict, engine):
    if name == "search":
        return SearchAgent(**settings)
    if name == "lm":
        if engine is None:
            raise ValueError("the lm agent needs an engine (a loaded model)")
        return LMAgent(engine, **settings)
    return None  # reference / zero: fixed answers, no black box


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such suite file (write one with 'dit find generate')") from None

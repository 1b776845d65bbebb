"""FIND on weight diffs: an agent probes each diff of a zoo as a black box (:class:`~.model_backed.DiffBox`)
and describes it; descriptions are scored by retrieval of the diff's label among the task's labels,
next to DIT's answers (a ``dit interpret`` results file) on the same diffs, scored the same way.

Writes ``describe.json`` (the settings a resume must match), ``answers.jsonl`` (one
:class:`~.score.Answer` per diff, with its transcript, appended batch by batch) and ``diffs.json``
(the retrieval scores of the agent and of each method in the results file, the mean number of
calls, the settings) into the output directory.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from ..evaluate import load_results
from ..files import read_json, write_json
from ..jobs import job
from ..provenance import provenance
from ..tasks import get_task
from ..zoo import BaseIdentity, Zoo
from .lm_agent import LMAgent
from .model_backed import AskAgent, DiffBox
from .run import ANSWERS, append_answers, load_answers
from .score import retrieval, task_candidates

DIFF_AGENTS = ("ask", "lm")
HEADER, HEADER_FORMAT = "describe.json", 1  # what a resume must match


def describe_diffs(engine, zoo_path: str | Path, agent: str, out: str | Path, *, task: str = "hidden-topic",
                   split: str | None = None, limit: int | None = None, mode: str = "text", rounds: int = 3,
                   max_new_tokens: int = 32, dit_results: str | Path | None = None, batch_size: int = 32,
                   progress: bool = True) -> dict:
    """Describe the zoo's diffs with ``agent``, ``batch_size`` diffs at a time; each batch's answers
    are appended to ``answers.jsonl`` as it ends, so a rerun of the same command (a kill, Ctrl-C)
    continues with the diffs not yet described. The scores are written once every diff has its answer."""
    if agent not in DIFF_AGENTS:
        raise ValueError(f"unknown diff agent {agent!r}; use one of {', '.join(DIFF_AGENTS)}")
    t = get_task(task)
    out = Path(out)
    mode = mode if agent == "lm" else "text"
    header = {"format": HEADER_FORMAT, "zoo": str(zoo_path), "task": task, "split": split, "limit": limit,
              "agent": agent, "mode": mode, "rounds": rounds if agent == "lm" else None,
              "max_new_tokens": max_new_tokens}
    with Zoo.open(zoo_path, base=BaseIdentity.from_model(engine.model)) as zoo:
        ids = zoo.ids(split)[:limit] if limit is not None else zoo.ids(split)
        if not ids:
            raise ValueError(f"{zoo_path}: no diffs{f' in split {split!r}' if split else ''} to describe")
        labels = {}
        for i in ids:
            value = zoo.row(i)["labels"].get(t.label_key)
            if value is None:
                raise ValueError(f"{zoo_path}: diff {i} has no {t.label_key!r} label (task {task})")
            labels[i] = value
        candidates = task_candidates(task, list(labels.values()))
        out.mkdir(parents=True, exist_ok=True)
        if (out / HEADER).exists():
            old = read_json(out / HEADER, "a 'dit find diffs' run header", kind=dict)
            if {k: old.get(k) for k in header} != header:
                changed = ", ".join(k for k in header if old.get(k) != header[k])
                raise ValueError(f"{out} holds descriptions made with another {changed}; write this run to "
                                 "another --out (or delete it to start again)")
        else:
            write_json(out / HEADER, header)
        done = load_answers(out, repair=True)
        todo = [i for i in ids if i not in done]
        runner = AskAgent() if agent == "ask" else LMAgent(engine, rounds=rounds, batch_size=batch_size)
        with job("dit find diffs") as j, open(out / ANSWERS, "ab", buffering=0) as fh, \
                tqdm(total=len(ids), initial=len(ids) - len(todo), desc=f"find diffs ({agent})", unit="diff",
                     disable=not progress, leave=False) as bar:
            for s in range(0, len(todo), batch_size):
                part = todo[s:s + batch_size]
                boxes = [DiffBox(engine, zoo.get(i, dtype=engine.model.dtype), mode=mode,
                                 max_new_tokens=max_new_tokens) for i in part]
                answers = runner.run(boxes)
                append_answers(fh, answers, out / ANSWERS)
                bar.update(len(part))
                j.checkpointed()
                j.stop_if_requested(out)
    answers = load_answers(out)
    described = {i: answers[i] for i in ids}
    scores = {"agent": agent, **retrieval({i: a.description for i, a in described.items()}, labels, candidates)}
    result = {"zoo": str(zoo_path), "task": task, "split": split, "mode": mode, "n": len(ids),
              "mean_calls": sum(a.calls for a in described.values()) / len(described), "scores": [scores],
              "provenance": provenance()}
    if dit_results is not None:
        rows = [r for r in load_results(dit_results) if r["id"] in labels]
        for method in dict.fromkeys(r["method"] for r in rows):
            texts = {r["id"]: r["answer"] for r in rows if r["method"] == method}
            result["scores"].append({"agent": f"{method} (from {Path(dit_results).name})",
                                     **retrieval(texts, labels, candidates)})
    write_json(out / "diffs.json", result)
    return result


def format_diff_table(result: dict) -> str:
    lines = [f"{'who':32s} {'n':>4s} {'ret@1':>6s} {'ret@5':>6s} {'MRR':>6s}"]
    for s in result["scores"]:
        lines.append(f"{s['agent'][:32]:32s} {s['n']:4d} {s['retrieval@1']:6.3f} {s['retrieval@5']:6.3f} "
                     f"{s['mrr']:6.3f}")
    return "\n".join(lines + [f"mean calls per diff ({result['scores'][0]['agent']}): {result['mean_calls']:.1f}"])

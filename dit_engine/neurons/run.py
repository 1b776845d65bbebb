"""The explain, simulate and score stages over a record run directory, each resumable.

Which records go where (fixed per neuron, so every stage agrees): the top records at even ranks
(1st, 3rd, ...) are shown to the explainer (``n_explain`` of them); the scored records are the top
records at odd ranks (``n_score_top``, held out from the explainer) and the first ``n_score_random``
records of the neuron's random sample. Neurons: every recorded one, or ``per_layer`` per layer
drawn with a seed.

Files written beside the records (JSONL: one row per neuron and explainer / simulator, appended
and flushed batch by batch; a rerun skips the rows already there, and a last line cut short by a
kill is dropped):

* ``explanations.jsonl``: ``{layer, neuron, explainer, explanations: [...]}``; each explainer's
  rows are followed by its random baseline, ``<explainer>-random`` (another neuron's explanations);
* ``simulations.jsonl``: ``{layer, neuron, explainer, simulator, windows, kinds, sim: [sample][record][T]}``;
* ``scores.jsonl``: per (neuron, explainer, simulator): the mean over the explanation samples of
  each score, the best sample and its explanation; ``scores.json``: per layer means and rankings.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..files import FileFormatError, append_synced, drop_cut_line, write_json, write_text
from ..jobs import DEFAULT_CHECKPOINT_EVERY_S, job
from .explain import random_baseline
from .record import NeuronRecords, Record
from .score import layer_ranking, scores

EXPLANATIONS, SIMULATIONS, SCORES, SUMMARY = "explanations.jsonl", "simulations.jsonl", "scores.jsonl", "scores.json"


@dataclasses.dataclass(frozen=True)
class Split:
    n_explain: int = 5
    n_score_top: int = 5
    n_score_random: int = 5

    def explain_records(self, rec: NeuronRecords, layer: int, neuron: int) -> list[Record]:
        return rec.top(layer, neuron)[0::2][: self.n_explain]

    def score_records(self, rec: NeuronRecords, layer: int, neuron: int) -> tuple[list[Record], list[str]]:
        top = rec.top(layer, neuron)[1::2][: self.n_score_top]
        rnd = rec.sample(layer, neuron)[: self.n_score_random]
        return top + rnd, ["top"] * len(top) + ["random"] * len(rnd)


def select_neurons(rec: NeuronRecords, per_layer: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    if per_layer is None or per_layer >= rec.neurons_per_layer:
        return rec.neurons()
    rng = random.Random(seed)
    return [(layer, n) for layer in rec.layers for n in sorted(rng.sample(range(rec.neurons_per_layer), per_layer))]


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file this module appends to ([] when absent); a last line cut short by a
    kill is removed from the file, any other bad line is an error naming it."""
    if not path.is_file():
        return []
    drop_cut_line(path)
    data = path.read_bytes()
    rows = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path}: line {n} is not JSON ({e.msg}); delete the file to redo that stage") from None
        if not isinstance(row, dict):
            raise FileFormatError(f"{path}: line {n} is not a JSON object")
        rows.append(row)
    return rows


def _append(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "ab", buffering=0) as fh:
        append_synced(fh, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode(), path)


def explain_run(run: str | Path, explainer, *, per_layer: int | None = None, seed: int = 0, split: Split = Split(),
                neurons: Sequence[tuple[int, int]] | None = None, batch_neurons: int = 32,
                checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S, progress: bool = True) -> Path:
    """Explain the chosen neurons (``neurons``, else ``per_layer`` per layer, else all) with
    ``explainer`` (``.name``, ``.explain``), then its random baseline."""
    run = Path(run)
    rec = NeuronRecords.load(run)
    path = run / EXPLANATIONS
    done = {(r["layer"], r["neuron"], r["explainer"]) for r in read_rows(path)}
    chosen = select_neurons(rec, per_layer, seed) if neurons is None else [tuple(n) for n in neurons]
    for n in chosen:
        rec.top(*n)  # a neuron the run does not hold is an error here, before any work
    todo = [n for n in chosen if (*n, explainer.name) not in done]
    with job("neuron explanation", checkpoint_every_s) as j, \
            tqdm(total=len(todo), disable=not progress, desc=f"explain ({explainer.name})", unit="neuron") as bar:
        for s in range(0, len(todo), batch_neurons):
            chunk = todo[s:s + batch_neurons]
            inputs = [(split.explain_records(rec, *n), rec.max_activation(*n)) for n in chunk]
            texts = explainer.explain(inputs)
            _append(path, [{"layer": n[0], "neuron": n[1], "explainer": explainer.name, "explanations": t}
                           for n, t in zip(chunk, texts)])
            bar.update(len(chunk))
            j.stop_if_requested(path)
    rows = read_rows(path)
    baseline = f"{explainer.name}-random"
    have = {(r["layer"], r["neuron"]) for r in rows if r["explainer"] == baseline}
    mine = {(r["layer"], r["neuron"]): r["explanations"] for r in rows if r["explainer"] == explainer.name}
    if len(mine) >= 2 and set(mine) - have:  # neurons explained since the last baseline get theirs
        _append(path, [{"layer": k[0], "neuron": k[1], "explainer": baseline, "explanations": v}
                       for k, v in sorted(random_baseline(mine, seed).items()) if k not in have])
    return path


def simulate_run(run: str | Path, simulator, *, explainers: Sequence[str] | None = None,
                 neurons: Sequence[tuple[int, int]] | None = None, split: Split = Split(),
                 batch_neurons: int = 8, checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S,
                 progress: bool = True) -> Path:
    """Simulate every explanation (of ``explainers``, of ``neurons``; default all) on its neuron's
    scored records, all positions at once."""
    run = Path(run)
    rec = NeuronRecords.load(run)
    keep = None if neurons is None else {tuple(n) for n in neurons}
    expl = [r for r in read_rows(run / EXPLANATIONS) if (explainers is None or r["explainer"] in explainers)
            and (keep is None or (r["layer"], r["neuron"]) in keep)]
    if not expl:
        raise FileFormatError(f"{run / EXPLANATIONS}: no explanations to simulate (run 'dit neurons explain' first)")
    path = run / SIMULATIONS
    done = {(r["layer"], r["neuron"], r["explainer"], r["simulator"]) for r in read_rows(path)}
    todo = [r for r in expl if (r["layer"], r["neuron"], r["explainer"], simulator.name) not in done]
    with job("neuron simulation", checkpoint_every_s) as j, \
            tqdm(total=len(todo), disable=not progress, desc=f"simulate ({simulator.name})", unit="neuron") as bar:
        for s in range(0, len(todo), batch_neurons):
            chunk = todo[s:s + batch_neurons]
            items, shape, rows = [], [], []
            for r in chunk:
                recs, kinds = split.score_records(rec, r["layer"], r["neuron"])
                items += [(e, q.tokens) for e in r["explanations"] for q in recs]
                shape.append((len(r["explanations"]), len(recs)))
                rows.append({"layer": r["layer"], "neuron": r["neuron"], "explainer": r["explainer"],
                             "simulator": simulator.name, "windows": [q.window for q in recs], "kinds": kinds})
            sims = simulator.simulate(items)  # every (explanation, record) of the chunk in one call
            at = 0
            for row, (n_e, n_r) in zip(rows, shape):
                row["sim"] = [[np.round(sims[at + e * n_r + q], 5).tolist() for q in range(n_r)] for e in range(n_e)]
                at += n_e * n_r
            _append(path, rows)
            bar.update(len(chunk))
            j.stop_if_requested(path)
    return path


def score_run(run: str | Path, *, rank_top: int = 10) -> dict:
    """Score every simulation against the real activations; writes scores.jsonl and scores.json."""
    run = Path(run)
    rec = NeuronRecords.load(run)
    sims = read_rows(run / SIMULATIONS)
    if not sims:
        raise FileFormatError(f"{run / SIMULATIONS}: no simulations to score (run 'dit neurons simulate' first)")
    expl = {(r["layer"], r["neuron"], r["explainer"]): r["explanations"] for r in read_rows(run / EXPLANATIONS)}
    out = []
    for s in sims:
        layer, neuron = s["layer"], s["neuron"]
        real = _real(rec, layer, neuron, s["windows"], s["kinds"])
        per = [scores(real, [np.asarray(x) for x in sample]) for sample in s["sim"]]
        best = int(np.argmax([p["correlation"] for p in per]))
        texts = expl.get((layer, neuron, s["explainer"]), [""] * len(per))
        out.append({"layer": layer, "neuron": neuron, "explainer": s["explainer"], "simulator": s["simulator"],
                    **{k: float(np.mean([p[k] for p in per])) for k in per[0]},
                    "best_correlation": per[best]["correlation"], "best_explanation": texts[best],
                    "samples": per})
    write_text(run / SCORES, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in out))
    summary = summarise(out, rank_top)
    write_json(run / SUMMARY, summary)
    return summary


def summarise(rows: Sequence[dict], rank_top: int = 10) -> dict:
    """Per (explainer, simulator): neurons, mean scores overall and per layer, the best neurons per layer."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['explainer']} / {r['simulator']}", []).append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        per_layer = {}
        for layer, ranked in layer_ranking(rs).items():
            per_layer[str(layer)] = {
                "neurons": len(ranked), **{k: float(np.mean([r[k] for r in ranked]))
                                           for k in ("correlation", "r2", "abs_dev_explained")},
                "best": [{"neuron": r["neuron"], "correlation": r["correlation"], "explanation": r["best_explanation"]}
                         for r in ranked[:rank_top]]}
        out[name] = {"neurons": len(rs), "correlation": float(np.mean([r["correlation"] for r in rs])),
                     "r2": float(np.mean([r["r2"] for r in rs])),
                     "abs_dev_explained": float(np.mean([r["abs_dev_explained"] for r in rs])), "layers": per_layer}
    return out


def _real(rec: NeuronRecords, layer: int, neuron: int, windows: Sequence[int], kinds: Sequence[str]) -> list[np.ndarray]:
    """The recorded activations of the scored records, found by window in the top or the sample."""
    by_kind = {"top": {r.window: r.acts for r in rec.top(layer, neuron)},
               "random": {r.window: r.acts for r in rec.sample(layer, neuron)}}
    try:
        return [by_kind[k][w] for w, k in zip(windows, kinds)]
    except KeyError:
        raise FileFormatError(f"{rec.run / SIMULATIONS}: neuron {layer}/{neuron} was simulated on records the "
                              "record run does not hold (records changed since? delete simulations.jsonl)") from None


"""``dit find pipeline``: the FIND benchmark in one resumable command.

Into one directory: the seeded suite (``suite.jsonl``: numeric and string functions, plus neurons of
the model from a record run made here, ``neurons/``, plus a zoo's diffs when one is given), then
the search agent, the calibration agents (reference, zero) and the lm agent (its first
``lm_limit`` functions of each kind) each in its run directory, each scored, and one report
(``report/``). Every stage resumes: the record run and the agent runs continue where a kill
stopped them, a suite already written is kept (it must be this preset's), a run already scored is
not scored again (delete its ``summary.json`` to rescore it). ``timings.json`` holds each stage's wall time,
summed over resumes.

Presets: ``cpu`` (500 numeric + 500 string functions, 4 neurons from each of 6 layers recorded over
256 windows of 32 tokens, the lm agent on 5 functions of each kind for 3 rounds: 5 min 43 s
measured on a 2-core CPU with the default model) and ``full`` (the same suite, neurons from every
layer over the whole corpus, 20 a layer, the lm agent on every function for 5 rounds: a GPU's work).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..engine import Engine
from ..files import read_json
from ..jobs import StageTimings
from ..neurons.corpus import PACKAGED, build_corpus
from ..neurons.pipeline import spaced_layers
from ..neurons.record import RecordConfig, record_neurons
from .model_backed import diff_functions
from .neurons import neuron_functions
from .report import write_report
from .run import SUMMARY, run_agent, score_run
from .suite import build_suite, load_suite, save_suite

SUITE, NEURONS, REPORT = "suite.jsonl", "neurons", "report"


@dataclasses.dataclass(frozen=True)
class FindPreset:
    n_numeric: int
    n_string: int
    neuron_layers: int | None  # evenly spaced layers recorded; None: every layer
    neuron_windows: int | None  # record windows; None: the whole corpus
    neuron_context: int
    neurons_per_layer: int
    lm_limit: int | None  # the lm agent answers the first N functions of each kind; None: all
    lm_rounds: int
    top_k: int = 20  # records kept per neuron (top and random each)


PRESETS = {
    "cpu": FindPreset(n_numeric=500, n_string=500, neuron_layers=6, neuron_windows=256, neuron_context=32,
                      neurons_per_layer=4, lm_limit=5, lm_rounds=3, top_k=10),
    "full": FindPreset(n_numeric=500, n_string=500, neuron_layers=None, neuron_windows=None, neuron_context=64,
                       neurons_per_layer=20, lm_limit=None, lm_rounds=5),
}
AGENT_RUNS = ("search", "reference", "zero", "lm")


def run_pipeline(engine: Engine, out: str | Path, preset: FindPreset, *, seed: int = 0, corpus: str = PACKAGED,
                 zoo: str | Path | None = None, zoo_split: str | None = None, task: str = "hidden-topic",
                 progress: bool = True) -> dict:
    """Every stage into ``out``; returns ``{agent: its score summary}``."""
    out = Path(out)
    suite = out / SUITE
    if suite.exists():
        _check_suite(suite, preset, seed)
    else:  # the corpus is read before anything is written: a bad one leaves no directory behind
        cfg = RecordConfig(layers=spaced_layers(engine.config.num_hidden_layers, preset.neuron_layers),
                           top_k=preset.top_k, sample_k=preset.top_k, seed=seed)
        windows = build_corpus(engine.tokenizer, corpus, context=preset.neuron_context,
                               max_windows=preset.neuron_windows)
    out.mkdir(parents=True, exist_ok=True)
    stage = StageTimings(out / "timings.json").run
    if not suite.exists():
        stage("record neurons", lambda: record_neurons(engine.model, windows, out / NEURONS, cfg, progress=progress))

        def make_suite():
            fns = build_suite(seed, preset.n_numeric, preset.n_string)
            fns += neuron_functions(out / NEURONS, per_layer=preset.neurons_per_layer, seed=seed)
            if zoo is not None:
                fns += diff_functions(zoo, split=zoo_split, task=task)
            save_suite(suite, fns, seed=seed)

        stage("suite", make_suite)
    runs = []
    for agent in AGENT_RUNS:
        # The search agent probes neurons with the text they were recorded over.
        settings = ({"rounds": preset.lm_rounds} if agent == "lm" else
                    {"probe_corpus": str(corpus)} if agent == "search" and corpus != PACKAGED else {})
        limit = preset.lm_limit if agent == "lm" else None
        stage(f"run {agent}", lambda: run_agent(suite, out / agent, agent, settings=settings, engine=engine,
                                                limit=limit, progress=progress))
        runs.append(out / agent)
    summaries = {}
    for agent, run in zip(AGENT_RUNS, runs):
        if (run / SUMMARY).exists():  # scored once its run was complete: the answers cannot have changed since
            summaries[agent] = read_json(run / SUMMARY, "a scored FIND run", kind=dict)["summary"]
        else:
            summaries[agent] = stage(f"score {agent}", lambda: score_run(suite, run, progress=progress))["summary"]
    stage("report", lambda: write_report(suite, runs, out / REPORT))
    return summaries


def _check_suite(suite: Path, preset: FindPreset, seed: int) -> None:
    """A suite already in the directory must be this preset's (same seed and counts)."""
    fns = load_suite(suite)  # checks the header
    with open(suite, encoding="utf-8") as fh:
        header = json.loads(fh.readline())
    n_num = sum(f.kind == "numeric" for f in fns)
    n_str = sum(f.kind == "string" for f in fns)
    if (header.get("seed"), n_num, n_str) != (seed, preset.n_numeric, preset.n_string):
        raise ValueError(f"{suite}: a suite of seed {header.get('seed')} with {n_num} numeric and {n_str} string "
                         f"functions, not this preset's (seed {seed}, {preset.n_numeric} and {preset.n_string}); "
                         "use another --out")


"""``dit neurons pipeline``: every stage of a neuron-explanation run in one resumable command.

Record (evenly spaced layers over a corpus), explain with the token explainer (many neurons, no
model) and the LM explainer (a seeded subset of those), simulate the token explanations with the
keyword simulator and the LM subset (its LM and token explanations, with their random baselines)
with the LM simulator, score, and write the viewer. Every stage is one of the stage functions of
:mod:`.run` and :mod:`.record`, so a rerun resumes where a kill stopped it; ``timings.json`` holds
each stage's wall time, summed over resumes.

Presets: ``cpu`` (5 min 29 s measured on a 2-core CPU with the default model: 6 layers, 50 neurons a
layer explained by tokens, 4 of them by the LM) and ``full`` (every layer and window, every neuron
by tokens, 20 a layer by the LM, the paper's 5 samples: a GPU's work).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from ..engine import Engine
from ..jobs import StageTimings
from .corpus import PACKAGED, build_corpus
from .explain import LMExplainer, TokenExplainer
from .record import NeuronRecords, RecordConfig, record_neurons
from .run import Split, explain_run, score_run, select_neurons, simulate_run
from .simulate import KeywordSimulator, LMSimulator
from .viewer import write_viewer


@dataclasses.dataclass(frozen=True)
class NeuronPreset:
    n_layers: int | None  # evenly spaced layers, the first and the last included; None: every layer
    max_windows: int | None  # None: the whole corpus
    context: int  # tokens per record window
    tokens_per_layer: int | None  # neurons a layer explained by the token explainer; None: all
    lm_per_layer: int  # of those, explained by the LM explainer and simulated by the LM simulator
    n_samples: int  # LM explanations per neuron
    top_k: int = 20
    sample_k: int = 20


PRESETS = {
    "cpu": NeuronPreset(n_layers=6, max_windows=256, context=32, tokens_per_layer=50, lm_per_layer=4, n_samples=2,
                        top_k=10, sample_k=10),
    "full": NeuronPreset(n_layers=None, max_windows=None, context=64, tokens_per_layer=None, lm_per_layer=20,
                         n_samples=5),
}


def spaced_layers(n_model_layers: int, n: int | None) -> tuple[int, ...]:
    """``n`` layers spread evenly over the model's depth, the first and the last included."""
    if n is None or n >= n_model_layers:
        return tuple(range(n_model_layers))
    if n == 1:
        return (0,)
    return tuple(dict.fromkeys(round(i * (n_model_layers - 1) / (n - 1)) for i in range(n)))


def lm_neurons(rec: NeuronRecords, preset: NeuronPreset, seed: int) -> list[tuple[int, int]]:
    """A seeded ``lm_per_layer`` of the token explainer's neurons in each layer."""
    chosen = select_neurons(rec, preset.tokens_per_layer, seed)
    rng = random.Random(seed + 1)
    out = []
    for layer in rec.layers:
        mine = [n for n in chosen if n[0] == layer]
        out += sorted(rng.sample(mine, min(preset.lm_per_layer, len(mine))))
    return out


def run_pipeline(engine: Engine, out: str | Path, preset: NeuronPreset, *, corpus: str = PACKAGED, seed: int = 0,
                 progress: bool = True) -> dict:
    """Every stage into ``out`` (resumed where it stopped); the score summary."""
    out = Path(out)  # made by the record stage, after the corpus and the model are known to be good
    stage = StageTimings(out / "timings.json").run

    split = Split()
    layers = spaced_layers(engine.config.num_hidden_layers, preset.n_layers)
    cfg = RecordConfig(layers=layers, top_k=preset.top_k, sample_k=preset.sample_k, seed=seed)
    windows = build_corpus(engine.tokenizer, corpus, context=preset.context, max_windows=preset.max_windows)
    rec = stage("record", lambda: record_neurons(engine.model, windows, out, cfg, progress=progress))
    subset = lm_neurons(rec, preset, seed)
    stage("explain tokens", lambda: explain_run(out, TokenExplainer(), per_layer=preset.tokens_per_layer, seed=seed,
                                                split=split, progress=progress))
    stage("explain lm", lambda: explain_run(out, LMExplainer(engine, n_samples=preset.n_samples, seed=seed),
                                            neurons=subset, split=split, progress=progress))
    stage("simulate keyword", lambda: simulate_run(out, KeywordSimulator(), explainers=["tokens", "tokens-random"],
                                                   split=split, progress=progress))
    stage("simulate lm", lambda: simulate_run(out, LMSimulator(engine.model, engine.tokenizer), neurons=subset,
                                              split=split, progress=progress))
    summary = stage("score", lambda: score_run(out))
    stage("view", lambda: write_viewer(out, per_layer=min(10, preset.tokens_per_layer or 10)))
    return summary

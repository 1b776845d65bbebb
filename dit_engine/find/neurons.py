"""MLP neurons as FIND functions, with a ground truth taken from their records.

A neuron function (kind ``"neuron"``, category ``model/neuron``) is one neuron of a ``dit neurons
record`` run: the black box is f(text) -> the neuron's largest activation over the text's tokens
(:class:`.model_backed.NeuronBox`, on the recorded model: :func:`.model_backed.neuron_boxes` checks
its weights). A neuron has no reference code; what stands for its ground truth is measured:

* its **description** is the token explainer's explanation (:class:`dit_engine.neurons.explain.
  TokenExplainer`) of its explain-split top records (the even-ranked ones,
  :class:`dit_engine.neurons.run.Split`): the tokens that carry its activation;
* its **held-out records** (the odd-ranked top records and the random sample, the neuron room's
  scoring split) are stored in the suite with their real activations, so scoring needs no model.

An answer's description is scored as the neuron room scores an explanation: the keyword simulator
(10 on the tokens the description names in double quotes, 0 elsewhere) on the held-out records,
pooled Pearson correlation with the real activations. The ground truth's own correlation is stored
(``reference_correlation``); an answer is **correct** when its correlation reaches
:data:`NEURON_CORRECT` of it. So the ground truth scores 1.0 by construction, an empty or unquoted
description scores 0 correlation, and only neurons the token explanation explains at all
(reference correlation >= ``min_reference``, default :data:`MIN_REFERENCE`) enter the suite, so a
correct answer means something.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..neurons.explain import TokenExplainer
from ..neurons.record import NeuronRecords
from ..neurons.run import Split
from ..neurons.score import correlation
from ..neurons.simulate import KeywordSimulator
from .suite import Function

NEURON_CATEGORY = "model/neuron"
NEURON_CORRECT = 0.5  # an answer's correlation over the ground truth's, to count as correct
MIN_REFERENCE = 0.3  # the ground truth's correlation a neuron needs to enter the suite


def neuron_functions(run: str | Path, *, per_layer: int = 4, seed: int = 0, min_reference: float = MIN_REFERENCE,
                     split: Split = Split()) -> list[Function]:
    """``per_layer`` neurons of each recorded layer (seeded, among those whose token explanation
    reaches ``min_reference`` correlation on their held-out records) as suite functions."""
    if per_layer < 1:
        raise ValueError(f"per_layer must be >= 1, got {per_layer}")
    run = Path(run)
    rec = NeuronRecords.load(run)
    if not rec.complete:
        raise ValueError(f"{run}: the record run is not finished ({rec.windows_done} of {rec.meta['windows']} "
                         "windows); rerun 'dit neurons record' to finish it")
    if rec.meta.get("diff"):
        raise ValueError(f"{run}: records base + diff {rec.meta['diff']['id']}; FIND neurons are the base model's "
                         "(record the base)")
    explainer, sim = TokenExplainer(), KeywordSimulator()
    rng = random.Random(f"find-neurons-{seed}")
    out = []
    for layer in rec.layers:
        order = list(range(rec.neurons_per_layer))
        rng.shuffle(order)
        kept = 0
        for n in order:
            if kept == per_layer:
                break
            recs, kinds = split.score_records(rec, layer, n)
            if rec.max_activation(layer, n) <= 0 or not recs:
                continue
            truth = explainer.explain_one(split.explain_records(rec, layer, n), rec.max_activation(layer, n))
            held = [{"kind": k, "tokens": list(r.tokens), "acts": [float(a) for a in r.acts]} for r, k in zip(recs, kinds)]
            ref = held_out_correlation(held, truth, sim)
            if ref < min_reference:
                continue
            out.append(Function(
                id=f"neuron/{layer}/{n}", kind="neuron", category=NEURON_CATEGORY, description=truth,
                domain={"text": "any text", "interval": None}, code="",
                spec={"model": dict(rec.meta["model"]), "record_run": str(run.resolve()), "layer": layer, "neuron": n,
                      "reference_correlation": ref, "held_out": held}))
            kept += 1
    if not out:
        raise ValueError(f"{run}: no neuron's token explanation reaches correlation {min_reference} on its held-out "
                         "records; record more windows, or lower --neuron-min-reference")
    return out


def held_out_correlation(held: Sequence[dict], description: str, sim: KeywordSimulator | None = None) -> float:
    """The keyword simulation of ``description`` on the held-out records against their real activations."""
    sim = sim or KeywordSimulator()
    simulated = sim.simulate([(description or "", r["tokens"]) for r in held])
    return correlation([np.asarray(r["acts"], dtype=np.float64) for r in held], simulated)


def neuron_scores(functions: Sequence[Function], descriptions: dict[str, str]) -> dict[str, dict]:
    """Per ``neuron`` function: the correlation of its description (none: "") and whether it is correct."""
    sim, out = KeywordSimulator(), {}
    for f in functions:
        corr = held_out_correlation(f.spec["held_out"], descriptions.get(f.id, ""), sim)
        ref = float(f.spec["reference_correlation"])
        out[f.id] = {"correlation": corr, "reference_correlation": ref,
                     "correct": f.id in descriptions and ref > 0 and corr >= NEURON_CORRECT * ref}
    return out

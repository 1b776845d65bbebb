"""Neurons a finetune moved: given a LoRA weight diff (a zoo diff or any PEFT LoRA), the neurons
whose activations shift most between the base and base + diff on neutral text.

Every window of the corpus goes through the model twice per batch, without and with the diff (the
diff in adapter slot 0, no weights merged), every chosen layer's neurons captured both times. Per
neuron: the mean absolute shift ``mean |a_diff - a_base|`` over every position (the ranking), the
mean signed shift and the base's mean ``|a|`` (for scale). :func:`moved_run` writes them to
``moved.json`` in a run directory and records the finetuned model there (base + diff, the usual
record run), so ``dit neurons explain --moved`` explains exactly those neurons and the viewer shows
them first, with their shift.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import read_json, write_json
from ..model import Transformer
from ..zoo.format import Diff
from .corpus import Corpus, check_windows
from .record import NeuronRecords, RecordConfig, RecordError, diff_adapters, mlp_activations, record_neurons

MOVED = "moved.json"


@dataclasses.dataclass
class NeuronShift:
    layers: list[int]
    abs_shift: np.ndarray  # [L, F] mean |a_diff - a_base|
    shift: np.ndarray  # [L, F] mean (a_diff - a_base)
    base_abs: np.ndarray  # [L, F] mean |a_base|

    def ranked(self, top: int | None = None) -> list[dict]:
        """The neurons by mean absolute shift, largest first (ties by layer, neuron)."""
        flat = self.abs_shift.ravel()
        order = np.lexsort((np.arange(flat.size), -flat))[:top]
        f = self.abs_shift.shape[1]
        return [{"layer": self.layers[i // f], "neuron": int(i % f), "abs_shift": float(flat[i]),
                 "shift": float(self.shift.ravel()[i]), "base_abs": float(self.base_abs.ravel()[i])} for i in order]


@torch.no_grad()
def neuron_shift(model: Transformer, diff: Diff, corpus: Corpus, *, layers: list[int] | None = None,
                 batch_size: int = 8, progress: bool = True) -> NeuronShift:
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    check_windows(corpus.ids, model.config.vocab_size)
    f = model.config.intermediate_size
    sums = {k: torch.zeros(len(layers), f, dtype=torch.float64) for k in ("abs", "signed", "base")}
    n = 0
    for s in tqdm(range(0, corpus.n_windows, batch_size), disable=not progress, desc="neuron shift", unit="batch"):
        ids = corpus.ids[s:s + batch_size].to(model.device)
        base = mlp_activations(model, ids, layers)
        tuned = mlp_activations(model, ids, layers, adapters=diff_adapters(diff, ids.shape[0], model))
        for j, layer in enumerate(layers):
            a, b = base[layer].double().cpu(), tuned[layer].double().cpu()
            sums["abs"][j] += (b - a).abs().sum((0, 1))
            sums["signed"][j] += (b - a).sum((0, 1))
            sums["base"][j] += a.abs().sum((0, 1))
        n += ids.numel()
    return NeuronShift(layers, *(((sums[k] / max(n, 1)).numpy()) for k in ("abs", "signed", "base")))


def moved_run(model: Transformer, diff: Diff, corpus: Corpus, run: str | Path, cfg: RecordConfig | None = None, *,
              top: int = 50, progress: bool = True) -> NeuronRecords:
    """``moved.json`` (the ``top`` neurons by shift) and a record run of base + diff in ``run``."""
    cfg = cfg or RecordConfig()
    run = Path(run)
    layers = None if cfg.layers is None else list(cfg.layers)
    if not (run / MOVED).is_file():
        shift = neuron_shift(model, diff, corpus, layers=layers, batch_size=cfg.batch_size, progress=progress)
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / MOVED, {"diff": diff.id, "corpus": corpus.info["sha256"], "neurons": shift.ranked(top)})
    return record_neurons(model, corpus, run, cfg, diff=diff, progress=progress)


def read_moved(run: str | Path) -> list[dict]:
    """The moved neurons of a run ([] when it has no moved.json)."""
    path = Path(run) / MOVED
    if not path.is_file():
        return []
    doc = read_json(path, "a moved-neurons file", kind=dict, error=RecordError)
    rows = doc.get("neurons")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"layer", "neuron", "abs_shift"} <= set(r)
                                             for r in rows):
        raise RecordError(f"{path}: 'neurons' must be a list of {{layer, neuron, abs_shift, ...}} objects")
    return rows

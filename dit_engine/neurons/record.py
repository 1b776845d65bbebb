"""Record every MLP neuron at once: one batched forward per batch of windows, streaming per-neuron
top-k and random samples, resumable.

A neuron is one channel of ``mlp.I`` (:mod:`dit_engine.probes`: block I's SwiGLU product entering
``down_proj``). Every forward captures all chosen layers through one :class:`~dit_engine.probes.Probes`
and folds the batch into a fixed-size state with tensor ops only (no Python loop over neurons):

* **top**: per neuron, the ``top_k`` windows with the highest activation anywhere in the window
  (``torch.topk`` over the running top and the batch's window maxima, then a gather of their
  activations);
* **sample**: per neuron, a uniform random sample of ``sample_k`` windows without replacement
  (a reservoir by random priorities: each (window, neuron) draws a key from a generator seeded by
  the run seed and the window index; the ``sample_k`` largest keys are kept with the same topk
  merge). The keys depend on the window only, so the sample is the same for any batch size and
  across a resume;
* **by quantile**: :meth:`NeuronRecords.quantiles` splits the sample by its window maxima into
  equal-count bins (quantiles of the neuron's window-max distribution estimated from the sample);
* per-neuron mean activation and the fraction of positions where it is positive.

Memory is ``(top_k + sample_k) * layers * neurons * T`` floats, bounded by k, not by the corpus
(SmolLM2-135M, every layer, k = 20 + 20, T = 64: 470 MB).

On disk (the run directory, beside the corpus files of :mod:`.corpus`): ``records.safetensors``
(the state tensors, with the number of windows done in its metadata) and ``records.json``
(format tag, model identity, config, progress). Both are written atomically on a timer, on
SIGINT/SIGTERM and at the end; rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import AdapterBatch, LoraSlot
from ..checkpoint import weights_fingerprint
from ..files import read_json, write_atomically, write_json
from ..jobs import DEFAULT_CHECKPOINT_EVERY_S, job
from ..model import Transformer
from ..probes import Probes
from ..zoo.format import Diff
from .corpus import Corpus, check_windows

RECORDS_FORMAT = "dit-engine-neuron-records/1"
_KEY_STRIDE = 1_000_003  # seed * stride + window: one generator seed per window


class RecordError(ValueError):
    """A record run that cannot be resumed or read."""


@dataclasses.dataclass(frozen=True)
class RecordConfig:
    layers: tuple[int, ...] | None = None  # None: every layer
    top_k: int = 20
    sample_k: int = 20
    batch_size: int = 8  # windows per forward
    seed: int = 0
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S

    def __post_init__(self):
        for name in ("top_k", "sample_k", "batch_size"):
            if getattr(self, name) < 1:
                raise RecordError(f"{name} must be >= 1, found {getattr(self, name)}")

    def identity(self) -> dict:
        """What a resume must match (the batch size and the timer may change)."""
        return {"layers": list(self.layers) if self.layers is not None else None, "top_k": self.top_k,
                "sample_k": self.sample_k, "seed": self.seed}


@dataclasses.dataclass
class Record:
    window: int
    tokens: list[str]
    acts: np.ndarray  # [T] float32

    @property
    def max(self) -> float:
        return float(self.acts.max())


def mlp_activations(model: Transformer, ids: Tensor, layers: Sequence[int], *, via: str = "probes",
                    adapters: AdapterBatch | None = None) -> dict[int, Tensor]:
    """Every neuron of ``mlp.L`` for each L in ``layers`` over ``ids`` [B, T]: {L: [B, T, F]}.

    ``via="probes"`` captures through the runtime's probes; ``via="hooks"`` through plain forward
    pre-hooks on each ``down_proj`` (the usual way, kept as the bench's comparison and a test's
    independent reference). ``adapters``: the forward runs with them (a finetune's diff)."""
    b, t = ids.shape
    if via == "probes":
        probes = Probes()
        for layer in layers:
            probes.capture(f"mlp.{layer}")
        model(ids, adapters, output="hidden", probes=probes)
        return {layer: probes.captured[f"mlp.{layer}"].view(b, t, -1) for layer in layers}
    if via != "hooks":
        raise ValueError(f"via must be 'probes' or 'hooks', found {via!r}")
    got: dict[int, Tensor] = {}
    handles = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, layer=layer: got.__setitem__(layer, args[0].detach())) for layer in layers]
    try:
        model(ids, adapters, output="hidden")
    finally:
        for h in handles:
            h.remove()
    return got


class Recorder:
    """The streaming state of one record run: :meth:`update` folds in a batch of windows."""

    def __init__(self, layers: Sequence[int], n_neurons: int, context: int, cfg: RecordConfig):
        self.layers, self.cfg = list(layers), cfg
        nl, k, s, f, t = len(self.layers), cfg.top_k, cfg.sample_k, n_neurons, context
        self.t = {
            "top_val": torch.full((nl, k, f), float("-inf")), "top_win": torch.full((nl, k, f), -1, dtype=torch.int64),
            "top_act": torch.zeros(nl, k, f, t),
            "smp_key": torch.full((nl, s, f), float("-inf")), "smp_win": torch.full((nl, s, f), -1, dtype=torch.int64),
            "smp_act": torch.zeros(nl, s, f, t),
            "act_sum": torch.zeros(nl, f, dtype=torch.float64), "pos_count": torch.zeros(nl, f, dtype=torch.int64),
        }
        self.windows_done = 0

    @torch.no_grad()
    def update(self, acts: dict[int, Tensor], start: int) -> None:
        """Fold in windows ``start .. start + B - 1`` with their activations {layer: [B, T, F]}."""
        first = acts[self.layers[0]]
        b, t, f = first.shape
        if t != self.t["top_act"].shape[-1] or f != self.t["top_act"].shape[2]:
            raise RecordError(f"activations of shape {tuple(first.shape)}: expected [B, {self.t['top_act'].shape[-1]}, "
                              f"{self.t['top_act'].shape[2]}]")
        wins = torch.arange(start, start + b, dtype=torch.int64)
        keys = torch.stack([torch.rand(len(self.layers), f, generator=torch.Generator().manual_seed(
            self.cfg.seed * _KEY_STRIDE + int(w))) for w in wins], 1)  # [L, B, F]
        for j, layer in enumerate(self.layers):
            h = acts[layer].float().cpu()  # [B, T, F]
            if not torch.isfinite(h).all():
                raise RecordError(f"mlp.{layer}: non-finite activations in windows {start}..{start + b - 1}")
            per_neuron = h.permute(0, 2, 1)  # [B, F, T]
            self._merge("top", j, h.amax(1), wins, per_neuron)
            self._merge("smp", j, keys[j], wins, per_neuron)
            self.t["act_sum"][j] += h.sum((0, 1), dtype=torch.float64)
            self.t["pos_count"][j] += (h > 0).sum((0, 1))
        self.windows_done = start + b

    def _merge(self, kind: str, j: int, new_val: Tensor, wins: Tensor, new_act: Tensor) -> None:
        """Keep the k largest values per neuron of the running ones and the batch's [B, F]."""
        val_name = "top_val" if kind == "top" else "smp_key"
        val, win, act = self.t[val_name][j], self.t[f"{kind}_win"][j], self.t[f"{kind}_act"][j]  # [k,F] [k,F] [k,F,T]
        if not bool((new_val.amax(0) > val[-1]).any()):
            return  # nothing in this batch enters any neuron's list
        k, f = val.shape
        b = new_val.shape[0]
        all_val = torch.cat([val, new_val])  # [k+B, F]
        all_win = torch.cat([win, wins[:, None].expand(b, f)])
        all_act = torch.cat([act, new_act])  # [k+B, F, T]
        top, idx = torch.topk(all_val, k, dim=0)  # [k, F] sorted descending
        self.t[val_name][j] = top
        self.t[f"{kind}_win"][j] = all_win.gather(0, idx)
        self.t[f"{kind}_act"][j] = all_act.gather(0, idx[:, :, None].expand(k, f, all_act.shape[-1]))

    def save(self, path: Path) -> None:
        tensors = {k: v.contiguous() for k, v in self.t.items()}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={
            "format": RECORDS_FORMAT, "windows_done": str(self.windows_done)}))

    def load(self, path: Path) -> None:
        tensors, meta = _read_records(path)
        for k, v in self.t.items():
            if k not in tensors or tensors[k].shape != v.shape or tensors[k].dtype != v.dtype:
                found = tuple(tensors[k].shape) if k in tensors else "missing"
                raise RecordError(f"{path}: tensor {k} is {found}, expected {tuple(v.shape)} for this run's config")
        self.t = {k: tensors[k] for k in self.t}
        self.windows_done = int(meta["windows_done"])


def record_neurons(model: Transformer, corpus: Corpus, run: str | Path, cfg: RecordConfig | None = None, *,
                   diff: Diff | None = None, progress: bool = True) -> "NeuronRecords":
    """Record every neuron of the chosen layers over ``corpus`` into ``run`` (resuming a run there);
    with ``diff``, of the model with that LoRA weight diff applied (base + diff)."""
    cfg = cfg or RecordConfig()
    run = Path(run)
    n_layers, f = model.config.num_hidden_layers, model.config.intermediate_size
    layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers or len(set(layers)) != len(layers):
        raise RecordError(f"layers {layers}: expected distinct layers in 0 .. {n_layers - 1}")
    check_windows(corpus.ids, model.config.vocab_size)
    if corpus.context > model.config.max_position_embeddings:
        raise RecordError(f"windows of {corpus.context} tokens exceed the model's context of "
                          f"{model.config.max_position_embeddings}")
    meta = {"format": RECORDS_FORMAT, "model": {"name": model.config.name, "config_hash": model.config.config_hash,
                                                "weights_fingerprint": weights_fingerprint(model.state_dict())},
            "config": cfg.identity(), "layers": layers, "neurons_per_layer": f, "corpus": corpus.info["sha256"],
            "windows": corpus.n_windows, "context": corpus.context,
            "diff": None if diff is None else {"id": diff.id, "fingerprint": diff_fingerprint(diff)}}
    rec = Recorder(layers, f, corpus.context, cfg)
    state = run / "records.safetensors"
    if (run / "records.json").is_file():
        old = read_json(run / "records.json", "a neuron record run", kind=dict, error=RecordError)
        mismatch = [k for k in ("format", "model", "config", "layers", "corpus", "context", "diff")
                    if old.get(k) != meta[k]]
        if mismatch:
            raise RecordError(f"{run}: holds a record run with other {', '.join(mismatch)}; record into another "
                              "directory (or delete it to start again)")
        if state.is_file():
            rec.load(state)
    else:
        corpus.save(run)
    dev = model.device
    with job("neuron recording", cfg.checkpoint_every_s) as j, \
            tqdm(total=corpus.n_windows, initial=rec.windows_done, disable=not progress, desc="record neurons",
                 unit="window") as bar:
        for start in range(rec.windows_done, corpus.n_windows, cfg.batch_size):
            ids = corpus.ids[start:start + cfg.batch_size].to(dev)
            ad = None if diff is None else diff_adapters(diff, ids.shape[0], model)
            with torch.no_grad():
                rec.update(mlp_activations(model, ids, layers, adapters=ad), start)
            bar.update(ids.shape[0])
            if j.should_checkpoint():
                _checkpoint(rec, run, meta)
                j.checkpointed()
                j.stop_if_requested(run)
        _checkpoint(rec, run, meta)
    return NeuronRecords.load(run)


def diff_adapters(diff: Diff, rows: int, model: Transformer) -> AdapterBatch:
    """``diff`` applied to every one of ``rows`` sequences (one adapter in slot 0)."""
    dev, dt = model.device, model.dtype
    return AdapterBatch(LoraSlot(A={m: a[None].to(dev, dt) for m, a in diff.A.items()},
                                 B={m: b[None].to(dev, dt) for m, b in diff.B.items()},
                                 scale=torch.tensor([float(diff.scale)], device=dev),
                                 index=torch.zeros(rows, dtype=torch.int64, device=dev), name=diff.id))


def diff_fingerprint(diff: Diff) -> str:
    return weights_fingerprint({f"{m}.A": a for m, a in diff.A.items()} | {f"{m}.B": b for m, b in diff.B.items()}
                               | {"scale": torch.tensor([float(diff.scale)])})


def _checkpoint(rec: Recorder, run: Path, meta: dict) -> None:
    rec.save(run / "records.safetensors")  # the tensors carry their own progress; the JSON is for people
    write_json(run / "records.json", {**meta, "windows_done": rec.windows_done,
                                      "complete": rec.windows_done >= meta["windows"]})


def _read_records(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except FileNotFoundError:
        raise RecordError(f"{path}: not found (run 'dit neurons record' first)") from None
    except (SafetensorError, OSError) as e:
        raise RecordError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    if meta.get("format") != RECORDS_FORMAT or "windows_done" not in meta:
        raise RecordError(f"{path}: not a neuron records file (format {meta.get('format')!r}, "
                          f"expected {RECORDS_FORMAT!r})")
    return tensors, meta


class NeuronRecords:
    """A finished (or partial) record run, read back: per neuron, its top and sampled records."""

    def __init__(self, run: Path, meta: dict, tensors: dict[str, Tensor], corpus: Corpus):
        self.run, self.meta, self.t, self.corpus = run, meta, tensors, corpus
        self.layers: list[int] = list(meta["layers"])
        self.neurons_per_layer: int = int(meta["neurons_per_layer"])
        self.windows_done = int(meta["windows_done"])

    @classmethod
    def load(cls, run: str | Path) -> "NeuronRecords":
        run = Path(run)
        meta = read_json(run / "records.json", "a neuron record run", kind=dict, error=RecordError)
        if meta.get("format") != RECORDS_FORMAT:
            raise RecordError(f"{run / 'records.json'}: format {meta.get('format')!r}, expected {RECORDS_FORMAT!r}")
        tensors, smeta = _read_records(run / "records.safetensors")
        meta = {**meta, "windows_done": int(smeta["windows_done"])}
        corpus = Corpus.load(run)
        k = meta["config"]["top_k"]
        want = (len(meta["layers"]), k, meta["neurons_per_layer"], meta["context"])
        if tuple(tensors.get("top_act", torch.empty(0)).shape) != want:
            raise RecordError(f"{run / 'records.safetensors'}: top_act is "
                              f"{tuple(tensors.get('top_act', torch.empty(0)).shape)}, records.json says {want}")
        return cls(run, meta, tensors, corpus)

    @property
    def complete(self) -> bool:
        return self.windows_done >= int(self.meta["windows"])

    def neurons(self) -> list[tuple[int, int]]:
        return [(layer, n) for layer in self.layers for n in range(self.neurons_per_layer)]

    def _j(self, layer: int, neuron: int) -> int:
        if layer not in self.layers or not 0 <= neuron < self.neurons_per_layer:
            raise RecordError(f"{self.run}: no neuron {layer}/{neuron} (layers {self.layers}, "
                              f"{self.neurons_per_layer} neurons each)")
        return self.layers.index(layer)

    def _records(self, kind: str, layer: int, neuron: int) -> list[Record]:
        j = self._j(layer, neuron)
        wins = self.t[f"{kind}_win"][j, :, neuron].tolist()
        acts = self.t[f"{kind}_act"][j, :, neuron].numpy()
        return [Record(w, self.corpus.tokens[w], acts[i].copy()) for i, w in enumerate(wins) if w >= 0]

    def top(self, layer: int, neuron: int) -> list[Record]:
        """The windows where the neuron fires most (by window maximum), highest first."""
        return self._records("top", layer, neuron)

    def sample(self, layer: int, neuron: int) -> list[Record]:
        """A uniform random sample of windows (without replacement)."""
        return self._records("smp", layer, neuron)

    def quantiles(self, layer: int, neuron: int, n: int = 4) -> list[list[Record]]:
        """The sample split into ``n`` equal-count bins by window maximum, lowest bin first."""
        recs = sorted(self.sample(layer, neuron), key=lambda r: r.max)
        return [list(part) for part in np.array_split(np.array(recs, dtype=object), n)] if recs else [[]] * n

    def max_activation(self, layer: int, neuron: int) -> float:
        return float(self.t["top_val"][self._j(layer, neuron), 0, neuron])

    def stats(self, layer: int) -> dict[str, np.ndarray]:
        """Per neuron of ``layer``: max, mean and the fraction of positions with a positive activation."""
        j = self._j(layer, 0)
        n_pos = max(1, self.windows_done * int(self.meta["context"]))
        return {"max": self.t["top_val"][j, 0].numpy(), "mean": (self.t["act_sum"][j] / n_pos).numpy(),
                "density": (self.t["pos_count"][j].double() / n_pos).numpy()}

    def describe(self) -> dict:
        return {**self.meta["config"], "run": str(self.run), "model": self.meta["model"]["name"],
                "layers": self.layers, "neurons_per_layer": self.neurons_per_layer, "windows": self.meta["windows"],
                "windows_done": self.windows_done, "context": self.meta["context"]}


def parse_layers(spec: str | None, n_layers: int) -> tuple[int, ...] | None:
    """``"0,3,5"`` or ``"0-3"`` (inclusive) -> layers; None or ``"all"``: every layer."""
    if spec is None or spec == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise RecordError(f"layers {spec!r}: expected 'all', a comma list like 0,3,5 or a range like 0-3") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out:
        raise RecordError(f"layers {spec!r}: this model has layers 0 .. {n_layers - 1}")
    return tuple(dict.fromkeys(out))


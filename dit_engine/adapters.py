"""Adapter slots: which LoRA each sequence (or token) uses, with stacked weights per module.

A forward pass may stack several slots on one base model. Slot 0 is usually the weight diff (a
different one per sequence), slot 1 the shared DIT adapter. Each slot holds, per adapted linear
(full HF name, e.g. ``model.layers.3.self_attn.q_proj``), ``A: [n, r, d_in]`` and
``B: [n, d_out, r]`` (PEFT convention, ``dW = scale * B @ A``), a scale per adapter and an index per
sequence ``[batch]`` or per token ``[batch, seq]`` (-1 = no adapter). Mixed ranks are zero-padded
to the slot's max rank. A slot is trainable when its tensors require grad.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dit_kernels.multi_lora import Routing, RowRouting, build_lora_meta, multi_lora_sum

from .config import TARGET_MODULES, ModelConfig
from .files import write_atomically


class AdapterError(ValueError):
    """An adapter that does not fit the model: names the module and expected vs. found shape."""


@dataclasses.dataclass
class LoraSlot:
    A: dict[str, Tensor]  # module name -> [n, r, d_in]
    B: dict[str, Tensor]  # module name -> [n, d_out, r]
    scale: Tensor  # [n] fp32
    index: Tensor  # [batch] or [batch, seq] int64, -1 = none
    name: str = "slot"

    @property
    def n_adapters(self) -> int:
        return int(self.scale.shape[0])

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[1] if self.A else 0

    @property
    def trainable(self) -> bool:
        return any(t.requires_grad for t in self.A.values()) or any(t.requires_grad for t in self.B.values())

    def parameters(self) -> list[Tensor]:
        return [t for name in self.A for t in (self.A[name], self.B[name])]

    def with_index(self, index: Tensor) -> "LoraSlot":
        return dataclasses.replace(self, index=index)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
           trainable: bool | None = None) -> "LoraSlot":
        """The slot with A/B moved to ``device`` / cast to ``dtype`` (the scale stays fp32, the
        index int64, both on ``device``); ``trainable`` sets ``requires_grad`` on the new A/B
        (which are then leaves of their own)."""
        def move(t: Tensor) -> Tensor:
            t = t.to(device=device, dtype=dtype)
            return t.detach().requires_grad_(trainable) if trainable is not None else t

        return dataclasses.replace(self, A={k: move(v) for k, v in self.A.items()},
                                   B={k: move(v) for k, v in self.B.items()},
                                   scale=self.scale.to(device), index=self.index.to(device))

    def detach(self) -> "LoraSlot":
        """The same values, cut from autograd (what a trained slot is saved or served as)."""
        return dataclasses.replace(self, A={k: v.detach() for k, v in self.A.items()},
                                   B={k: v.detach() for k, v in self.B.items()})

    def select_rows(self, rows: Tensor) -> "LoraSlot":
        """The same weights for a subset of the batch rows (used when finished rows leave a batch)."""
        return dataclasses.replace(self, index=self.index[rows.to(self.index.device)])

    def validate(self, config: ModelConfig, batch: int, seq: int | None = None) -> None:
        shapes = config.linear_shapes()
        known = set(config.module_names())
        # How many adapters: what most stacked A tensors say (so one odd tensor or a scale of another
        # length is named as the odd one out).
        n = Counter(a.shape[0] for a in self.A.values()).most_common(1)[0][0] if self.A else self.n_adapters
        if self.scale.shape != (n,):
            raise AdapterError(f"{self.name}: scale has shape {tuple(self.scale.shape)}, expected [{n}] (one per adapter)")
        if set(self.A) != set(self.B):
            raise AdapterError(f"{self.name}: modules with A but no B (or B but no A): {sorted(set(self.A) ^ set(self.B))}")
        for name, a in self.A.items():
            if name not in known:
                raise AdapterError(f"{self.name}: {name} is not a linear layer of this model ({config.name or config.model_type})")
            d_in, d_out = shapes[name.rsplit(".", 1)[1]]
            b = self.B[name]
            if a.dim() != 3 or a.shape[0] != n or a.shape[2] != d_in:
                raise AdapterError(f"{self.name}: {name} A has shape {tuple(a.shape)}, expected [{n}, r, {d_in}]")
            if b.dim() != 3 or b.shape[0] != n or b.shape[1] != d_out or b.shape[2] != a.shape[1]:
                raise AdapterError(
                    f"{self.name}: {name} B has shape {tuple(b.shape)}, expected [{n}, {d_out}, {a.shape[1]}]"
                )
        if self.index.shape[0] != batch or (self.index.dim() == 2 and seq is not None and self.index.shape[1] != seq):
            want = f"[{batch}]" + (f" or [{batch}, {seq}]" if seq is not None else "")
            raise AdapterError(f"{self.name}: index has shape {tuple(self.index.shape)}, expected {want}")
        if self.index.numel() and bool(((self.index >= n) | (self.index < -1)).any()):
            raise AdapterError(f"{self.name}: index values must lie in [-1, {n - 1}], found "
                               f"[{int(self.index.min())}, {int(self.index.max())}]")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: ModelConfig,
        n: int,
        rank: int,
        *,
        targets: tuple[str, ...] | list[str] = TARGET_MODULES,
        scale: float | None = None,
        init: str = "peft",
        index: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        trainable: bool = False,
        generator: torch.Generator | None = None,
        name: str = "slot",
    ) -> "LoraSlot":
        """``n`` fresh adapters of rank ``rank`` on ``targets``.

        init: ``"peft"`` (A Kaiming-uniform, B zero: the adapters start as the base model),
        ``"dit"`` (A zero, B Kaiming-uniform, as the DIT paper), ``"random"`` (both random; tests and
        benches), ``"zeros"``. ``scale`` defaults to ``1 / rank`` (alpha = 1, as the DIT paper).
        """
        shapes = config.linear_shapes()
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        for name_ in config.module_names(targets):
            d_in, d_out = shapes[name_.rsplit(".", 1)[1]]
            a = torch.zeros(n, rank, d_in, dtype=torch.float32)
            b = torch.zeros(n, d_out, rank, dtype=torch.float32)
            if init in ("peft", "random"):
                bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
                a.uniform_(-bound, bound, generator=generator)
            if init in ("dit", "random"):
                bound = 1.0 / math.sqrt(rank)
                b.uniform_(-bound, bound, generator=generator)
            if init not in ("peft", "dit", "random", "zeros"):
                raise ValueError(f"unknown init {init!r}")
            A[name_] = a.to(device=device, dtype=dtype).requires_grad_(trainable)
            B[name_] = b.to(device=device, dtype=dtype).requires_grad_(trainable)
        sc = torch.full((n,), 1.0 / rank if scale is None else float(scale), dtype=torch.float32, device=device)
        if index is None:
            index = torch.arange(n, device=device)
        return cls(A=A, B=B, scale=sc, index=index.to(device=device, dtype=torch.int64), name=name)


@dataclasses.dataclass
class AdapterBatch:
    """The adapter slots applied in one forward pass, in order (slot 0 first)."""

    slots: list[LoraSlot]

    def __init__(self, *slots: LoraSlot):
        self.slots = list(slots)
        # Per-sequence routing of each slot (with its cached per-row weights of frozen slots), kept for
        # every forward of this batch (every decode step); a compacted batch is a new AdapterBatch with
        # fresh routing. The slots are treated as immutable once handed over, so a (config, batch, seq)
        # checked once stays valid.
        self._row_routing: dict = {}
        self._validated: set = set()

    def select_rows(self, rows: Tensor) -> "AdapterBatch":
        return AdapterBatch(*(s.select_rows(rows) for s in self.slots))

    def validate(self, config: ModelConfig, batch: int, seq: int | None = None) -> None:
        """Check every slot once per (config, batch, seq): the index range is a device -> host read.
        Per-sequence indices do not depend on ``seq``, so prefill and decode share one check."""
        key = (config, batch, None if all(s.index.dim() == 1 for s in self.slots) else seq)
        if key in self._validated:
            return
        for s in self.slots:
            s.validate(config, batch, seq)
        self._validated.add(key)

    def bind(self, batch: int, seq: int) -> "BoundAdapters":
        """The slots for one [batch, seq] forward; routing metadata is built once, when first needed."""
        return BoundAdapters(self.slots, batch, seq, self._row_routing)


@dataclasses.dataclass
class BoundAdapters:
    """Adapter slots bound to one forward's [batch, seq]; what each adapted linear receives.

    Describes routing only: which adapter of each slot every token uses. The maths, on every
    backend, is :func:`dit_kernels.multi_lora.multi_lora_sum`."""

    slots: list[LoraSlot]
    batch: int
    seq: int
    row_routing: dict = dataclasses.field(default_factory=dict)  # slot -> RowRouting, kept by the AdapterBatch
    _metas: dict = dataclasses.field(default_factory=dict, repr=False)  # this forward's token routing, per slot

    def routing(self, k: int) -> Routing:
        """Routing of slot ``k``: per sequence (kept across the batch's forwards, e.g. decode steps)
        or per token (built on first use in this forward, reused by every layer)."""
        s = self.slots[k]
        if s.index.dim() == 1:
            if k not in self.row_routing:
                self.row_routing[k] = RowRouting(s.index, s.n_adapters)
            return self.row_routing[k]
        if k not in self._metas:
            self._metas[k] = build_lora_meta(s.index.reshape(-1), s.n_adapters)
        return self._metas[k]

    def delta(self, name: str, x: Tensor, out: Tensor | None = None) -> Tensor | None:
        """Sum over slots of the LoRA deltas for module ``name``: one kernel call per adapted linear.

        ``x``: [N = batch*seq, d_in] -> [N, d_out], or None when no slot adapts ``name``. With
        ``out`` ([N, d_out], the base output) the sum is added into it in place and ``out`` returned."""
        parts = [(k, s) for k, s in enumerate(self.slots) if name in s.A]
        if not parts:
            return None
        return multi_lora_sum(x, [(s.A[name], s.B[name], s.scale, self.routing(k)) for k, s in parts], out=out)


# ---- one adapter as a file (the DIT and LatentQA adapters' tensors) -----------------------------------
def save_single(slot: LoraSlot, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Adapter 0 of ``slot`` as safetensors at ``path`` (atomically): per module ``{module}.lora_A``
    [r, d_in] and ``{module}.lora_B`` [d_out, r], in ``dtype``."""
    tensors = {}
    for name in slot.A:
        tensors[f"{name}.lora_A"] = slot.A[name][0].detach().contiguous().cpu().to(dtype)
        tensors[f"{name}.lora_B"] = slot.B[name][0].detach().contiguous().cpu().to(dtype)
    write_atomically(Path(path), lambda p: save_file(tensors, str(p)))


def load_single(path: str | Path, modules: Iterable[str], scale: float, *, name: str, device="cpu",
                dtype: torch.dtype = torch.float32) -> LoraSlot:
    """The file :func:`save_single` wrote, as a one-adapter slot (index 0) for ``modules``; raises
    whatever reading it raises (a missing file, corrupt safetensors, a missing module's tensor)."""
    t = load_file(str(path))
    A = {m: t[f"{m}.lora_A"][None].to(device=device, dtype=dtype) for m in modules}
    B = {m: t[f"{m}.lora_B"][None].to(device=device, dtype=dtype) for m in modules}
    return LoraSlot(A=A, B=B, scale=torch.tensor([float(scale)], device=device),
                    index=torch.zeros(1, dtype=torch.int64, device=device), name=name)

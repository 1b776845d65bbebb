"""A steady-state decode step on the Triton path reads nothing back from the device.

Without CUDA, ``torch.cuda.set_sync_debug_mode`` has nothing to watch, so its semantics are emulated:
:class:`SyncCounter` patches every Python-level way a step could wait for the device (``.item()``,
``.tolist()``, ``bool()``/``int()``/``float()``/``__index__`` on a tensor, ``.cpu()``/``.numpy()``,
the ops whose output size depends on the data: ``nonzero``, ``unique``, ``unique_consecutive``,
``masked_select``, ``repeat_interleave`` without ``output_size``, boolean-mask indexing) and records
where each happened. Kernel launches run in Triton's interpreter on CPU; the interpreter's own
numpy conversions stand for a GPU launch, which reads nothing back, so they are not counted.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from conftest import rel_err, tiny_config

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.cache import KVCache
from dit_engine.model import Transformer
from dit_kernels import backend
from dit_kernels.multi_lora import RowRouting, build_lora_meta, multi_lora_sum

_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
            "unique", "unique_consecutive", "masked_select")
_FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "masked_select")


class SyncCounter:
    """Counts host syncs (see the module docstring); ``syncs`` lists (what, where) pairs."""

    def __init__(self):
        self.syncs: list[tuple[str, str]] = []
        self._paused = 0

    def _record(self, what: str) -> None:
        if not self._paused:
            frame = traceback.extract_stack(limit=3)[0]  # the caller of the patched method
            self.syncs.append((what, f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"))

    @contextlib.contextmanager
    def counting(self, monkeypatch):
        with monkeypatch.context() as m:
            for name in _METHODS:
                real = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}", real))
            for name in _FUNCTIONS:
                m.setattr(torch, name, self._wrap(f"torch.{name}", getattr(torch, name)))
            real_ri = torch.repeat_interleave

            def repeat_interleave(*args, **kwargs):
                if kwargs.get("output_size") is None:
                    self._record("torch.repeat_interleave")
                return real_ri(*args, **kwargs)

            m.setattr(torch, "repeat_interleave", repeat_interleave)
            real_getitem = torch.Tensor.__getitem__

            def getitem(t, index):
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    self._record("boolean-mask indexing")
                return real_getitem(t, index)

            m.setattr(torch.Tensor, "__getitem__", getitem)
            real_launch = backend._InterpretedKernel.__getitem__
            counter = self

            def launch_uncounted(kernel, grid):
                run = real_launch(kernel, grid)

                def launch(*args, **kwargs):
                    counter._paused += 1
                    try:
                        return run(*args, **kwargs)
                    finally:
                        counter._paused -= 1

                return launch

            m.setattr(backend._InterpretedKernel, "__getitem__", launch_uncounted)
            yield self

    def _wrap(self, what, real):
        def wrapped(*args, **kwargs):
            self._record(what)
            return real(*args, **kwargs)

        return wrapped


def _model_and_adapters(n_rows: int, context: int = 128):
    cfg = tiny_config("qwen3", max_position_embeddings=context)
    model = Transformer.random(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    diffs = LoraSlot.create(cfg, 5, 4, init="random", generator=g, name="diffs",
                            index=torch.tensor([3, -1, 0, 4, 1, 3][:n_rows]))
    dit = LoraSlot.create(cfg, 1, 8, init="random", generator=g, name="dit",
                          index=torch.tensor([0, 0, -1, 0, 0, 0][:n_rows]))
    return cfg, model, AdapterBatch(diffs, dit)


def _prefill(model, cfg, adapters, rows: int, prompt: int, columns: int):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (rows, prompt), generator=g)
    mask = torch.ones(rows, prompt, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    cache = KVCache(cfg, rows, columns)
    logits = model(ids, adapters, attention_mask=mask, cache=cache, output="last")
    return cache, logits.argmax(-1)


def _decode(monkeypatch, kernels: str, steps: int, counter: SyncCounter | None = None):
    """Prefill 6 rows, then ``steps`` greedy decode steps; with a counter, the prefill's syncs are
    returned and every decode step is counted."""
    monkeypatch.setenv(backend.ENV_BACKEND, kernels)
    cfg, model, adapters = _model_and_adapters(6)
    prefill = SyncCounter()
    with prefill.counting(monkeypatch) if counter is not None else contextlib.nullcontext():
        cache, tok = _prefill(model, cfg, adapters, 6, 9, 20)
    out = []
    for _ in range(steps):
        with counter.counting(monkeypatch) if counter is not None else contextlib.nullcontext():
            logits = model(tok[:, None], adapters, cache=cache, output="last")
        out.append(logits)
        tok = logits.argmax(-1)
    return out, prefill.syncs


@torch.no_grad()
def test_decode_steps_have_no_host_sync(monkeypatch):
    """Two adapter slots (a diff per row, some rows none; one shared DIT adapter) on the Triton path,
    every op in Triton's interpreter: no decode step reads anything back from the device (the
    first one included: its routes are built on the device), the prefill only the once-per-batch
    index checks (each slot's validation and its RowRouting), and the logits are the plain-torch
    path's."""
    counter = SyncCounter()
    got, prefill = _decode(monkeypatch, "triton", 3, counter)
    assert counter.syncs == [], f"host syncs in a decode step: {counter.syncs}"
    assert sorted(where.split(":")[0] for _, where in prefill) == ["adapters.py"] * 2 + ["multi_lora.py"] * 2
    want, _ = _decode(monkeypatch, "torch", 3)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@torch.no_grad()
def test_sync_counter_sees_the_syncs_it_claims_to(monkeypatch):
    """The counter is not blind: building token-level metadata (``nonzero``, ``.tolist()``, range
    checks), a routing's index check and a decode step near the end of the context (the exact
    context check) are all seen."""
    counter = SyncCounter()
    with counter.counting(monkeypatch):
        build_lora_meta(torch.tensor([1, -1, 0, 1]), 2)
    assert {"torch.nonzero", "Tensor.tolist", "Tensor.__int__"} <= {w for w, _ in counter.syncs}
    counter = SyncCounter()
    with counter.counting(monkeypatch):
        RowRouting(torch.tensor([1, 0]), 2)
        torch.arange(4)[torch.arange(4) > 1]
    assert [w for w, _ in counter.syncs] == ["Tensor.__bool__", "boolean-mask indexing"]
    # Near the end of the context the host bound (columns + new tokens) no longer clears the step,
    # so the exact check reads the positions back (and here refuses the step).
    monkeypatch.setenv(backend.ENV_BACKEND, "triton")
    cfg, model, adapters = _model_and_adapters(6, context=10)
    cache, tok = _prefill(model, cfg, adapters, 6, 9, 20)
    model(tok[:, None], adapters, cache=cache, output="last")  # position 9: the last one
    counter = SyncCounter()
    with counter.counting(monkeypatch), pytest.raises(ValueError, match="11 tokens exceeds the model's context of 10"):
        model(tok[:, None], adapters, cache=cache, output="last")
    assert "Tensor.__int__" in {w for w, _ in counter.syncs}


@torch.no_grad()
def test_triton_multi_lora_sum_reads_nothing_back_after_the_first_call(monkeypatch):
    """The op alone, with grad on and trainable weights (training): the forward and the backward
    (route, tiles, weight-gradient chunks) read nothing back once the batch's routes exist."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 24, generator=g).requires_grad_()
    A, B = torch.randn(4, 3, 24, generator=g).requires_grad_(), torch.randn(4, 10, 3, generator=g).requires_grad_()
    A1, B1 = torch.randn(1, 5, 24, generator=g), torch.randn(1, 10, 5, generator=g)
    rows, shared = RowRouting(torch.tensor([2, -1, 0, 3]), 4), RowRouting(torch.zeros(4, dtype=torch.int64), 1)
    slots = [(A, B, torch.ones(4), rows), (A1, B1, torch.ones(1), shared)]

    def step():
        with torch.enable_grad():
            y = multi_lora_sum(x, slots, backend="triton")
            return torch.autograd.grad(y.square().sum(), (x, A, B))

    first = step()
    counter = SyncCounter()
    with counter.counting(monkeypatch):
        again = step()
    assert counter.syncs == []
    for a, b in zip(first, again):
        assert torch.equal(a, b)

"""Decode tokens/s with 0, 64 and 256 distinct adapters in one batch (the interpretation workload).

Run: ``pytest benches/bench_decode.py -s``. One batch of ``BATCH`` sequences decodes ``STEPS`` greedy
tokens on a KV cache prefilled (outside the timed region) with ``PREFILL`` random prompt tokens.
The batch size stays the same in every case; only the number of distinct adapters changes:

- ``0``: the base model, no adapters;
- ``64``: 64 distinct rank-16 LoRAs on all 7 target modules of every block, row ``i`` using adapter
  ``i % 64`` (four sequences share each adapter);
- ``256``: one distinct LoRA per sequence (every row its own).

tokens/s = ``BATCH * STEPS`` / median round time; "x base" = time with adapters / base time (how
much the adapters cost). Nothing is asserted about speed.

With CUDA: Qwen3-4B shapes (hidden 2560, ffn 9728, 36 layers, 32/8 heads, head_dim 128, vocab
151936), random bf16 weights, batch 256, 128 prompt tokens, 32 decode steps; the rows are merged
under ``"decode"`` into ``benches/results/<device>.json`` (device, commit, date, versions). On CPU a
tiny random Llama with batch 8 and 0 / 2 / 8 adapters only exercises the harness; nothing is saved.
This bench does not use pytest-benchmark (plain timing with a synchronisation per round), so it also
runs where only pytest is installed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import pytest
import torch
from _results import save_results

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.cache import KVCache
from dit_engine.config import TARGET_MODULES, ModelConfig
from dit_engine.model import Transformer

CUDA = torch.cuda.is_available()
RANK = 16

_QWEN3_4B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}  # fmt: skip
_TINY = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256, "tie_word_embeddings": True,
}  # fmt: skip

if CUDA:
    CONFIG, DTYPE, BATCH, PREFILL, STEPS, ROUNDS = _QWEN3_4B, torch.bfloat16, 256, 128, 32, 5
    ADAPTERS = (0, 64, 256)
else:
    CONFIG, DTYPE, BATCH, PREFILL, STEPS, ROUNDS = _TINY, torch.float32, 8, 16, 4, 2
    ADAPTERS = (0, 2, 8)


@dataclasses.dataclass
class _Bench:
    model: Transformer
    device: str
    cache: KVCache  # prefilled with the prompt; every round decodes on a fresh copy
    first: torch.Tensor  # [BATCH] the first greedy token after the prompt
    rows: dict[int, dict] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def bench(request) -> _Bench:
    dev = torch.device("cuda" if CUDA else "cpu")
    config = ModelConfig.from_dict(CONFIG, source="bench_decode", name="Qwen3-4B-shapes" if CUDA else "tiny-llama")
    model = Transformer.random(config, seed=0, dtype=DTYPE, device=str(dev))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (BATCH, PREFILL), generator=g).to(dev)
    cache = KVCache(config, BATCH, PREFILL + STEPS, dtype=DTYPE, device=dev)
    with torch.inference_mode():  # decode cost does not depend on the cached values: base prefill for all
        first = model(prompt, None, cache=cache, output="last").argmax(-1)
    b = _Bench(model, torch.cuda.get_device_name() if CUDA else "cpu", cache, first)
    yield b
    _report(request.config, b)


def _adapters(model: Transformer, n: int) -> AdapterBatch | None:
    """``n`` random rank-16 LoRAs on all 7 target modules, drawn on the model's device: 256 of them at
    Qwen3-4B shapes are 8.5 G parameters, too slow to draw on the host as ``LoraSlot.create`` does."""
    if n == 0:
        return None
    c, dev = model.config, model.device
    g = torch.Generator(device=dev).manual_seed(n)
    shapes = c.linear_shapes()
    A, B = {}, {}
    for name in c.module_names(TARGET_MODULES):
        d_in, d_out = shapes[name.rsplit(".", 1)[1]]
        A[name] = ((torch.rand(n, RANK, d_in, generator=g, device=dev) * 2 - 1) / d_in**0.5).to(model.dtype)
        B[name] = ((torch.rand(n, d_out, RANK, generator=g, device=dev) * 2 - 1) / RANK**0.5).to(model.dtype)
    scale = torch.full((n,), 1.0 / RANK, device=dev)
    index = torch.arange(BATCH, device=dev) % n
    return AdapterBatch(LoraSlot(A=A, B=B, scale=scale, index=index, name="decode"))


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("n_adapters", ADAPTERS, ids=[f"adapters{n}" for n in ADAPTERS])
def test_decode(bench: _Bench, n_adapters: int):
    m = bench.model
    adapters = _adapters(m, n_adapters)

    def round_() -> float:
        cache, tok = copy.deepcopy(bench.cache), bench.first.clone()
        _sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(STEPS):
                tok = m(tok[:, None], adapters, cache=cache, output="last").argmax(-1)
        _sync()
        return time.perf_counter() - t0

    round_()  # warm-up: Triton compiles, allocator settles
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = sorted(round_() for _ in range(ROUNDS))
    median = times[len(times) // 2]
    row = {
        "n_adapters": n_adapters, "batch": BATCH, "rank": RANK if n_adapters else 0, "steps": STEPS,
        "prefill": PREFILL, "median_s": median, "min_s": times[0], "tokens_per_s": BATCH * STEPS / median,
        "ms_per_step": 1e3 * median / STEPS,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if CUDA else None,
    }  # fmt: skip
    base = bench.rows.get(0)
    if base is not None and n_adapters:
        row["over_base"] = median / base["median_s"]
    bench.rows[n_adapters] = row
    assert row["tokens_per_s"] > 0


def _report(config: pytest.Config, b: _Bench) -> None:
    if not b.rows:
        return
    lines = [
        "",
        f"decode bench on {b.device}: {b.model.config.name}, random {str(DTYPE).removeprefix('torch.')} weights, "
        f"batch {BATCH}, prompt {PREFILL}, {STEPS} steps, rank-{RANK} LoRAs on all 7 target modules"
        + ("" if CUDA else "  [CPU: harness only]"),
        f"{'adapters':>8} {'tokens/s':>11} {'ms/step':>9} {'x base':>7} {'peak MB':>9}",
    ]
    for n in ADAPTERS:
        r = b.rows.get(n)
        if r is None:
            continue
        over = f"{r['over_base']:.2f}" if "over_base" in r else "-"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{n:>8} {r['tokens_per_s']:>11.1f} {r['ms_per_step']:>9.2f} {over:>7} {peak:>9}")
    if CUDA:
        lines.append(f"saved {_save(b)}")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


def _save(b: _Bench) -> Path:
    """Merge this run under ``"decode"`` into benches/results/<device>.json."""
    import triton

    return save_results(b.device, "decode", {
        "triton": triton.__version__,
        "model": f"random weights at {b.model.config.name} ({DTYPE})",
        "config": b.model.config.to_dict(),
        "rows": [b.rows[n] for n in ADAPTERS if n in b.rows],
    })

"""Runtime throughput: prefill and decode tokens/s at batch 1 and 32, base model vs 32 distinct LoRAs.

Run: ``pytest benches/bench_runtime.py`` (add ``--benchmark-json=out.json`` to keep pytest-benchmark's
raw numbers). Every case runs twice, once on the base model and once with one distinct rank-8 LoRA
per sequence on all 7 target modules of every block (32 LoRAs at batch 32); a side-by-side table
with the LoRA/base time ratio is printed at the end and each ratio is also stored in the LoRA
case's ``benchmark.extra_info["lora_over_base"]``. Nothing is asserted about speed.

Model. On CPU: the default model (SmolLM2-135M-Instruct, fp32) from ``load_model(resolve_model("default"))``; if it
cannot be loaded, random weights at the same shapes (the table header says which and why).
With CUDA: Qwen3-4B shapes with random bf16 weights, and the figures are saved to
``benches/results/<device>.json`` with the device, commit and date.

Timing. ``prefill``: one forward of ``[batch, PREFILL]`` prompt tokens into a fresh KV cache,
last-position logits only (what ``generate`` does). ``decode``: ``DECODE`` greedy one-token steps on
a cache prefilled outside the timed region. tokens/s = tokens processed / median round time.

Peak memory. tracemalloc only sees Python's allocator, not torch's C++ allocations, so on CPU we
read the kernel's resident-set high-water mark: just before the timed call, writing "5" to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS (Linux >= 4.0), and after it ``VmHWM`` is
the true peak RSS of the process during that call. We report that peak and its rise over the RSS at
the reset (the call's working memory: activations, cache, LoRA temporaries). The rise can
under-count when the allocator reuses pages freed by earlier calls, so the absolute peak is
reported too; glibc's ``malloc_trim(0)`` before the reset returns such freed pages to the OS to
keep that error small. Where clear_refs cannot be written, ``ru_maxrss`` (the process-lifetime peak) is
reported and the rise is left empty. On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, and its rise over ``memory_allocated`` at the reset.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import os
import re
import resource
from pathlib import Path

import pytest
import torch
from _results import save_results

from dit_engine.adapters import AdapterBatch, LoraSlot
from dit_engine.cache import KVCache
from dit_engine.config import ModelConfig
from dit_engine.model import Transformer

BATCHES = (1, 32)
LORA_RANK = 8

# HF config of SmolLM2-135M-Instruct's shapes (the fallback when the default model cannot load).
_SMOLLM2_135M = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
}
# HF config of Qwen3-4B's shapes (GPU runs; weights are random).
_QWEN3_4B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@dataclasses.dataclass
class _Bench:
    model: Transformer
    label: str  # what ran, for the table and the JSON
    device: str  # "cpu" or the CUDA device name
    prefill: int  # prompt tokens per row
    decode: int  # decode steps per row
    rounds: dict[int, tuple[int, int]]  # batch -> (timed rounds, warm-up rounds)
    results: dict[tuple[str, int, str], dict] = dataclasses.field(default_factory=dict)
    lora: dict[int, AdapterBatch] = dataclasses.field(default_factory=dict)
    prefilled: dict[int, tuple[KVCache, torch.Tensor]] = dataclasses.field(default_factory=dict)
    load_avg: str = dataclasses.field(default_factory=lambda: " ".join(f"{x:.2f}" for x in os.getloadavg()))

    @property
    def cuda(self) -> bool:
        return self.model.device.type == "cuda"


# ---- the model --------------------------------------------------------------------------------


def _cpu_model() -> tuple[Transformer, str]:
    try:
        from dit_engine.checkpoint import load_model
        from dit_engine.model_store import resolve_model

        model = load_model(resolve_model("default"))
        return model, f"default model {model.config.name or 'SmolLM2-135M-Instruct'} (fp32, real weights)"
    except Exception as e:  # any failure to load means: measure the same shapes with random weights
        config = ModelConfig.from_dict(_SMOLLM2_135M, source="bench_runtime", name="SmolLM2-135M-shapes")
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
        return Transformer.random(config, seed=0), f"random weights at SmolLM2-135M shapes (fp32; default model not loaded: {reason})"


def _cuda_model() -> tuple[Transformer, str]:
    """Qwen3-4B shapes, bf16, random weights built straight on the GPU (no fp32 copy on the host)."""
    config = ModelConfig.from_dict(_QWEN3_4B, source="bench_runtime", name="Qwen3-4B-shapes")
    model = Transformer.random(config, seed=0, dtype=torch.bfloat16, device="cuda")
    return model, "random weights at Qwen3-4B shapes (bf16)"


@pytest.fixture(scope="module")
def bench(request) -> _Bench:
    torch.manual_seed(0)
    if torch.cuda.is_available():
        model, label = _cuda_model()
        b = _Bench(model, label, torch.cuda.get_device_name(), prefill=512, decode=64, rounds={1: (10, 2), 32: (5, 1)})
    else:
        model, label = _cpu_model()
        b = _Bench(model, label, "cpu", prefill=64, decode=16, rounds={1: (3, 1), 32: (2, 0)})
    yield b
    _report(request.config, b)


def _adapters(b: _Bench, batch: int) -> AdapterBatch:
    """One distinct random rank-8 LoRA per sequence on every target module (built once per batch)."""
    if batch not in b.lora:
        slot = LoraSlot.create(
            b.model.config, batch, LORA_RANK, init="random", dtype=b.model.dtype, device=b.model.device,
            generator=torch.Generator().manual_seed(batch), name="bench",
        )
        b.lora[batch] = AdapterBatch(slot)
    return b.lora[batch]


def _prefilled(b: _Bench, batch: int, prompt: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
    """A cache holding the prompt and the first greedy token, built once per batch size (base model:
    the decode cases time the steps, not the prefill, and the LoRA prefill is the slow one)."""
    if batch not in b.prefilled:
        m = b.model
        cache = KVCache(m.config, batch, b.prefill + b.decode, dtype=m.dtype, device=m.device)
        with torch.inference_mode():
            tok = m(prompt, None, cache=cache, output="last").argmax(-1)
        b.prefilled[batch] = (cache, tok)
    return b.prefilled[batch]


# ---- peak memory ------------------------------------------------------------------------------


class _Peak:
    """Peak memory of the code run between :meth:`reset` and :meth:`read` (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.base_mb: float | None = None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
            return
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base_mb = _proc_status_kb("VmRSS") / 1024
        except OSError:
            self.base_mb = None

    def read(self) -> tuple[float, float | None]:  # (peak MB, rise over the reset point MB or None)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif self.base_mb is not None:
            peak = _proc_status_kb("VmHWM") / 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
        return peak, (None if self.base_mb is None else peak - self.base_mb)


def _release_freed_memory() -> None:
    """Hand pages that glibc keeps after free() back to the OS, so the RSS at the reset point is the
    live memory and the rise measures the call itself, not what earlier calls left mapped."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise may under-count (see the module docstring)
        pass


def _proc_status_kb(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))


# ---- the cases --------------------------------------------------------------------------------

# Base before LoRA inside each (phase, batch), so the ratio is ready when the LoRA case records it.
CASES = [(phase, batch, variant) for phase in ("prefill", "decode") for batch in BATCHES for variant in ("base", "lora")]


@pytest.mark.parametrize("phase,batch,variant", CASES, ids=[f"{p}-b{b}-{v}" for p, b, v in CASES])
def test_runtime(benchmark, bench: _Bench, phase: str, batch: int, variant: str):
    m = bench.model
    adapters = _adapters(bench, batch) if variant == "lora" else None
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, m.config.vocab_size, (batch, bench.prefill), generator=g).to(m.device)
    peak = _Peak(bench.cuda)
    if phase == "prefill":
        def setup():
            cache = KVCache(m.config, batch, bench.prefill + bench.decode, dtype=m.dtype, device=m.device)
            peak.reset()
            return (cache,), {}

        def run(cache):
            with torch.inference_mode():
                m(prompt, adapters, cache=cache, output="last")
            _sync(bench)

        n_tokens = batch * bench.prefill
    else:
        cache0, tok0 = _prefilled(bench, batch, prompt)

        def setup():
            cache = copy.deepcopy(cache0)  # decode cost does not depend on the cached values
            peak.reset()
            return (cache, tok0.clone()), {}

        def run(cache, tok):
            with torch.inference_mode():
                for _ in range(bench.decode):
                    tok = m(tok[:, None], adapters, cache=cache, output="last").argmax(-1)
            _sync(bench)

        n_tokens = batch * bench.decode

    rounds, warmup = bench.rounds[batch]
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=warmup)
    peak_mb, rise_mb = peak.read()
    seconds = benchmark.stats.stats.median
    row = {
        "phase": phase, "batch": batch, "variant": variant, "tokens": n_tokens, "median_s": seconds,
        "tokens_per_s": n_tokens / seconds, "peak_mb": peak_mb, "peak_rise_mb": rise_mb,
    }
    bench.results[(phase, batch, variant)] = row
    base = bench.results.get((phase, batch, "base"))
    if variant == "lora" and base is not None:
        row["lora_over_base"] = seconds / base["median_s"]
    benchmark.extra_info.update(row)
    benchmark.extra_info.update(model=bench.label, device=bench.device, lora_rank=LORA_RANK,
                                n_loras=batch if variant == "lora" else 0, threads=torch.get_num_threads(),
                                load_avg_at_start=bench.load_avg)


def _sync(b: _Bench) -> None:
    if b.cuda:
        torch.cuda.synchronize()


# ---- the report -------------------------------------------------------------------------------


def _report(config: pytest.Config, b: _Bench) -> None:
    if not b.results:
        return
    lines = [
        "",
        f"runtime bench on {b.device}: {b.label}",
        f"load average at start {b.load_avg} (CPU timings are only comparable on an otherwise idle machine)",
        f"prefill {b.prefill} tokens/row, decode {b.decode} steps/row, LoRA: one distinct rank-{LORA_RANK} "
        f"per sequence on all 7 target modules; torch threads {torch.get_num_threads()}",
        f"{'case':<12} {'base tok/s':>11} {'LoRA tok/s':>11} {'LoRA/base':>10} "
        f"{'base peak MB':>13} {'LoRA peak MB':>13} {'base rise MB':>13} {'LoRA rise MB':>13}",
    ]

    def fmt(row: dict | None, key: str, spec: str) -> str:
        v = None if row is None else row.get(key)
        return "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)

    for phase in ("prefill", "decode"):
        for batch in BATCHES:
            base, lora = b.results.get((phase, batch, "base")), b.results.get((phase, batch, "lora"))
            if base is None and lora is None:
                continue
            lines.append(
                f"{f'{phase} b{batch}':<12} {fmt(base, 'tokens_per_s', '11.1f')} {fmt(lora, 'tokens_per_s', '11.1f')} "
                f"{fmt(lora, 'lora_over_base', '10.2f')} {fmt(base, 'peak_mb', '13.0f')} {fmt(lora, 'peak_mb', '13.0f')} "
                f"{fmt(base, 'peak_rise_mb', '13.1f')} {fmt(lora, 'peak_rise_mb', '13.1f')}"
            )
    if b.cuda:
        lines.append(f"saved {_save(b)}")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    say = reporter.write_line if reporter is not None else print
    # Module teardown runs under output capture; the table is the point of the run, so show it.
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in lines:
            say(line)


def _save(b: _Bench) -> Path:
    """Merge this run under ``"runtime"`` into benches/results/<device>.json."""
    return save_results(b.device, "runtime", {
        "model": b.label,
        "load_avg_at_start": b.load_avg,
        "config": b.model.config.to_dict(),
        "prefill_tokens": b.prefill,
        "decode_steps": b.decode,
        "lora_rank": LORA_RANK,
        "results": list(b.results.values()),
    })

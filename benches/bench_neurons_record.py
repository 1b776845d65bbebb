"""Recording every MLP neuron at once: tokens/s of one record step, the runtime's probes against
plain forward hooks, side by side in one run.

Run: ``pytest benches/bench_neurons_record.py`` (``DIT_BENCH_TINY=1``: a 2-layer random model, a
smoke run of the harness in seconds). Nothing is asserted about speed.

One step = a batch of ``BATCH`` windows of ``T`` tokens through the model with every layer's
``mlp.I`` captured (all ``layers x intermediate`` neurons), then folded into the streaming top-k
and random-sample state (:class:`dit_engine.neurons.record.Recorder`, k = 20 + 20). Implementations:

- ``forward``: the forward alone, nothing captured (``output="hidden"``): the floor;
- ``probes`` / ``hooks``: the forward with every neuron captured, through one ``Probes`` or through
  a ``register_forward_pre_hook`` on every ``down_proj`` (the usual way), no merge;
- ``probes+record`` / ``hooks+record``: the same plus the top-k / reservoir merge: what
  ``dit neurons record`` does per batch.

tokens/s = BATCH * T / median round time; "x forward" = this row's time / the forward's.

Model. On CPU: the default model (SmolLM2-135M-Instruct, fp32: 30 x 1536 = 46,080 neurons) when it
loads, else random weights at its shapes. With CUDA: the same shapes, random bf16 weights on the
GPU, and the figures are saved under ``"neurons_record"`` in ``benches/results/<device>.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch
from _results import save_results

from dit_engine.config import ModelConfig
from dit_engine.model import Transformer
from dit_engine.neurons.record import RecordConfig, Recorder, mlp_activations

_SMOLLM2_135M = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
}
_TINY = dict(_SMOLLM2_135M, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
IMPLS = ["forward", "probes", "hooks", "probes+record", "hooks+record"]


@dataclasses.dataclass
class _Bench:
    model: Transformer
    label: str
    device: str
    batch: int
    t: int
    rounds: tuple[int, int]
    results: dict[str, dict] = dataclasses.field(default_factory=dict)
    load_avg: str = dataclasses.field(default_factory=lambda: " ".join(f"{x:.2f}" for x in os.getloadavg()))


def _model() -> tuple[Transformer, str, str]:
    if os.environ.get("DIT_BENCH_TINY"):
        cfg = ModelConfig.from_dict(_TINY, source="bench", name="tiny")
        return Transformer.random(cfg), "tiny random model (DIT_BENCH_TINY)", "cpu"
    if torch.cuda.is_available():
        cfg = ModelConfig.from_dict(_SMOLLM2_135M, source="bench", name="SmolLM2-135M-shapes")
        m = Transformer.random(cfg, dtype=torch.bfloat16, device="cuda")
        return m, "random weights at SmolLM2-135M shapes (bf16)", torch.cuda.get_device_name()
    try:
        from dit_engine.checkpoint import load_model
        from dit_engine.model_store import resolve_model

        return load_model(resolve_model("default")), "default model SmolLM2-135M-Instruct (fp32)", "cpu"
    except Exception as e:  # measure the same shapes with random weights
        cfg = ModelConfig.from_dict(_SMOLLM2_135M, source="bench", name="SmolLM2-135M-shapes")
        return Transformer.random(cfg), f"random weights at SmolLM2-135M shapes ({type(e).__name__})", "cpu"


@pytest.fixture(scope="module")
def bench(request):
    model, label, device = _model()
    cuda = device != "cpu"
    b = _Bench(model, label, device, batch=64 if cuda else 8, t=64, rounds=(10, 2) if cuda else (3, 1))
    yield b
    _report(request.config, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_neurons_record(benchmark, bench: _Bench, impl: str):
    m = bench.model
    layers = list(range(m.config.num_hidden_layers))
    ids = torch.randint(0, m.config.vocab_size, (bench.batch, bench.t), generator=torch.Generator().manual_seed(0))
    ids = ids.to(m.device)
    rec = Recorder(layers, m.config.intermediate_size, bench.t, RecordConfig(top_k=20, sample_k=20))
    via = impl.split("+")[0]
    start = [0]

    def run():
        with torch.no_grad():
            if impl == "forward":
                m(ids, output="hidden")
            else:
                acts = mlp_activations(m, ids, layers, via=via)
                if impl.endswith("+record"):
                    rec.update(acts, start[0])  # new window ids each round: the reservoir keeps merging
                    start[0] += bench.batch
        if m.device.type == "cuda":
            torch.cuda.synchronize()

    rounds, warmup = bench.rounds
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
    seconds = benchmark.stats.stats.median
    row = {"impl": impl, "tokens": bench.batch * bench.t, "median_s": seconds,
           "tokens_per_s": bench.batch * bench.t / seconds,
           "neurons": len(layers) * m.config.intermediate_size}
    bench.results[impl] = row
    benchmark.extra_info.update(row, model=bench.label, device=bench.device, threads=torch.get_num_threads(),
                                load_avg_at_start=bench.load_avg)


def _report(config: pytest.Config, b: _Bench) -> None:
    if not b.results:
        return
    base = b.results.get("forward")
    n = next(iter(b.results.values()))["neurons"]
    lines = ["", f"neuron record bench on {b.device}: {b.label}; {n} neurons, batch {b.batch} x {b.t} tokens, "
                 f"torch threads {torch.get_num_threads()}, load average at start {b.load_avg}",
             f"{'impl':<15} {'tokens/s':>10} {'median s':>10} {'x forward':>10}"]
    for impl in IMPLS:
        r = b.results.get(impl)
        if r is None:
            continue
        ratio = f"{r['median_s'] / base['median_s']:10.2f}" if base else "-".rjust(10)
        lines.append(f"{impl:<15} {r['tokens_per_s']:10.1f} {r['median_s']:10.4f} {ratio}")
    if b.device != "cpu":
        lines.append("saved " + str(save_results(b.device, "neurons_record", {
            "model": b.label, "batch": b.batch, "tokens_per_window": b.t, "load_avg_at_start": b.load_avg,
            "results": list(b.results.values())})))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    say = reporter.write_line if reporter is not None else print
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in lines:
            say(line)

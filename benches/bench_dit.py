"""DIT throughput: diff generation, DIT training and interpretation, engine vs the DIT paper's way.

Run: ``pytest benches/bench_dit.py -s`` (``-k interpret`` for one case; ``--benchmark-json=out.json``
keeps pytest-benchmark's raw numbers). Each case runs the engine and the paper's approach on the same
batch in one run; a side-by-side table is printed at the end and each ratio is stored in the
baseline's ``benchmark.extra_info["engine_speedup"]`` (how many times faster the engine is). Nothing
is asserted about speed. What *is* asserted, before any baseline is timed, is that the baseline
computes the engine's result (loss and every gradient, or the merged model's logits), so the
comparison is between two ways of doing the same work.

Cases:

1. ``diffgen``: one diff-generation training step: ``diffs`` rank-1 LoRAs on all 7 target modules,
   ``rows_per_diff`` rows each, cross-entropy, group-summed loss, forward + backward (the optimizer
   step on the LoRA factors is tiny and the same for both, so it is left out).
   - ``engine``: ``train.batch_loss`` with one trainable ``LoraSlot`` routed per row (what
     ``diffgen.train_diffs`` runs);
   - ``dense``: the paper's way: for every sequence and every adapted linear, the dense per-sample
     delta ``dW_b = scale * B_b @ A_b`` is materialised (``[batch, d_out, d_in]``) and applied by an
     einsum next to the base GEMM (:class:`_PerRowDenseDeltas`).
   Reported: tokens/s, diffs/hour and model FLOP utilisation. diffs/hour = tokens/s * 3600 /
   tokens per diff, with tokens per diff = ``(n_backdoor + n_kl) * epochs`` rows of ``DiffGenConfig``'s
   defaults times this bench's row length (training only: sample writing and verification are not
   in it, and KL rows' no-grad teacher forward is not counted).
2. ``dit_train``: one DIT training step: slot 0 = a frozen rank-1 diff per row, slot 1 = the shared
   trainable DIT adapter (rank 16, scale 32/16), mean loss; ``engine`` = ``batch_loss`` with both
   slots (what ``dit._dit_loss`` runs), ``dense`` = slot 0 densified per row as above, the shared
   adapter as an ordinary LoRA. Reported: samples/s and MFU.
3. ``interpret``: greedy answers of ``new_tokens`` tokens (no stop token, so every row makes all of
   them) to one question prompt of ``interp_prompt`` random token ids (the chat-templated DIT question
   is 38 tokens with SmolLM2's template). ``engine``: ``generate.generate`` with every row's own diff
   in slot 0 and the DIT adapter in slot 1, all diffs in one batch (the call ``dit.interpret`` makes
   per chunk; zoo reads and JSONL writes are outside both sides). ``reload``: the paper's way, one
   diff at a time: copy the base weights into a working model (the "reload"; an in-memory copy,
   cheaper than the paper's reload from disk), merge the diff and the DIT adapter into its weights
   (merging both is the fastest batch-1 decode there is, so this favours the baseline), generate
   alone at batch 1. Only ``reload_diffs`` diffs are timed and diffs/s = diffs timed / time: the
   per-diff cost is the same for every diff, and the table marks this figure as extrapolated.

Everything outside the adapter path (attention, norms, the chunked loss) is the engine's own in the
baselines, so the ratios isolate the adapter approach; the paper's eager attention and per-module
Python loop are not reproduced, which favours the baselines too.

MFU = ``6 * n_params * tokens / time / peak`` with ``n_params`` the weights that take part in a
matmul (the 7 linears of every block and the LM head; the embedding lookup and attention's own
FLOPs are left out), ``peak`` measured in this run: a large matmul in the model's dtype (CPU: fp32
2048^3; CUDA: bf16 8192^3), best of 5. The base weights are frozen here, so the backward needs no
weight gradient and the work really done is about ``4 * n_params * tokens``: the table shows that
figure too (``MFU 4N``), next to the conventional ``MFU 6N``.

Models. CPU: a small random Llama (hidden 256, 4 layers) for all cases, and the real default model
(SmolLM2-135M-Instruct, fp32) for interpretation when it is already in the engine's cache (never
fetched here). CUDA: the real default model (bf16) when cached, and Qwen3-4B shapes (hidden 2560,
ffn 9728, 36 layers, 32/8 heads, head_dim 128, vocab 151936) with random bf16 weights. The dense
baselines keep one ``[batch, d_out, d_in]`` tensor per adapted linear alive for the backward (7.3 GB
per sequence over Qwen3-4B's 36 layers in bf16); when that does not fit, both training sides run on
the model's first layers (sharing its weights) and the table says how many; the engine then also
runs the full depth (``engine_full``), whose diffs/hour and MFU are the Qwen3-4B figures. With fewer
blocks the LM head and loss, the same on both sides, weigh more, so the cut model's ratio understates
the full-depth one. With CUDA
the issue's targets are printed as met / missed and every row is merged under ``"dit"`` into
``benches/results/<device>.json``.

Timing: CPU threads are set to the cores this process may use that the load average leaves idle
(at least 1; restored afterwards), and the load average is recorded at the start: CPU timings only
compare on an otherwise idle machine. With CUDA every round ends with a synchronisation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _results import save_results
from torch import Tensor

from dit_engine.adapters import AdapterBatch, BoundAdapters, LoraSlot
from dit_engine.checkpoint import load_model
from dit_engine.config import ModelConfig
from dit_engine.diffgen import DiffGenConfig
from dit_engine.generate import SamplingParams, generate
from dit_engine.model import Transformer
from dit_engine.model_store import default_model_dir
from dit_engine.train import Batch, Example, batch_loss, collate

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
DIT_RANK, DIT_ALPHA = 16, 32.0  # DitTrainConfig's defaults
DIFF_RANK = 1  # hidden-topic diffs
# Relative error allowed between a baseline and the engine. fp32: rounding only (measured ~5e-6).
# bf16: the dense deltas and their sums are rounded to bf16 per layer while the engine keeps its LoRA
# intermediate in fp32 (measured 2e-2..4e-2 on 4 small layers); a wrong baseline (a transposed or
# unscaled delta) is off by O(1), so 1e-1 still tells them apart.
TOLERANCE = 1e-4 if DTYPE == torch.float32 else 1e-1

# HF configs of the random-weight models.
_SMALL = {
    "model_type": "llama", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512, "tie_word_embeddings": True,
}
_QWEN3_4B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Batch shapes of every case for one model, and how many rounds to time."""

    diffs: int  # diffgen: diffs trained at once
    rows_per_diff: int  # diffgen: rows of each diff in the batch
    gen_prompt: int  # diffgen: context tokens per row (no loss)
    gen_seq: int  # diffgen: tokens per row
    dit_rows: int  # dit_train: rows (one diff each)
    dit_prompt: int
    dit_seq: int
    interp_diffs: int  # interpret: diffs answered in one engine batch
    interp_prompt: int
    new_tokens: int
    reload_diffs: int  # interpret: diffs the reload baseline really runs
    rounds: int
    warmup: int


@dataclasses.dataclass(frozen=True)
class _Spec:
    key: str
    cases: tuple[str, ...]
    shapes: _Shapes


# Training rows: DiffGenConfig trains 16 diffs x 2 rows per micro-batch (rows_per_diff 2); a DIT
# row is the 38-token question plus a short label. Interpretation answers in 20 tokens, as the paper.
_GPU_TRAIN = dict(diffs=16, rows_per_diff=2, gen_prompt=48, gen_seq=96, dit_rows=32, dit_prompt=38, dit_seq=48)
_CPU_TRAIN = dict(diffs=4, rows_per_diff=2, gen_prompt=40, gen_seq=80, dit_rows=8, dit_prompt=38, dit_seq=48)
if CUDA:
    SPECS = {
        "smollm2": _Spec("smollm2", ("diffgen", "dit_train", "interpret"), _Shapes(
            **_GPU_TRAIN, interp_diffs=512, interp_prompt=38, new_tokens=20, reload_diffs=5, rounds=5, warmup=1)),
        "qwen3-4b": _Spec("qwen3-4b", ("diffgen", "dit_train", "interpret"), _Shapes(
            **_GPU_TRAIN, interp_diffs=256, interp_prompt=38, new_tokens=20, reload_diffs=3, rounds=5, warmup=1)),
    }
else:
    SPECS = {
        "small": _Spec("small", ("diffgen", "dit_train", "interpret"), _Shapes(
            **_CPU_TRAIN, interp_diffs=16, interp_prompt=38, new_tokens=20, reload_diffs=3, rounds=3, warmup=1)),
        # The real model only answers on CPU: its dense training baseline would need ~3 GB per 8 rows.
        "smollm2": _Spec("smollm2", ("interpret",), _Shapes(
            **_CPU_TRAIN, interp_diffs=16, interp_prompt=38, new_tokens=20, reload_diffs=2, rounds=1, warmup=1)),
    }

_IMPLS = {"diffgen": ("engine", "dense", "engine_full"), "dit_train": ("engine", "dense", "engine_full"),
          "interpret": ("engine", "reload")}
# Engine first in every case, so the ratio is ready when the baseline records it. ``engine_full``
# only exists where the training model had to be cut (CUDA).
CASES = [(key, case, impl) for key, spec in SPECS.items() for case in spec.cases for impl in _IMPLS[case]
         if CUDA or impl != "engine_full"]


# ---- the suite: models, peak, rows; the table at the end ------------------------------------------


@dataclasses.dataclass
class _Model:
    model: Transformer  # full depth: interpretation, engine_full
    train_model: Transformer  # what diffgen / dit_train time both sides on (maybe model's first layers)
    label: str


@dataclasses.dataclass
class _Suite:
    peak_flops: float  # measured matmul FLOP/s in DTYPE
    threads: int
    load_avg: str
    models: dict[str, _Model | str] = dataclasses.field(default_factory=dict)  # key -> model, or why not
    rows: dict[tuple[str, str, str], dict] = dataclasses.field(default_factory=dict)

    def model(self, key: str) -> _Model:
        if key not in self.models:
            try:
                self.models[key] = _load(key)
            except _Unavailable as e:
                self.models[key] = str(e)
        got = self.models[key]
        if isinstance(got, str):
            pytest.skip(got)
        return got


class _Unavailable(Exception):
    """A model this machine cannot run the bench on (the reason is shown as the skip reason)."""


@pytest.fixture(scope="module")
def suite(request):
    threads_before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(_cpu_threads())
    s = _Suite(_measure_peak(), torch.get_num_threads(), " ".join(f"{x:.2f}" for x in os.getloadavg()))
    yield s
    _report(request.config, s)
    torch.set_num_threads(threads_before)


def _cpu_threads() -> int:
    """The cores this process may use that other work leaves idle (1-minute load average), at least 1.

    More threads than idle cores is far worse than fewer: each op's threads wait at its end for one
    whose core is busy elsewhere (measured here: 2 threads at load 6 on 2 cores ran a training step
    about 8x slower than 1 thread)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def _measure_peak() -> float:
    n = 8192 if CUDA else 2048
    a = torch.randn(n, n, device=DEVICE).to(DTYPE)
    b = torch.randn(n, n, device=DEVICE).to(DTYPE)
    a @ b
    best = float("inf")
    for _ in range(5):
        _sync()
        t0 = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _load(key: str) -> _Model:
    if key == "small":
        config = ModelConfig.from_dict(_SMALL, source="bench_dit", name="small-llama")
        model = Transformer.random(config, seed=0)
        return _Model(model, model, "random weights, small Llama (hidden 256, 4 layers, fp32)")
    if key == "smollm2":
        if not (default_model_dir() / "config.json").is_file():
            raise _Unavailable(f"default model not in the engine's cache ({default_model_dir()}); not fetched here")
        model = load_model(default_model_dir(), dtype=DTYPE, device=DEVICE).requires_grad_(False)
        label = f"{model.config.name or 'SmolLM2-135M-Instruct'} (real weights, {str(DTYPE).removeprefix('torch.')})"
    elif key == "qwen3-4b":
        model = Transformer.random(ModelConfig.from_dict(_QWEN3_4B, source="bench_dit", name="Qwen3-4B-shapes"),
                                   seed=0, dtype=DTYPE, device=DEVICE)
        label = "random weights at Qwen3-4B shapes (bf16)"
    else:
        raise ValueError(key)
    layers = _layers_that_fit(model, SPECS[key].shapes)
    if layers == model.config.num_hidden_layers:
        return _Model(model, model, label)
    label += (f"; training cases on its first {layers} of {model.config.num_hidden_layers} layers "
              f"(the dense baseline's per-sequence weights would not fit more)")
    return _Model(model, _first_layers(model, layers), label)


def _layers_that_fit(model: Transformer, shapes: _Shapes) -> int:
    """Blocks for which the dense baseline's saved per-sequence weights (one ``[rows, d_out, d_in]``
    per adapted linear, kept for the backward) fit in 60% of the free GPU memory; the rest is left
    for the transient ``dW`` gradients, activations and allocator slack."""
    n = model.config.num_hidden_layers
    if not CUDA:
        return n
    rows = max(shapes.diffs * shapes.rows_per_diff, shapes.dit_rows)
    per_layer = rows * _block_params(model.config) * DTYPE.itemsize
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(n, int(0.6 * free // per_layer)))


def _first_layers(model: Transformer, n: int) -> Transformer:
    """A Transformer of the first ``n`` blocks whose tensors are ``model``'s own (no copy)."""
    config = dataclasses.replace(model.config, num_hidden_layers=n)
    with torch.device("meta"):
        small = Transformer(config)
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    small.load_state_dict(keep, assign=True)
    small.init_buffers(model.device)
    return small.eval().requires_grad_(False)


def _block_params(config: ModelConfig) -> int:
    return sum(d_in * d_out for d_in, d_out in config.linear_shapes().values())


def _matmul_params(config: ModelConfig) -> int:
    """Weights in a matmul per token: the 7 linears of every block and the LM head."""
    return config.num_hidden_layers * _block_params(config) + config.vocab_size * config.hidden_size


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _timed(benchmark, fn: Callable[[], object], shapes: _Shapes) -> float:
    """Median seconds of ``fn`` over the spec's rounds (pytest-benchmark), synchronised per round."""
    def round_():
        fn()
        _sync()

    benchmark.pedantic(round_, rounds=shapes.rounds, warmup_rounds=shapes.warmup, iterations=1)
    if benchmark.stats is not None:
        return benchmark.stats.stats.median
    t0 = time.perf_counter()  # --benchmark-disable: one untimed run; time one more to keep the table whole
    round_()
    return time.perf_counter() - t0


# ---- the cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,case,impl", CASES, ids=[f"{k}-{c}-{i}" for k, c, i in CASES])
def test_dit(benchmark, suite: _Suite, key: str, case: str, impl: str):
    m = suite.model(key)
    shapes = SPECS[key].shapes
    if impl == "engine_full" and m.train_model is m.model:
        pytest.skip("the training cases already run the full depth")
    if case == "interpret":
        row = _bench_interpret(benchmark, m.model, shapes, impl)
    else:
        row = _bench_train(benchmark, suite, m.model if impl == "engine_full" else m.train_model, shapes, case, impl)
    row = {"model": key, "case": case, "impl": impl, **row}
    engine = suite.rows.get((key, case, "engine"))
    if impl in ("dense", "reload") and engine is not None:
        row["engine_speedup"] = row["seconds_per_unit"] / engine["seconds_per_unit"]
    suite.rows[(key, case, impl)] = row
    benchmark.extra_info.update(row)
    benchmark.extra_info.update(model_label=m.label, device=_device_name(), threads=suite.threads,
                                load_avg_at_start=suite.load_avg, peak_tflop_per_s=suite.peak_flops / 1e12)
    if CUDA:
        torch.cuda.empty_cache()  # the dense baseline's buffers must not crowd the next case


# ---- training steps -------------------------------------------------------------------------------


def _bench_train(benchmark, suite: _Suite, model: Transformer, shapes: _Shapes, case: str, impl: str) -> dict:
    batch, slots, params, reduce = _train_inputs(model, shapes, case)
    way = "dense" if impl == "dense" else "engine"
    check_err = _check_dense_matches_engine(model, batch, slots, params, reduce) if way == "dense" else None

    def step():
        loss = _loss(model, batch, slots, reduce, way)
        torch.autograd.grad(loss, params)

    seconds = _timed(benchmark, step, shapes)
    rows, seq = batch.input_ids.shape
    tokens = rows * seq
    n_params = _matmul_params(model.config)
    row = {
        "layers": model.config.num_hidden_layers, "rows": rows, "seq": seq, "tokens": tokens, "median_s": seconds,
        "tokens_per_s": tokens / seconds, "n_params": n_params,
        "mfu_6n": 6 * n_params * tokens / seconds / suite.peak_flops,
        "mfu_4n": 4 * n_params * tokens / seconds / suite.peak_flops, "check_rel_err": check_err,
    }
    if case == "diffgen":
        d = DiffGenConfig()
        tokens_per_diff = (d.n_backdoor + d.n_kl) * d.epochs * seq
        row.update(diffs=shapes.diffs, tokens_per_diff=tokens_per_diff, seconds_per_unit=seconds / tokens,
                   diffs_per_hour=tokens / seconds * 3600 / tokens_per_diff)
    else:
        row.update(samples_per_s=rows / seconds, seconds_per_unit=seconds / rows)
    return row


def _train_inputs(model: Transformer, shapes: _Shapes, case: str) -> tuple[Batch, list[LoraSlot], list[Tensor], str]:
    """(batch, adapter slots, trainable tensors, group reduction) of one training step."""
    config, dev = model.config, model.device
    g = torch.Generator().manual_seed(1)
    if case == "diffgen":
        n_rows, prompt, seq = shapes.diffs * shapes.rows_per_diff, shapes.gen_prompt, shapes.gen_seq
        groups = [r % shapes.diffs for r in range(n_rows)]  # interleaved, as train_diffs batches them
    else:
        n_rows, prompt, seq = shapes.dit_rows, shapes.dit_prompt, shapes.dit_seq
        groups = list(range(n_rows))
    examples = [Example(_ids(g, prompt, config.vocab_size), _ids(g, seq - prompt, config.vocab_size), "ce", grp)
                for grp in groups]
    batch = collate(examples).to(dev)
    # init="random": both factors non-zero, so every gradient the check compares is non-trivial.
    if case == "diffgen":
        diffs = LoraSlot.create(config, shapes.diffs, DIFF_RANK, init="random", dtype=model.dtype, device=dev,
                                trainable=True, generator=g, name="diffs").with_index(batch.group)
        return batch, [diffs], diffs.parameters(), "sum"
    diffs = LoraSlot.create(config, n_rows, DIFF_RANK, init="random", dtype=model.dtype, device=dev,
                            generator=g, name="diffs").with_index(batch.group)
    dit = LoraSlot.create(config, 1, DIT_RANK, scale=DIT_ALPHA / DIT_RANK, init="random", dtype=model.dtype,
                          device=dev, trainable=True, generator=g, name="dit")
    dit = dit.with_index(torch.zeros(n_rows, dtype=torch.int64, device=dev))
    return batch, [diffs, dit], dit.parameters(), "mean"


def _ids(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _loss(model: Transformer, batch: Batch, slots: list[LoraSlot], reduce: str, way: str) -> Tensor:
    b, t = batch.input_ids.shape
    adapters = AdapterBatch(*slots) if way == "engine" else _PerRowDenseDeltas(slots, b, t)
    loss, _ = batch_loss(model, batch, adapters, group_reduce=reduce)
    return loss


class _PerRowDenseDeltas(BoundAdapters):
    """The DIT paper's adapter path, for comparison: every sequence's own dense weight delta.

    A slot with one adapter per row (the diffs) is densified per sequence and module,
    ``dW_b = scale_b * B_b @ A_b`` (``[batch, d_out, d_in]``), and applied as
    ``einsum("bti,boi->bto", x, dW)``: a second full-size matmul next to the base GEMM, with ``dW``
    kept alive for the backward. A shared slot (one adapter, the DIT adapter) runs as an ordinary
    LoRA ``scale * (x @ A^T) @ B^T``. No routing metadata is needed.
    """

    def delta(self, name: str, x: Tensor) -> Tensor | None:  # x: [batch*seq, d_in] -> [batch*seq, d_out]
        x3 = x.view(self.batch, self.seq, x.shape[-1])  # [b, t, d_in]
        out = None
        for slot in self.slots:
            if name not in slot.A:
                continue
            A, B = slot.A[name], slot.B[name]  # [n, r, d_in], [n, d_out, r]
            if slot.n_adapters == 1:
                d = (x3 @ A[0].T) @ B[0].T * slot.scale[0].to(x.dtype)
            else:
                idx = slot.index  # [b], every row has its diff here
                dW = torch.bmm(B[idx] * slot.scale[idx, None, None].to(x.dtype), A[idx])  # [b, d_out, d_in]
                d = torch.einsum("bti,boi->bto", x3, dW)
            out = d if out is None else out + d
        return None if out is None else out.reshape(x.shape[0], -1)


def _check_dense_matches_engine(model: Transformer, batch: Batch, slots: list[LoraSlot], params: list[Tensor],
                                reduce: str) -> float:
    """The dense baseline must compute the engine's loss and gradients, or its timing means nothing.
    Returns the largest relative error (loss or any gradient)."""
    results = {}
    for way in ("engine", "dense"):
        loss = _loss(model, batch, slots, reduce, way)
        results[way] = [loss.detach()] + [gr.detach() for gr in torch.autograd.grad(loss, params)]
    names = ["loss"] + [f"grad {i}" for i in range(len(params))]
    worst = 0.0
    for name, e, d in zip(names, results["engine"], results["dense"]):
        err = _rel_err(d, e)
        assert err < TOLERANCE, f"dense baseline {name}: relative error {err:.2e} vs the engine (limit {TOLERANCE:.0e})"
        worst = max(worst, err)
    return worst


def _rel_err(x: Tensor, ref: Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


# ---- interpretation -------------------------------------------------------------------------------


def _bench_interpret(benchmark, model: Transformer, shapes: _Shapes, impl: str) -> dict:
    config, dev = model.config, model.device
    g = torch.Generator().manual_seed(2)
    n = shapes.interp_diffs
    diffs = LoraSlot.create(config, n, DIFF_RANK, init="random", dtype=model.dtype, device=dev, generator=g,
                            name="diffs")
    dit = LoraSlot.create(config, 1, DIT_RANK, scale=DIT_ALPHA / DIT_RANK, init="random", dtype=model.dtype,
                          device=dev, generator=g, name="dit")
    prompt = _ids(g, shapes.interp_prompt, config.vocab_size)  # one question for every diff, as interpret asks
    params = SamplingParams(max_new_tokens=shapes.new_tokens, stop_token_ids=())  # no stop: every row answers in full
    check_err = None
    if impl == "engine":
        adapters = AdapterBatch(diffs.with_index(torch.arange(n, device=dev)),
                                dit.with_index(torch.zeros(n, dtype=torch.int64, device=dev)))

        def run():
            generate(model, [prompt] * n, params, adapters=adapters, batch_size=n)

        timed = n
    else:
        work = copy.deepcopy(model)
        check_err = _check_merge_matches_engine(model, work, diffs, dit, prompt)
        timed = shapes.reload_diffs

        def run():
            for j in range(timed):
                _reload_merged(work, model, diffs, j, dit)
                generate(work, [prompt], params, batch_size=1)

    seconds = _timed(benchmark, run, shapes)
    return {
        "layers": config.num_hidden_layers, "diffs_timed": timed, "prompt_tokens": shapes.interp_prompt,
        "new_tokens": shapes.new_tokens, "median_s": seconds, "seconds_per_unit": seconds / timed,
        "diffs_per_s": timed / seconds, "new_tokens_per_s": timed * shapes.new_tokens / seconds,
        "extrapolated": impl == "reload", "check_rel_err": check_err,
    }


@torch.no_grad()
def _reload_merged(work: Transformer, base: Transformer, diffs: LoraSlot, j: int, dit: LoraSlot) -> None:
    """The paper's per-diff model: fresh base weights, then diff ``j`` and the DIT adapter merged in."""
    for (name, w), (base_name, b) in zip(work.named_parameters(), base.named_parameters()):
        assert name == base_name, f"working copy has {name} where the base model has {base_name}"
        w.copy_(b)  # the "reload"
    for name in diffs.A:
        W = work.get_submodule(name).weight  # [d_out, d_in]
        W.add_((diffs.B[name][j] * diffs.scale[j].to(W.dtype)) @ diffs.A[name][j])
        if name in dit.A:
            W.add_((dit.B[name][0] * dit.scale[0].to(W.dtype)) @ dit.A[name][0])


@torch.no_grad()
def _check_merge_matches_engine(model: Transformer, work: Transformer, diffs: LoraSlot, dit: LoraSlot,
                                prompt: list[int]) -> float:
    """Diff 0 merged into the weights must give the logits the engine gives with it as an adapter.
    Returns the relative error of the merged model's last-position logits."""
    dev = model.device
    ids = torch.tensor([prompt], device=dev)
    one = torch.zeros(1, dtype=torch.int64, device=dev)
    engine = model(ids, AdapterBatch(diffs.with_index(one), dit.with_index(one)), output="last")  # [1, V]
    _reload_merged(work, model, diffs, 0, dit)
    merged = work(ids, None, output="last")
    err = _rel_err(merged, engine)
    assert err < TOLERANCE, (f"reload baseline: merged-model logits off the engine's by {err:.2e} "
                             f"(limit {TOLERANCE:.0e})")
    return err


# ---- the report -----------------------------------------------------------------------------------


def _device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def _report(config: pytest.Config, s: _Suite) -> None:
    if not s.rows:
        return
    d = DiffGenConfig()
    lines = [
        "",
        f"DIT bench on {_device_name()} ({str(DTYPE).removeprefix('torch.')}); measured matmul peak "
        f"{s.peak_flops / 1e12:.3f} TFLOP/s; torch threads {s.threads}; load average at start {s.load_avg}"
        + ("" if CUDA else " (CPU timings only compare on an otherwise idle machine)"),
    ]
    lines += [f"  {key}: {m.label if isinstance(m, _Model) else 'not run: ' + m}" for key, m in s.models.items()]
    lines.append(f"{'case':<10} {'model':<9} {'impl':<12} {'layers':>6} {'time s':>9} {'tokens/s':>10} "
                 f"{'throughput':>22} {'MFU 6N':>7} {'MFU 4N':>7} {'engine x':>9} {'check':>8}")
    for r in s.rows.values():
        mfu6 = f"{100 * r['mfu_6n']:.1f}%" if "mfu_6n" in r else "-"
        mfu4 = f"{100 * r['mfu_4n']:.1f}%" if "mfu_4n" in r else "-"
        speed = f"{r['engine_speedup']:.2f}" if "engine_speedup" in r else "-"
        tok_s = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        check = "-" if r.get("check_rel_err") is None else f"{r['check_rel_err']:.1e}"
        lines.append(f"{r['case']:<10} {r['model']:<9} {r['impl']:<12} {r['layers']:>6} {r['median_s']:>9.4f} "
                     f"{tok_s:>10} {_throughput(r):>22} {mfu6:>7} {mfu4:>7} {speed:>9} {check:>8}")
    lines.append(f"diffs/h: tokens/s * 3600 / ((n_backdoor {d.n_backdoor} + n_kl {d.n_kl}) * epochs {d.epochs} "
                 f"rows * row length) per diff; engine x: baseline time / engine time on the same batch; check: the "
                 f"baseline's largest relative error vs the engine (loss and gradients, or merged logits; "
                 f"limit {TOLERANCE:.0e})")
    reload = [r for r in s.rows.values() if r["impl"] == "reload"]
    for r in reload:
        lines.append(f"reload ({r['model']}): * extrapolated: {r['diffs_timed']} diffs really run one after another "
                     f"(reload + merge + batch-1 generate each), diffs/s = {r['diffs_timed']} / their time")
    if CUDA:
        lines += _targets(s)
        lines.append(f"saved {_save(s)}")
    capture = config.pluginmanager.get_plugin("capturemanager")
    # Module teardown runs under output capture; the table is the point of the run, so show it.
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


def _throughput(r: dict) -> str:
    if "diffs_per_hour" in r:
        return f"{r['diffs_per_hour']:,.0f} diffs/h"
    if "samples_per_s" in r:
        return f"{r['samples_per_s']:.1f} samples/s"
    return f"{r['diffs_per_s']:.2f} diffs/s" + (" *" if r.get("extrapolated") else "")


def _targets(s: _Suite) -> list[str]:
    """The issues' GPU targets, met or missed, from the measured rows."""
    out = ["targets:"]

    def check(what: str, value: float, want: float, unit: str) -> None:
        out.append(f"  {what}: {value:.2f}{unit} (target >= {want:g}{unit}) {'met' if value >= want else 'MISSED'}")

    for key in SPECS:
        dense = s.rows.get((key, "diffgen", "dense"))
        full = s.rows.get((key, "diffgen", "engine_full")) or s.rows.get((key, "diffgen", "engine"))
        if full:
            check(f"{key} diffgen MFU (6N, {full['layers']} layers)", 100 * full["mfu_6n"], 40, "%")
        if dense and "engine_speedup" in dense:
            check(f"{key} diffgen engine vs dense einsum", dense["engine_speedup"], 3, "x")
    interp = s.rows.get(("qwen3-4b", "interpret", "engine"))
    if interp:
        check("qwen3-4b interpret", interp["diffs_per_s"], 500, " diffs/s")
    dit = s.rows.get(("qwen3-4b", "dit_train", "dense"))
    if dit and "engine_speedup" in dit:
        check("qwen3-4b DIT training engine vs dense", dit["engine_speedup"], 10, "x")
    return out


def _save(s: _Suite) -> Path:
    """Merge this run under ``"dit"`` into benches/results/<device>.json."""
    return save_results(_device_name(), "dit", {
        "dtype": str(DTYPE),
        "peak_tflop_per_s": s.peak_flops / 1e12,
        "load_avg_at_start": s.load_avg,
        "models": {k: {"label": m.label, "config": m.model.config.to_dict(),
                       "train_layers": m.train_model.config.num_hidden_layers}
                   if isinstance(m, _Model) else {"not_run": m} for k, m in s.models.items()},
        "shapes": {k: dataclasses.asdict(spec.shapes) for k, spec in SPECS.items()},
        "rows": list(s.rows.values()),
    })

"""Kernel benches: every op against its roofline and against the plain-torch ways a user would take.

Run: ``pytest benches/bench_kernels.py`` (``-k multi_lora`` for one op; ``--benchmark-json=out.json``
keeps pytest-benchmark's raw numbers). On CPU the shapes are tiny and "ours" is the dispatched public
op, i.e. the plain-torch reference: that run only exercises the harness. With CUDA the shapes are
Qwen3-4B's (d 2560, ffn 9728) and Llama-8B's (4096, 14336) in bf16, "ours" is the Triton path, and
the figures are merged into ``benches/results/<device>.json`` under ``"kernels"`` (device, commit,
date, every row). Nothing is asserted about speed; the GPU targets are printed as met / missed.

For each case and implementation the table gives the median time per call, the achieved GB/s and
TFLOP/s computed from an explicit formula of the case's *minimal* traffic and work (the same formula
for every implementation of a case, so figures compare), the fraction of the roofline reached
(roofline time = max(bytes / measured copy bandwidth, flops / measured GEMM throughput), both
measured on this device at the start), and how many times faster "ours" is.

Implementations of the multi-LoRA delta (per-sequence adapters, as in DIT):
- ``ours``: ``multi_lora`` / ``multi_lora_sum`` with the routing built once per batch (outside the
  timed region, as the model builds it once for all layers);
- ``dense_einsum``: the DIT paper's way: materialise each sequence's dense ``scale * B @ A`` and einsum;
- ``gather_bmm``: gather each sequence's A and B, two bmm;
- ``peft_loop``: PEFT's mixed-batch way: a Python loop over the unique adapters with gather / scatter;
- ``base_gemm``: the base layer's own GEMM at the same shape, for scale (LoRA adds this much on top).
Byte model (decode, after the references): LoRA weights of the active adapters, ``x`` read, ``y``
written, the fp32 intermediate written and read; FLOPs ``2 N r (d_in + d_out)`` (x3 for fwd+bwd).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _results import save_results

from dit_kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from dit_kernels.multi_lora import build_lora_meta, multi_lora_sum
from dit_kernels.rms_norm import rms_norm, rms_norm_ref
from dit_kernels.rope import apply_rope, apply_rope_ref
from dit_kernels.swiglu import swiglu, swiglu_ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 10 if CUDA else 2


# ---- cases ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    n: int  # stacked adapters
    rank: int
    trainable: bool
    shared: bool = False  # one adapter for every sequence (the DIT adapter) instead of one per sequence


@dataclasses.dataclass(frozen=True)
class _LoraCase:
    """A multi-LoRA delta on one linear layer: ``batch`` sequences of ``seq`` tokens."""

    name: str
    d_in: int
    d_out: int
    batch: int
    seq: int
    slots: tuple[_Slot, ...]
    backward: bool  # time forward + backward (training) instead of forward only

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def bytes(self) -> int:
        e = DTYPE.itemsize
        total = self.tokens * (self.d_in + self.d_out) * e  # x read, y written
        for s in self.slots:
            active = 1 if s.shared else min(s.n, self.batch)
            weights = active * s.rank * (self.d_in + self.d_out) * e
            total += weights + 2 * self.tokens * s.rank * 4  # fp32 intermediate written + read
            if self.backward:
                # dy read, x read again (dA), dx written; weights again; their grads written if trained
                total += self.tokens * (self.d_out + 2 * self.d_in) * e + weights * (2 if s.trainable else 1)
        return total

    def flops(self) -> int:
        per_pass = sum(2 * self.tokens * s.rank * (self.d_in + self.d_out) for s in self.slots)
        return per_pass * (3 if self.backward else 1)


def _lora_cases() -> list[_LoraCase]:
    if not CUDA:
        shapes = [("tiny", 256, 512)]
        decode, prefill = (8, 1), (4, 32)
    else:
        shapes = [("qwen3-4b.qkv", 2560, 2560), ("qwen3-4b.up", 2560, 9728), ("qwen3-4b.down", 9728, 2560),
                  ("llama-8b.up", 4096, 14336)]  # fmt: skip
        decode, prefill = (64, 1), (8, 512)
    cases = []
    for label, d_in, d_out in shapes:
        b, t = decode
        cases.append(_LoraCase(f"decode.{label}", d_in, d_out, b, t, (_Slot(b, 16, False),), backward=False))
        cases.append(
            _LoraCase(f"decode_dit.{label}", d_in, d_out, b, t,
                      (_Slot(b, 8, False), _Slot(1, 16, False, shared=True)), backward=False)
        )  # fmt: skip
        b, t = prefill
        cases.append(_LoraCase(f"prefill.{label}", d_in, d_out, b, t, (_Slot(b, 16, False),), backward=False))
        cases.append(_LoraCase(f"train_zoo.{label}", d_in, d_out, b, t, (_Slot(b, 16, True),), backward=True))
        cases.append(
            _LoraCase(f"train_dit.{label}", d_in, d_out, b, t,
                      (_Slot(b, 8, False), _Slot(1, 16, True, shared=True)), backward=True)
        )  # fmt: skip
    return cases


LORA_CASES = _lora_cases()
LORA_IMPLS = ("ours", "dense_einsum", "gather_bmm", "peft_loop", "base_gemm")


# ---- suite: rooflines measured once, rows collected, table printed and saved at the end ------------


@dataclasses.dataclass
class _Suite:
    bandwidth: float  # bytes/s, measured copy
    gemm: float  # flop/s, measured GEMM in DTYPE
    rows: list[dict] = dataclasses.field(default_factory=list)


@pytest.fixture(scope="module")
def suite(request):
    s = _Suite(bandwidth=_measure_bandwidth(), gemm=_measure_gemm())
    yield s
    _report(request.config, s)


def _measure_bandwidth() -> float:
    n = (1 << 28) if CUDA else (1 << 23)  # 512 MiB / 32 MiB of fp16 / fp32
    src = torch.empty(n, dtype=torch.float16 if CUDA else torch.float32, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), rounds=5)
    return 2 * src.numel() * src.element_size() / t


def _measure_gemm() -> float:
    n = 8192 if CUDA else 512
    a = torch.randn(n, n, device=DEVICE).to(DTYPE)
    b = torch.randn(n, n, device=DEVICE).to(DTYPE)
    t = _time(lambda: a @ b, rounds=5)
    return 2 * n**3 / t


def _time(fn: Callable[[], object], rounds: int) -> float:
    """Median seconds per call outside pytest-benchmark (used for the rooflines only)."""
    fn()
    _sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, suite: _Suite, op: str, case: str, impl: str, fn: Callable[[], object],
         bytes_: int, flops: int, shape: dict) -> None:  # fmt: skip
    """Time ``fn`` with pytest-benchmark and record one row. On GPU a round runs ``inner`` calls and
    synchronises once, so that launch-sized ops are not dominated by the synchronisation."""
    fn()
    _sync()
    inner = 1
    if CUDA:
        t_one = _time(fn, rounds=3)
        inner = max(1, min(1000, int(2e-3 / max(t_one, 1e-7))))

    def round_():
        for _ in range(inner):
            fn()
        _sync()

    peak_mb = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median / inner
    else:  # --benchmark-disable: pytest-benchmark ran it once untimed; keep the table complete anyway
        seconds = _time(round_, rounds=1) / inner
    roofline = max(bytes_ / suite.bandwidth, flops / suite.gemm)
    row = {
        "op": op, "case": case, "impl": impl, "shape": shape, "time_us": seconds * 1e6,
        "bytes": bytes_, "flops": flops, "gb_per_s": bytes_ / seconds / 1e9, "tflop_per_s": flops / seconds / 1e12,
        "roofline_fraction": roofline / seconds, "peak_extra_mb": peak_mb,
    }  # fmt: skip
    benchmark.extra_info.update(row)
    suite.rows.append(row)


# ---- multi-LoRA ---------------------------------------------------------------------------------


def _lora_tensors(case: _LoraCase, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(case.tokens, case.d_in, generator=g, device=DEVICE).to(DTYPE)
    slots = []
    for s in case.slots:
        A = (torch.randn(s.n, s.rank, case.d_in, generator=g, device=DEVICE) / case.d_in**0.5).to(DTYPE)
        B = (torch.randn(s.n, case.d_out, s.rank, generator=g, device=DEVICE) / s.rank**0.5).to(DTYPE)
        A.requires_grad_(case.backward and s.trainable)
        B.requires_grad_(case.backward and s.trainable)
        scale = torch.full((s.n,), 1.0 / s.rank, device=DEVICE)
        seq_index = torch.zeros(case.batch, dtype=torch.int64, device=DEVICE) if s.shared else torch.arange(
            case.batch, device=DEVICE) % s.n  # fmt: skip
        slots.append((A, B, scale, seq_index))
    x.requires_grad_(case.backward)
    return x, slots


def _lora_impl(case: _LoraCase, impl: str) -> Callable[[], object]:
    """A zero-argument call computing the case's delta (and its backward when training) with ``impl``."""
    x, slots = _lora_tensors(case)
    b, t = case.batch, case.seq
    if impl == "ours":
        routed = [(A, B, s, build_lora_meta(idx[:, None].expand(b, t).reshape(-1))) for A, B, s, idx in slots]

        def delta():
            return multi_lora_sum(x, routed)
    elif impl == "dense_einsum":

        def delta():
            x3 = x.view(b, t, case.d_in)
            out = 0
            for A, B, s, idx in slots:
                W = torch.bmm(B[idx] * s[idx, None, None].to(DTYPE), A[idx])  # [b, d_out, d_in], materialised
                out = out + torch.einsum("bti,boi->bto", x3, W)
            return out.reshape(b * t, case.d_out)
    elif impl == "gather_bmm":

        def delta():
            x3 = x.view(b, t, case.d_in)
            out = 0
            for A, B, s, idx in slots:
                h = torch.bmm(x3, A[idx].transpose(1, 2))  # [b, t, r]
                out = out + torch.bmm(h, B[idx].transpose(1, 2)) * s[idx, None, None].to(DTYPE)
            return out.reshape(b * t, case.d_out)
    elif impl == "peft_loop":
        # PEFT: the unique adapters and their rows are known on the host per batch.
        plans = []
        for A, B, s, idx in slots:
            tok = idx[:, None].expand(b, t).reshape(-1)
            plans.append([(a, torch.nonzero(tok == a).flatten()) for a in sorted(set(idx.tolist()))])

        def delta():
            out = torch.zeros(b * t, case.d_out, dtype=DTYPE, device=DEVICE)
            for (A, B, s, _), plan in zip(slots, plans):
                for a, rows in plan:
                    out = out.index_add(0, rows, (x[rows] @ A[a].T @ B[a].T) * s[a].to(DTYPE))
            return out
    elif impl == "base_gemm":
        W = (torch.randn(case.d_out, case.d_in, device=DEVICE) / case.d_in**0.5).to(DTYPE)

        def delta():
            return x @ W.T
    else:
        raise ValueError(impl)
    if not case.backward:
        return lambda: delta()
    leaves = [x] if impl == "base_gemm" else [x] + [w for A, B, _, _ in slots for w in (A, B) if w.requires_grad]
    dy = torch.randn(case.tokens, case.d_out, device=DEVICE).to(DTYPE)
    return lambda: torch.autograd.grad(delta(), leaves, dy)


@pytest.mark.parametrize("impl", LORA_IMPLS)
@pytest.mark.parametrize("case", LORA_CASES, ids=[c.name for c in LORA_CASES])
def test_multi_lora(benchmark, suite, case: _LoraCase, impl: str):
    if impl == "dense_einsum" and CUDA and case.batch * case.d_in * case.d_out * len(case.slots) * 2 > 24 << 30:
        pytest.skip("dense per-sequence weights would not fit next to the other buffers")
    fn = _lora_impl(case, impl)
    if impl == "base_gemm":
        e = DTYPE.itemsize
        bytes_ = (case.d_in * case.d_out + case.tokens * (case.d_in + case.d_out) * (2 if case.backward else 1)) * e
        flops = 2 * case.tokens * case.d_in * case.d_out * (2 if case.backward else 1)  # W frozen: fwd + dx
    else:
        bytes_, flops = case.bytes(), case.flops()
    shape = {"d_in": case.d_in, "d_out": case.d_out, "batch": case.batch, "seq": case.seq,
             "slots": [dataclasses.asdict(s) for s in case.slots], "backward": case.backward}  # fmt: skip
    _run(benchmark, suite, "multi_lora", case.name, impl, fn, bytes_, flops, shape)


# ---- fused ops ----------------------------------------------------------------------------------

ROWS = 16384 if CUDA else 256
HIDDEN = (2560, 4096) if CUDA else (256,)
FFN = (9728, 14336) if CUDA else (512,)


def _fused_cases() -> list[tuple[str, str, dict]]:
    cases = []
    for d in HIDDEN:
        cases += [("rms_norm", f"rms_norm.d{d}.{mode}", {"rows": ROWS, "d": d, "mode": mode}) for mode in ("fwd", "fwd_bwd")]
    heads = ((32, 128), (8, 128)) if CUDA else ((4, 64),)
    for h, hd in heads:
        cases += [("rope", f"rope.h{h}.{mode}", {"batch": 8 if CUDA else 2, "seq": ROWS // (8 if CUDA else 2),
                                                    "heads": h, "hd": hd, "mode": mode}) for mode in ("fwd", "fwd_bwd")]
    for f in FFN:
        cases += [("swiglu", f"swiglu.f{f}.{mode}", {"rows": ROWS, "f": f, "mode": mode}) for mode in ("fwd", "fwd_bwd")]
    ce_shapes = ((8192, 2560, 151936), (8192, 4096, 128256)) if CUDA else ((128, 256, 2048),)
    for n, d, v in ce_shapes:
        cases.append(("cross_entropy", f"cross_entropy.d{d}.v{v}", {"tokens": n, "d": d, "vocab": v, "mode": "fwd_bwd"}))
    return cases  # fmt: skip


FUSED_CASES = _fused_cases()


def _fused_impl(op: str, p: dict, impl: str) -> tuple[Callable[[], object], int, int]:
    """(call, bytes, flops) for one fused-op case; ``impl`` is ``ours`` or ``torch`` (the reference)."""
    e = DTYPE.itemsize
    bwd = p["mode"] == "fwd_bwd"
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(DTYPE)

    if op == "rms_norm":
        x, w = rand(p["rows"], p["d"]).requires_grad_(bwd), torch.ones(p["d"], device=DEVICE, dtype=DTYPE)
        f = rms_norm if impl == "ours" else rms_norm_ref
        call = (lambda: f(x, w, 1e-6))
        leaves, n_io = [x], (5 if bwd else 2)  # fwd: x, y; bwd adds x, dy, dx
        elems = p["rows"] * p["d"]
    elif op == "rope":
        x = rand(p["batch"], p["seq"], p["heads"], p["hd"]).transpose(1, 2).requires_grad_(bwd)
        cos, sin = rand(p["batch"], p["seq"], p["hd"]), rand(p["batch"], p["seq"], p["hd"])
        f = apply_rope if impl == "ours" else apply_rope_ref
        call = (lambda: f(x, cos, sin))
        leaves, n_io = [x], (4 if bwd else 2)
        elems = x.numel()
    elif op == "swiglu":
        gate, up = rand(p["rows"], p["f"]).requires_grad_(bwd), rand(p["rows"], p["f"]).requires_grad_(bwd)
        f = swiglu if impl == "ours" else swiglu_ref
        call = (lambda: f(gate, up))
        leaves, n_io = [gate, up], (8 if bwd else 3)  # fwd: g, u, y; bwd: g, u, dy, dg, du
        elems = gate.numel()
    elif op == "cross_entropy":
        h = rand(p["tokens"], p["d"]).requires_grad_()
        w = (torch.randn(p["vocab"], p["d"], generator=g, device=DEVICE) / p["d"] ** 0.5).to(DTYPE)
        labels = torch.randint(0, p["vocab"], (p["tokens"],), generator=g, device=DEVICE)
        if impl == "ours":
            call = (lambda: linear_cross_entropy(h, w, labels))
        elif impl == "torch":  # fp32 logits for the whole batch
            call = (lambda: linear_cross_entropy_ref(h, w, labels))
        else:  # "hf": logits in the model dtype, upcast by F.cross_entropy's caller
            call = (lambda: F.cross_entropy((h @ w.T).float(), labels, reduction="none"))
        leaves = [h]
        flops = 2 * p["tokens"] * p["d"] * p["vocab"] * 3  # logits, and dh (ours recomputes: +1 GEMM, not counted)
        bytes_ = (p["vocab"] * p["d"] + 2 * p["tokens"] * p["d"]) * e
        dy = torch.randn(p["tokens"], device=DEVICE)
        return (lambda: torch.autograd.grad(call(), leaves, dy)), bytes_, flops
    else:
        raise ValueError(op)
    bytes_ = n_io * elems * e
    if not bwd:
        return (lambda: call()), bytes_, 0
    dy = rand(*call().shape)
    return (lambda: torch.autograd.grad(call(), leaves, dy)), bytes_, 0


@pytest.mark.parametrize("impl", ("ours", "torch", "hf"))
@pytest.mark.parametrize("op,case,params", FUSED_CASES, ids=[c[1] for c in FUSED_CASES])
def test_fused(benchmark, suite, op: str, case: str, params: dict, impl: str):
    if impl == "hf" and op != "cross_entropy":
        pytest.skip("the Hugging Face way is the reference itself for this op")
    fn, bytes_, flops = _fused_impl(op, params, impl)
    _run(benchmark, suite, op, case, impl, fn, bytes_, flops, params)


# ---- report -------------------------------------------------------------------------------------


def _report(config: pytest.Config, suite: _Suite) -> None:
    if not suite.rows:
        return
    dev = torch.cuda.get_device_name() if CUDA else "cpu"
    lines = [
        "",
        f"kernel bench on {dev} ({DTYPE}); rooflines measured here: copy {suite.bandwidth / 1e9:.0f} GB/s, "
        f"GEMM {suite.gemm / 1e12:.1f} TFLOP/s" + ("" if CUDA else "  [CPU: 'ours' is the torch reference]"),
        f"{'case':<34} {'impl':<13} {'time us':>10} {'GB/s':>9} {'TFLOP/s':>8} {'roofline':>9} {'ours x':>7}",
    ]
    ours = {r["case"]: r["time_us"] for r in suite.rows if r["impl"] == "ours"}
    for r in suite.rows:
        speedup = r["time_us"] / ours[r["case"]] if r["case"] in ours else None
        r["ours_speedup"] = speedup
        lines.append(
            f"{r['case']:<34} {r['impl']:<13} {r['time_us']:>10.1f} {r['gb_per_s']:>9.1f} {r['tflop_per_s']:>8.2f} "
            f"{100 * r['roofline_fraction']:>8.1f}% {'-' if speedup is None else f'{speedup:.2f}':>7}"
        )
    if CUDA:
        lines += _targets(suite)
        lines.append(f"saved {_save(suite, dev)}")
    # Module teardown runs under output capture; print past it, as capsys.disabled() does.
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


def _targets(suite: _Suite) -> list[str]:
    """The issue's GPU targets, met or missed, from the measured rows."""
    by = {(r["case"], r["impl"]): r for r in suite.rows}
    out = ["targets:"]
    for (case, impl), r in by.items():
        if impl != "ours" or r["op"] != "multi_lora":
            continue
        if case.startswith("decode."):
            frac = r["gb_per_s"] * 1e9 / suite.bandwidth
            out.append(f"  {case}: {100 * frac:.0f}% of copy bandwidth (target >= 70%)")
        if case.startswith("train_"):
            base = by.get((case, "base_gemm"))
            if base:
                out.append(f"  {case}: LoRA fwd+bwd adds {100 * r['time_us'] / base['time_us']:.0f}% of the base "
                           f"GEMMs (target <= 15%)")
        for alt, want in (("dense_einsum", 5.0), ("gather_bmm", 2.0)):
            a = by.get((case, alt))
            if a:
                out.append(f"  {case}: {a['time_us'] / r['time_us']:.1f}x faster than {alt} (target >= {want:.0f}x)")
    return out


def _save(suite: _Suite, dev: str) -> Path:
    """Merge this run under ``"kernels"`` into benches/results/<device>.json."""
    return save_results(dev, "kernels", {
        "triton": _triton_version(),
        "dtype": str(DTYPE),
        "copy_gb_per_s": suite.bandwidth / 1e9,
        "gemm_tflop_per_s": suite.gemm / 1e12,
        "rows": suite.rows,
    })


def _triton_version() -> str:
    import triton

    return triton.__version__


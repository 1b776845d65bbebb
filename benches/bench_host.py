"""Host (Python) time of one adapted linear's multi-LoRA call on the Triton path, kernels stubbed out.

Run: ``pytest benches/bench_host.py -s`` (no GPU needed: only host work is timed). Every kernel
launch is replaced by a call that does nothing, so what remains is exactly the Python and torch
host work around the launches: dispatch, input checks, the cached routing lookup, the output and
intermediate allocations and the launchers' argument lists. The GPU work of the op at these shapes
is ~5-17 us of HBM time, so host time above that leaves the GPU idle between launches.

Implementations, side by side in one run:

- ``today``: ``kernels/multi_lora.py`` and ``kernels/backend.py`` as of commit ``BASELINE``
  (before the routes moved to the device), read with ``git show`` and imported from a temp copy;
  skipped with a message where git or that commit is not available;
- ``ours``: the working tree's ``dit_kernels.multi_lora``, the same call (a new delta tensor);
- ``ours_out``: what the model's adapted linear now calls, ``multi_lora_sum(x, slots, out=y)``: the
  expand adds into the base output in place. Today the model also ran ``y + delta`` per linear
  (one more op dispatched and launched), so comparing it with ``today`` understates the gain.

Cases: decode, 256 sequences of one token, per-sequence adapters (``i % n``) of rank 16 out of 64
or 256 stacked, d 2560 -> 2560 in bf16 (the sizes only matter through allocations); ``diff`` = one
slot, ``diff+dit`` = a second slot with one shared rank-16 adapter (DIT interpretation). Both build
their routing once before timing (as the model does once per batch), then time steady-state
calls under ``torch.no_grad()`` (decode). "us/linear" = median host microseconds per call, i.e.
per adapted linear per forward (target <= 10); "today x" = today's time / this row's. The load average is
printed because the machine's other work shows up in host timings. Nothing is saved:
``benches/results/`` holds GPU figures only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dit_kernels import multi_lora as ours_module

BASELINE = "824cf3526b1d28610340e84bd8d3bc9f5320e089"
REPO = Path(__file__).resolve().parent.parent
TOKENS, RANK, D, DTYPE = 256, 16, 2560, torch.bfloat16
TARGET_US = 10.0
ROUNDS, ITERATIONS = 15, 200


@dataclasses.dataclass(frozen=True)
class _Case:
    n_adapters: int
    dit: bool  # a second, shared slot

    @property
    def name(self) -> str:
        return f"decode.{TOKENS}tok.{self.n_adapters}ad.r{RANK}." + ("diff+dit" if self.dit else "diff")


CASES = [_Case(n, dit) for n in (64, 256) for dit in (False, True)]
IMPLS = ["today", "ours", "ours_out"]


def _baseline_module(root: Path):
    """Today's multi_lora (and the backend it imports) from git, as package ``dit_kernels_today``
    written under ``root``."""
    files = {}
    for name in ("backend.py", "multi_lora.py"):
        try:
            files[name] = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE}:kernels/{name}"],
                                         check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"baseline {BASELINE[:10]} not readable with git here: {e}")
    pkg = root / "dit_kernels_today"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(text)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("dit_kernels_today.multi_lora")
    finally:
        sys.path.remove(str(root))


class _NoLaunch:
    """Stands in for ``kernel[grid](*args)``: takes the launch's arguments and runs nothing."""

    def __getitem__(self, grid):
        return _no_launch


def _no_launch(*args, **kwargs):
    return None


_STUB = _NoLaunch()


@contextlib.contextmanager
def _launches_stubbed(module):
    backend = module._backend
    real = backend.on_device
    backend.on_device = lambda kernel, device: _STUB
    try:
        yield
    finally:
        backend.on_device = real


def _call(module, case: _Case, into: bool = False):
    """A zero-argument steady-state call of ``module.multi_lora_sum`` for the case (routing warm);
    ``into``: adding into a base output (``out=``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, D, generator=g).to(DTYPE)
    base = torch.zeros(TOKENS, D, dtype=DTYPE)

    def slot(n: int, index: torch.Tensor):
        A = (torch.randn(n, RANK, D, generator=g) / D**0.5).to(DTYPE)
        B = (torch.randn(n, D, RANK, generator=g) / RANK**0.5).to(DTYPE)
        return A, B, torch.full((n,), 1.0 / RANK), module.RowRouting(index, n)

    slots = [slot(case.n_adapters, torch.arange(TOKENS) % case.n_adapters)]
    if case.dit:
        slots.append(slot(1, torch.zeros(TOKENS, dtype=torch.int64)))

    def call():
        if into:
            return module.multi_lora_sum(x, slots, backend="triton", out=base)
        return module.multi_lora_sum(x, slots, backend="triton")

    with torch.no_grad():
        call()  # builds the routes, as the batch's first forward does
    return call


@dataclasses.dataclass
class _Suite:
    modules: dict = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)
    root: Path | None = None  # where today's module is written


@pytest.fixture(scope="module")
def suite(request):
    s = _Suite()
    with tempfile.TemporaryDirectory(prefix="bench_host_") as root:
        s.root = Path(root)
        yield s
    _report(request.config, s)


def _module(suite: _Suite, impl: str):
    if impl not in suite.modules:
        suite.modules[impl] = ours_module if impl.startswith("ours") else _baseline_module(suite.root)
    return suite.modules[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_host_overhead(benchmark, suite, case: _Case, impl: str):
    module = _module(suite, impl)
    with _launches_stubbed(module), torch.no_grad():
        call = _call(module, case, into=impl == "ours_out")

        def round_():
            for _ in range(ITERATIONS):
                call()

        benchmark.pedantic(round_, rounds=ROUNDS, iterations=1, warmup_rounds=2)
        if benchmark.stats is not None:
            seconds = benchmark.stats.stats.median / ITERATIONS
        else:  # --benchmark-disable: time it here so the table stays complete
            times = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                round_()
                times.append(time.perf_counter() - t0)
            seconds = sorted(times)[len(times) // 2] / ITERATIONS
    row = {"case": case.name, "impl": impl, "us_per_linear": seconds * 1e6, "load_avg": os.getloadavg()[0]}
    benchmark.extra_info.update(row)
    suite.rows.append(row)


def _report(config, suite: _Suite) -> None:
    if not suite.rows:
        return
    load = os.getloadavg()
    lines = [
        "",
        f"host time per adapted linear, kernel launches stubbed (torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; baseline {BASELINE[:10]})",
        f"{'case':<34} {'impl':<8} {'us/linear':>10} {'today x':>8} {'target':>7}",
    ]
    today = {r["case"]: r["us_per_linear"] for r in suite.rows if r["impl"] == "today"}
    for r in suite.rows:
        ratio = today[r["case"]] / r["us_per_linear"] if r["case"] in today else None
        met = "met" if r["us_per_linear"] <= TARGET_US else "missed"
        lines.append(f"{r['case']:<34} {r['impl']:<8} {r['us_per_linear']:>10.2f} "
                     f"{'-' if ratio is None else f'{ratio:.2f}':>8} {met if r['impl'] != 'today' else '':>7}")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(lines), flush=True)

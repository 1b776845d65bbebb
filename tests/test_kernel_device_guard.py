"""Every kernel launch runs with the device of its own tensors made current (Triton launches on the
current CUDA device, so ``cuda:1`` tensors launched from device 0 would be read at illegal addresses).

On CPU the guard is a no-op, so the check records instead: each launch through ``on_device`` notes
which guard it happened inside, and every ``@triton.jit`` kernel of the package must be launched
inside a guard for one of the tensors it is given.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import types

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import dit_kernels as kernels_pkg
from dit_kernels import backend
from dit_kernels.cross_entropy import linear_cross_entropy, linear_kl_to_teacher
from dit_kernels.multi_lora import build_lora_meta, multi_lora_sum
from dit_kernels.rms_norm import rms_norm
from dit_kernels.rope import apply_rope
from dit_kernels.swiglu import swiglu


def _package_kernels() -> set[str]:
    """Names of the ``@triton.jit`` functions defined in the kernel modules (either import mode)."""
    names = set()
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and obj.fn.__module__ == module.__name__:
                names.add(obj.fn.__name__)
    return names


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, the tensor of the innermost guard or None, the launch's tensor arguments)."""
    record: list = []
    guards: list = []
    real_guard, real_on_device = backend.device_guard, backend.on_device

    @contextlib.contextmanager
    def recording_guard(tensor):
        guards.append(tensor)
        try:
            with real_guard(tensor):
                yield
        finally:
            guards.pop()

    class RecordingLaunch:
        def __init__(self, kernel, device):
            self.name = kernel.fn.__name__
            self.real = real_on_device(kernel, device)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
                record.append((self.name, guards[-1] if guards else None, tensors))
                return self.real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(backend, "device_guard", recording_guard)
    monkeypatch.setattr(backend, "on_device", RecordingLaunch)
    return record


def _run_every_op():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=g, requires_grad=True)
    slots = []
    for n, r in ((3, 4), (1, 8)):
        A = torch.randn(n, r, 32, generator=g, requires_grad=True)
        B = torch.randn(n, 16, r, generator=g, requires_grad=True)
        slots.append((A, B, torch.ones(n), build_lora_meta(torch.randint(-1, n, (20,), generator=g))))
    y = multi_lora_sum(x, slots, backend="triton")
    torch.autograd.grad(y.sum(), [x] + [w for A, B, _, _ in slots for w in (A, B)])

    w = torch.rand(32, requires_grad=True)
    torch.autograd.grad(rms_norm(x, w, 1e-6, backend="triton").sum(), (x, w))
    q = torch.randn(1, 2, 3, 8, generator=g, requires_grad=True)
    cos = torch.randn(1, 3, 8, generator=g)
    torch.autograd.grad(apply_rope(q, cos, cos, backend="triton").sum(), q)
    torch.autograd.grad(swiglu(x, x.detach(), backend="triton").sum(), x)
    lm = torch.randn(40, 32, generator=g)
    labels = torch.randint(0, 40, (20,), generator=g)
    torch.autograd.grad(linear_cross_entropy(x, lm, labels, chunk_size=8, backend="triton").sum(), x)
    torch.autograd.grad(linear_kl_to_teacher(x, x.detach() + 1, lm, chunk_size=8, backend="triton").sum(), x)


def test_every_launch_is_inside_a_guard_for_its_own_tensors(launches):
    _run_every_op()
    assert {name for name, _, _ in launches} == _package_kernels()
    unguarded = sorted({name for name, guard, _ in launches if guard is None})
    assert not unguarded, f"launched without a device guard: {unguarded}"
    foreign = sorted({name for name, guard, tensors in launches if guard is not None
                      and not any(guard is t for t in tensors)})  # fmt: skip
    assert not foreign, f"guarded by a tensor the kernel is not given: {foreign}"


def test_guard_makes_a_cuda_tensors_device_current_and_leaves_cpu_alone(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # only .device is read
    with backend.device_guard(on_gpu1):
        pass
    with backend.device_guard(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_the_first_is_current():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(7, 300, generator=g), torch.rand(300, generator=g)
    torch.cuda.set_device(0)
    y = rms_norm(x.to("cuda:1"), w.to("cuda:1"), 1e-6, backend="triton")
    torch.cuda.synchronize(1)
    assert y.device == torch.device("cuda", 1)
    assert torch.allclose(y.cpu(), rms_norm(x, w, 1e-6, backend="torch"), rtol=1e-5, atol=1e-6)

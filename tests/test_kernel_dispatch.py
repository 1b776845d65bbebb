"""Which path runs: DIT_KERNELS, the backend argument, and interpreted launches on CPU."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.jit import JITFunction

from dit_kernels import _dispatch
from dit_kernels import rms_norm as rms_mod
from dit_kernels.rms_norm import rms_norm


def test_env_and_argument_choose_the_path(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("DIT_KERNELS", raising=False)
    assert not _dispatch.use_triton(cpu)  # auto: CPU tensors take the reference
    monkeypatch.setenv("DIT_KERNELS", "triton")
    assert _dispatch.use_triton(cpu)
    assert not _dispatch.use_triton(cpu, backend="torch")  # the argument wins
    monkeypatch.setenv("DIT_KERNELS", "torch")
    assert not _dispatch.use_triton(cpu)
    assert _dispatch.use_triton(cpu, backend="triton")
    monkeypatch.setenv("DIT_KERNELS", "gpu")
    with pytest.raises(ValueError, match="environment variable DIT_KERNELS is 'gpu'"):
        _dispatch.use_triton(cpu)


def test_env_forces_triton_through_public_ops(monkeypatch):
    calls = []
    real = rms_mod._rms_norm_fwd
    monkeypatch.setattr(rms_mod, "_rms_norm_fwd", lambda *a: (calls.append(1), real(*a))[1])
    x, w = torch.randn(3, 10), torch.rand(10)
    monkeypatch.setenv("DIT_KERNELS", "triton")
    y = rms_norm(x, w, 1e-6)
    monkeypatch.setenv("DIT_KERNELS", "auto")
    y_ref = rms_norm(x, w, 1e-6)
    assert calls == [1]
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def test_cpu_launch_is_interpreted_cuda_launch_is_compiled():
    kernel = rms_mod._rms_norm_fwd_kernel
    assert _dispatch.on_device(kernel, torch.device("cuda")) is kernel
    on_cpu = _dispatch.on_device(kernel, torch.device("cpu"))
    if isinstance(kernel, JITFunction):
        assert on_cpu is not kernel  # an interpreted twin of the compiled-mode kernel
    else:
        assert on_cpu is kernel  # imported under TRITON_INTERPRET=1: already interpreted
    assert _dispatch.interpreted(torch.device("cpu"))


def test_poisoned_buffers_are_nan_only_when_asked(monkeypatch):
    monkeypatch.delenv("DIT_KERNELS_POISON", raising=False)
    monkeypatch.setenv("DIT_KERNELS_POISON", "1")
    assert torch.isnan(_dispatch.empty((3,), torch.float32, torch.device("cpu"))).all()
    assert torch.isnan(_dispatch.empty_like(torch.zeros(2, 2).T)).all()
    assert _dispatch.empty((2,), torch.int64, torch.device("cpu")).dtype == torch.int64

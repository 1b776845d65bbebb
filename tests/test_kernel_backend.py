"""Which path runs: DIT_KERNELS, the backend argument, and interpreted launches on CPU."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from dit_kernels import backend
from dit_kernels import rms_norm as rms_mod
from dit_kernels.rms_norm import rms_norm


def test_env_and_argument_choose_the_path(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("DIT_KERNELS", raising=False)
    assert not backend.use_triton(cpu)  # auto: CPU tensors take the reference
    monkeypatch.setenv("DIT_KERNELS", "triton")
    assert backend.use_triton(cpu)
    assert not backend.use_triton(cpu, backend="torch")  # the argument wins
    monkeypatch.setenv("DIT_KERNELS", "torch")
    assert not backend.use_triton(cpu)
    assert backend.use_triton(cpu, backend="triton")
    monkeypatch.setenv("DIT_KERNELS", "gpu")
    with pytest.raises(ValueError, match="environment variable DIT_KERNELS is 'gpu'"):
        backend.use_triton(cpu)


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
    on_cpu = backend.on_device(kernel, torch.device("cpu"))
    assert isinstance(on_cpu, backend._InterpretedKernel)
    if isinstance(kernel, JITFunction):
        assert backend.on_device(kernel, torch.device("cuda")) is kernel
        assert on_cpu._fn is not kernel  # an interpreted twin of the compiled-mode kernel
    else:
        assert on_cpu._fn is kernel  # imported under TRITON_INTERPRET=1: already interpreted
    assert backend.interpreted(torch.device("cpu"))


@triton.jit
def _strided_partial_sums_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # Loop bounds from program_id, num_programs and an int argument: scalars at run time.
    i_p = tl.program_id(0)
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(i_p * BLOCK, N, tl.num_programs(0) * BLOCK):
        o = start + tl.arange(0, BLOCK)
        b_acc += tl.load(x_ptr + o, mask=o < N, other=0.0)
    tl.store(out_ptr + i_p, tl.sum(b_acc, axis=0))


def test_interpreter_takes_run_time_loop_bounds():
    # Up to Triton 3.6 the interpreter turns a loop bound into an int with int(one-element array),
    # which numpy >= 2.4 refuses; the launch must give it a conversion that works.
    x = torch.arange(23, dtype=torch.float32)
    out = torch.empty(3)
    backend.on_device(_strided_partial_sums_kernel, x.device)[(3,)](x, out, x.numel(), BLOCK=4)
    want = torch.stack([x[torch.arange(23) // 4 % 3 == p].sum() for p in range(3)])
    assert torch.equal(out, want)


def test_loop_bound_conversion_refuses_blocks_and_is_undone():
    import numpy as np
    from triton.runtime import interpreter

    block = tl.core.tensor(interpreter.TensorHandle(np.arange(2, dtype=np.int32), tl.int32),
                           tl.block_type(tl.int32, [2]))
    with pytest.raises(TypeError, match="cannot be used as an index"):
        backend._scalar_index(block)
    before = interpreter._patch_lang
    with backend._scalar_loop_bounds():
        assert interpreter._patch_lang is not before
    assert interpreter._patch_lang is before


def test_poisoned_buffers_are_nan_only_when_asked(monkeypatch):
    monkeypatch.delenv("DIT_KERNELS_POISON", raising=False)
    monkeypatch.setenv("DIT_KERNELS_POISON", "1")
    assert torch.isnan(backend.empty((3,), torch.float32, torch.device("cpu"))).all()
    assert torch.isnan(backend.empty_like(torch.zeros(2, 2).T)).all()
    assert backend.empty((2,), torch.int64, torch.device("cpu")).dtype == torch.int64


def test_an_interpreted_launch_leaves_triton_language_as_it_was():
    """The interpreter patches tl.core's builtins for a launch; left in place, a kernel compiled
    later in the same process traces through interpreter objects and fails to compile."""
    import triton.language as tl

    spaces = (tl, tl.core, tl.math, tl.core.tensor)
    before = [dict(vars(s)) for s in spaces]
    rms_norm(torch.randn(4, 16), torch.ones(16), 1e-5, backend="triton")
    for space, snap in zip(spaces, before):
        now = vars(space)
        assert set(now) == set(snap), space
        assert [k for k in snap if now[k] is not snap[k]] == [], space

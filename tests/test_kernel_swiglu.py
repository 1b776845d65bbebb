"""SwiGLU Triton kernel (interpreted on CPU) against fp64, forward and both gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err as _rel

from dit_kernels.swiglu import swiglu, swiglu_ref

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("kernel_poison")




def _oracle(gate, up):
    gd = gate.double()
    return gd * torch.sigmoid(gd) * up.double()


@pytest.mark.parametrize(
    "shape,dtype", [((63, 123), torch.float32), ((2, 5, 577), torch.bfloat16), ((7, 1500), torch.float16)]
)
def test_forward_and_grads_match_fp64(shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate = (4 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    y = swiglu(gate, up, backend="triton")
    want = _oracle(gate, up)
    assert y.dtype == dtype and _rel(y, want) < TOL[dtype]
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (gate, up), dy.to(dtype))
    ref = torch.autograd.grad(want, (gate, up), dy)
    for a, b in zip(got, ref):
        assert a.dtype == dtype and _rel(a, b) < TOL[dtype]


def test_halves_of_a_fused_projection_and_broadcast_grad():
    """gate/up as the two halves of one [rows, 2f] output (row stride 2f); dy with stride 0."""
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(3, 11, 2 * 45, generator=g, requires_grad=True)
    gate, up = fused.chunk(2, -1)
    y = swiglu(gate, up, backend="triton")
    want = _oracle(gate, up)
    assert _rel(y, want) < 1e-5
    (got,) = torch.autograd.grad(y.sum(), fused)
    (ref,) = torch.autograd.grad(want.sum(), fused)
    assert _rel(got, ref) < 1e-5


def test_cpu_default_and_shape_errors():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(swiglu(a, b), swiglu_ref(a, b))
    with pytest.raises(ValueError, match="same shape"):
        swiglu(a, b[:, :5], backend="triton")

"""RMSNorm Triton kernels (interpreted on CPU) against fp64, forward and both gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err as _rel

from dit_kernels.rms_norm import rms_norm, rms_norm_ref

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("kernel_poison")




def _oracle(x, w, eps):
    """fp64 RMSNorm (no intermediate rounding)."""
    xd = x.double()
    return w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize(
    "shape,dtype,w_dtype",
    [
        ((63, 123), torch.float32, torch.float32),
        ((3, 7, 577), torch.bfloat16, torch.bfloat16),
        ((5, 123), torch.float16, torch.float16),
        ((9, 63), torch.bfloat16, torch.float32),  # fp32 weight on bf16 activations: fp32 output
    ],
    ids=["fp32", "bf16-3d", "fp16", "bf16-x-fp32-w"],
)
def test_forward_and_grads_match_fp64(shape, dtype, w_dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(w_dtype).requires_grad_()
    y = rms_norm(x, w, 1e-6, backend="triton")
    want = _oracle(x, w, 1e-6)
    assert y.dtype == torch.promote_types(dtype, w_dtype) and y.shape == x.shape
    assert _rel(y, want) < TOL[dtype]
    if dtype != torch.bfloat16:
        # Same rounding points as the Hugging Face reference in the same dtype. (Not for bf16 here:
        # Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.)
        assert _rel(y, rms_norm_ref(x, w, 1e-6)) < TOL[dtype] / 4
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    ref = torch.autograd.grad(want, (x, w), dy)
    for a, b, leaf in zip(got, ref, (x, w)):
        assert a.dtype == leaf.dtype and not torch.isnan(a).any()
        assert _rel(a, b) < TOL[dtype]


def test_frozen_weight_gets_no_grad_and_eps_matters():
    g = torch.Generator().manual_seed(1)
    x = (1e-3 * torch.randn(4, 33, generator=g)).requires_grad_()
    w = torch.rand(33, generator=g) + 0.5
    for eps in (1e-6, 1e-2):
        y = rms_norm(x, w, eps, backend="triton")
        assert _rel(y, _oracle(x, w, eps)) < 1e-5
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    assert _rel(gx, torch.autograd.grad(_oracle(x, w, 1e-2).sum(), (x,))[0]) < 1e-5


def test_cpu_default_is_reference_and_errors_are_clear():
    x, w = torch.randn(3, 8), torch.rand(8)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.rand(7), 1e-5, backend="triton")
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(x.T, torch.rand(3), 1e-5, backend="triton")

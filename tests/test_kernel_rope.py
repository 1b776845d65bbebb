"""RoPE Triton kernel (interpreted on CPU) against fp64, forward and the gradient of x."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err as _rel

from dit_kernels.rope import apply_rope, apply_rope_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("kernel_poison")




def _tables(B, T, hd, g, hf_style):
    """HF tables repeat the angles over both halves; independent halves check each half is read."""
    if hf_style:
        pos = torch.arange(T, dtype=torch.float64)[None, :].expand(B, T) + torch.randint(0, 50, (B, 1), generator=g)
        inv = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos[..., None] * inv
        emb = torch.cat([ang, ang], -1)
    else:
        emb = torch.randn(B, T, hd, generator=g, dtype=torch.float64)
    return emb.cos().float(), emb.sin().float()


def _oracle(x, cos, sin):
    xd, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-xd[..., half:], xd[..., :half]), -1)
    return xd * c + rotated * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hf_style", [True, False], ids=["hf-tables", "free-tables"])
def test_forward_and_grad_match_fp64_on_transposed_view(dtype, hf_style):
    g = torch.Generator().manual_seed(0)
    B, T, H, hd = 2, 63, 5, 18  # odd T and H, half head 9: masked lanes
    x = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()  # [B, H, T, hd] view
    cos, sin = _tables(B, T, hd, g, hf_style)
    y = apply_rope(x, cos, sin, backend="triton")
    want = _oracle(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype and y.stride() == x.stride()
    assert _rel(y, want) < TOL[dtype]
    dy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, dy.to(dtype))
    (rx,) = torch.autograd.grad(want, x, dy)
    assert gx.dtype == dtype and _rel(gx, rx) < TOL[dtype]


def test_contiguous_input_and_cpu_default():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 7, 8, generator=g)
    cos, sin = _tables(1, 7, 8, g, True)
    assert _rel(apply_rope(x, cos, sin, backend="triton"), _oracle(x, cos, sin)) < 1e-6
    assert torch.equal(apply_rope(x, cos, sin), apply_rope_ref(x, cos, sin))


def test_bad_shapes_are_named():
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"cos must be \[1, 5, 8\]"):
        apply_rope(x, torch.randn(1, 4, 8), torch.randn(1, 5, 8), backend="triton")
    with pytest.raises(ValueError, match="even hd"):
        apply_rope(torch.randn(1, 2, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7), backend="triton")

"""RMSNorm with Hugging Face Llama semantics, forward and backward in one pass over each row.

    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)        statistics in fp32

The output dtype is ``torch.promote_types(x.dtype, weight.dtype)``, as ``weight * h`` gives in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import backend as _backend


def rms_norm(
    x: Tensor,  # [..., d]
    weight: Tensor,  # [d]
    eps: float,
    *,
    backend: str | None = None,
) -> Tensor:  # [..., d]
    """RMSNorm; Triton on CUDA, :func:`rms_norm_ref` on CPU. Differentiable w.r.t. ``x`` and ``weight``."""
    _check(x, weight)
    if not _backend.use_triton(x, backend=backend):
        return rms_norm_ref(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, float(eps))


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain torch, line for line the Hugging Face ``LlamaRMSNorm.forward``."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """With r = rsqrt(mean(x^2) + eps), n = x * r and g = dy * weight (all fp32):

        dx     = r * (g - n * mean(g * n))
        dweight = sum over rows of dy * n.to(x.dtype)     (what autograd of the reference gives)
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1])
        y, rstd = _rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape)
        if dy2.stride(-1) != 1:  # a broadcast upstream grad (y.sum()) has stride 0
            dy2 = dy2.contiguous()
        dx, dw = _rms_norm_bwd(dy2, x2, weight, rstd, need_weight=ctx.needs_input_grad[1])
        return dx.reshape(ctx.x_shape), dw, None


def _rms_norm_fwd(
    x: Tensor,  # [rows, d]
    weight: Tensor,  # [d]
    eps: float,
) -> tuple[Tensor, Tensor]:  # y [rows, d], rstd [rows] fp32
    rows, d = x.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = _backend.empty((rows, d), out_dtype, x.device)
    rstd = _backend.empty((rows,), torch.float32, x.device)
    if rows == 0:
        return y, rstd
    block_d = _backend.next_power_of_2(d)
    kernel = _backend.on_device(_rms_norm_fwd_kernel, x.device)
    with _backend.device_guard(x):
        kernel[(rows,)](
            x, weight, y, rstd, d, x.stride(0), y.stride(0), eps, BLOCK_D=block_d, num_warps=_warps(block_d)
        )
    return y, rstd


def _rms_norm_bwd(
    dy: Tensor,  # [rows, d]
    x: Tensor,  # [rows, d]
    weight: Tensor,  # [d]
    rstd: Tensor,  # [rows] fp32
    need_weight: bool,
) -> tuple[Tensor, Tensor | None]:  # dx [rows, d], dweight [d] or None
    rows, d = x.shape
    dx = _backend.empty((rows, d), x.dtype, x.device)
    # Each program walks rows i, i + G, ... and keeps its own fp32 partial dweight; torch sums the G.
    n_prog = max(1, min(rows, 4 * _backend.num_sms(x.device)))
    partial = _backend.empty((n_prog, d), torch.float32, x.device)
    if rows:
        block_d = _backend.next_power_of_2(d)
        kernel = _backend.on_device(_rms_norm_bwd_kernel, x.device)
        with _backend.device_guard(x):
            kernel[(n_prog,)](
                dy, x, weight, rstd, dx, partial, rows, d,
                dy.stride(0), x.stride(0), dx.stride(0), partial.stride(0),
                NEED_WEIGHT=need_weight, BLOCK_D=block_d, num_warps=_warps(block_d),
            )  # fmt: skip
    dw = None
    if need_weight:
        dw = partial.sum(0).to(weight.dtype) if rows else torch.zeros_like(weight)
    return dx, dw


def _warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # [rows, d]
    w_ptr,  # [d]
    y_ptr,  # [rows, d]
    rstd_ptr,  # [rows] fp32
    D,
    stride_x,
    stride_y,
    eps,
    BLOCK_D: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_x = tl.load(x_ptr + i_row * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
    # Round the normalized row to x's dtype before the weight, as the reference does.
    b_n = (b_x * b_rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(y_ptr + i_row * stride_y + o_d, (b_n * b_w).to(y_ptr.dtype.element_ty), mask=m_d)
    tl.store(rstd_ptr + i_row, b_rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # [rows, d]
    x_ptr,  # [rows, d]
    w_ptr,  # [d]
    rstd_ptr,  # [rows] fp32
    dx_ptr,  # [rows, d]
    dw_ptr,  # [programs, d] fp32 partial sums
    ROWS,
    D,
    stride_dy,
    stride_x,
    stride_dx,
    stride_dw,
    NEED_WEIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_row in range(i_p, ROWS, n_prog):
        i_row64 = tl.cast(i_row, tl.int64)
        b_x = tl.load(x_ptr + i_row64 * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_dy = tl.load(dy_ptr + i_row64 * stride_dy + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_rstd = tl.load(rstd_ptr + i_row64)
        b_n = b_x * b_rstd
        b_g = b_dy * b_w
        b_dx = b_rstd * (b_g - b_n * (tl.sum(b_g * b_n, axis=0) / D))
        tl.store(dx_ptr + i_row64 * stride_dx + o_d, b_dx.to(dx_ptr.dtype.element_ty), mask=m_d)
        if NEED_WEIGHT:
            b_dw += b_dy * b_n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_ptr + i_p * stride_dw + o_d, b_dw, mask=m_d)


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1] if x.dim() else '?'}] for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if x.stride(-1) != 1 and x.numel():
        raise ValueError(f"rms_norm: x must have unit stride on its last dim, got strides {x.stride()}")

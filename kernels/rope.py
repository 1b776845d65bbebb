"""Rotary position embedding, Hugging Face ``rotate_half`` convention, one pass over q or k.

    out = x * cos + rotate_half(x) * sin,      rotate_half([x1, x2]) = [-x2, x1]

with ``cos``/``sin`` already gathered per position (``[B, T, hd]``, shared by every head). Computed in
fp32 and rounded once to x's dtype. ``x`` may be a strided view (``q.transpose(1, 2)``); the output
keeps its layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import backend as _backend


def apply_rope(
    x: Tensor,  # [B, H, T, hd]
    cos: Tensor,  # [B, T, hd]
    sin: Tensor,  # [B, T, hd]
    *,
    backend: str | None = None,
) -> Tensor:  # [B, H, T, hd]
    """RoPE; Triton on CUDA, :func:`apply_rope_ref` on CPU. Differentiable w.r.t. ``x`` only (cos/sin
    are position tables: if they require grad, the reference path runs so autograd sees them)."""
    _check(x, cos, sin)
    if not _backend.use_triton(x, backend=backend) or cos.requires_grad or sin.requires_grad:
        return apply_rope_ref(x, cos, sin)
    return _RopeFunction.apply(x, cos, sin)


def apply_rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate_half convention: the two halves of each head dimension form the rotated pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class _RopeFunction(torch.autograd.Function):
    """Per head, with halves x = [x1, x2], cos = [c1, c2], sin = [s1, s2]:

        out1 = x1 * c1 - x2 * s1           dx1 = dy1 * c1 + dy2 * s2
        out2 = x2 * c2 + x1 * s2           dx2 = dy2 * c2 - dy1 * s1

    (the backward is the transposed rotation, the same kernel with the signs of sin flipped).
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope(dy, cos, sin, backward=True), None, None


def _rope(
    x: Tensor,  # [B, H, T, hd]
    cos: Tensor,  # [B, T, hd]
    sin: Tensor,  # [B, T, hd]
    backward: bool,
) -> Tensor:  # [B, H, T, hd], x's layout
    B, H, T, hd = x.shape
    out = _backend.empty_like(x)
    if out.numel() == 0:
        return out
    block_h = min(_backend.next_power_of_2(H), 16)
    kernel = _backend.on_device(_rope_kernel, x.device)
    with _backend.device_guard(x):
        kernel[(B * T, _backend.cdiv(H, block_h))](
            x, cos, sin, out, H, T, hd // 2,
            *x.stride(), *out.stride(), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=_backend.next_power_of_2(hd // 2),
        )  # fmt: skip
    return out


@triton.jit
def _rope_kernel(
    x_ptr,  # [B, H, T, hd]
    cos_ptr,  # [B, T, hd]
    sin_ptr,  # [B, T, hd]
    out_ptr,  # [B, H, T, hd]
    H,
    T,
    HALF,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_xd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_cb,
    stride_ct,
    stride_sb,
    stride_st,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    i_bt = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = i_bt // T
    i_t = i_bt % T
    o_d = tl.arange(0, BLOCK_HALF)
    m_d = o_d < HALF
    p_c = cos_ptr + i_b * stride_cb + i_t * stride_ct + o_d
    p_s = sin_ptr + i_b * stride_sb + i_t * stride_st + o_d
    b_c1 = tl.load(p_c, mask=m_d, other=0.0).to(tl.float32)[None, :]
    b_c2 = tl.load(p_c + HALF, mask=m_d, other=0.0).to(tl.float32)[None, :]
    b_s1 = tl.load(p_s, mask=m_d, other=0.0).to(tl.float32)[None, :]
    b_s2 = tl.load(p_s + HALF, mask=m_d, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        # Transposed rotation: the sin of each half moves to the other half, with the sign flipped.
        b_s1, b_s2 = -b_s2, -b_s1

    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (o_h < H)[:, None] & m_d[None, :]
    p_x = x_ptr + i_b * stride_xb + i_t * stride_xt + o_h[:, None] * stride_xh + o_d[None, :] * stride_xd
    b_x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x + HALF * stride_xd, mask=m, other=0.0).to(tl.float32)
    p_o = out_ptr + i_b * stride_ob + i_t * stride_ot + o_h[:, None] * stride_oh + o_d[None, :] * stride_od
    tl.store(p_o, (b_x1 * b_c1 - b_x2 * b_s1).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(p_o + HALF * stride_od, (b_x2 * b_c2 + b_x1 * b_s2).to(out_ptr.dtype.element_ty), mask=m)


def _check(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [B, H, T, hd] with even hd, got {tuple(x.shape)}")
    B, _, T, hd = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (B, T, hd):
            raise ValueError(f"apply_rope: {name} must be [{B}, {T}, {hd}] for x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.numel():
            raise ValueError(f"apply_rope: {name} must have unit stride on its last dim, got {t.stride()}")

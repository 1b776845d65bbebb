"""SwiGLU gate of the Llama MLP, forward and backward fused over elements: ``silu(gate) * up``.

Computed in fp32 and rounded once to the inputs' dtype. ``gate`` and ``up`` may be strided views
along the row dimension (two halves of one fused ``gate_up`` projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import backend as _backend


def swiglu(
    gate: Tensor,  # [..., f]
    up: Tensor,  # [..., f]
    *,
    backend: str | None = None,
) -> Tensor:  # [..., f]
    """``silu(gate) * up``; Triton on CUDA, :func:`swiglu_ref` on CPU. Differentiable w.r.t. both."""
    _check(gate, up)
    if not _backend.use_triton(gate, up, backend=backend):
        return swiglu_ref(gate, up)
    return _SwigluFunction.apply(gate, up)


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


class _SwigluFunction(torch.autograd.Function):
    """With s = sigmoid(gate):  y = gate * s * up,
    d gate = dy * up * s * (1 + gate * (1 - s)),   d up = dy * gate * s."""

    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _rows(gate), _rows(up)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return _swiglu(g2, u2, None)[0].reshape(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = _swiglu(g2, u2, _rows(dy))
        return dg.reshape(ctx.shape), du.reshape(ctx.shape)


def _swiglu(
    gate: Tensor,  # [rows, f]
    up: Tensor,  # [rows, f]
    dy: Tensor | None,  # [rows, f] for the backward
) -> tuple[Tensor, ...]:  # (y,) or (d gate, d up), each [rows, f]
    rows, f = gate.shape
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    if dy is None:
        outs = (_backend.empty((rows, f), out_dtype, gate.device),)
    else:
        outs = (_backend.empty((rows, f), gate.dtype, gate.device), _backend.empty((rows, f), up.dtype, up.device))
    if rows * f == 0:
        return outs
    block = min(_backend.next_power_of_2(f), 1024)
    o0, o1 = outs[0], outs[-1]
    kernel = _backend.on_device(_swiglu_kernel, gate.device)
    with _backend.device_guard(gate):
        kernel[(rows, _backend.cdiv(f, block))](
            gate, up, dy if dy is not None else gate, o0, o1, f,
            gate.stride(0), up.stride(0), dy.stride(0) if dy is not None else 0, o0.stride(0), o1.stride(0),
            BACKWARD=dy is not None, BLOCK=block,
        )  # fmt: skip
    return outs


@triton.jit
def _swiglu_kernel(
    g_ptr,  # [rows, f]
    u_ptr,  # [rows, f]
    dy_ptr,  # [rows, f], read only in the backward
    o0_ptr,  # [rows, f]: y, or d gate in the backward
    o1_ptr,  # [rows, f]: d up in the backward
    F,
    stride_g,
    stride_u,
    stride_dy,
    stride_o0,
    stride_o1,
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i_f = tl.program_id(1).to(tl.int64)
    o_f = i_f * BLOCK + tl.arange(0, BLOCK)
    m_f = o_f < F
    b_g = tl.load(g_ptr + i_row * stride_g + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_u = tl.load(u_ptr + i_row * stride_u + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_sig = 1.0 / (1.0 + tl.exp(-b_g))
    b_silu = b_g * b_sig
    if BACKWARD:
        b_dy = tl.load(dy_ptr + i_row * stride_dy + o_f, mask=m_f, other=0.0).to(tl.float32)
        b_dg = b_dy * b_u * b_sig * (1.0 + b_g * (1.0 - b_sig))
        tl.store(o0_ptr + i_row * stride_o0 + o_f, b_dg.to(o0_ptr.dtype.element_ty), mask=m_f)
        tl.store(o1_ptr + i_row * stride_o1 + o_f, (b_dy * b_silu).to(o1_ptr.dtype.element_ty), mask=m_f)
    else:
        tl.store(o0_ptr + i_row * stride_o0 + o_f, (b_silu * b_u).to(o0_ptr.dtype.element_ty), mask=m_f)


def _rows(t: Tensor) -> Tensor:
    """``[..., f] -> [rows, f]`` as a view when the layout allows (unit stride along f), else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"swiglu: gate and up must have the same shape [..., f], got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate on {gate.device}, up on {up.device}")

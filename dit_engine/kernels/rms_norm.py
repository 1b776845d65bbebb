"""RMSNorm (placeholder reference; the kernels owner extends this file with the Triton op)."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:  # x: [..., d], weight: [d]
    return rms_norm_ref(x, weight, eps)


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Llama semantics: normalise in fp32, cast back to the input dtype, then scale."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)

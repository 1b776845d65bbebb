"""SwiGLU (placeholder reference; the kernels owner extends this file with the Triton op)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:  # [..., f] x 2 -> [..., f]
    return swiglu_ref(gate, up)


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up

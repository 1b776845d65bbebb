"""Rotary position embedding (placeholder reference; the kernels owner extends this file)."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x: [B, H, T, hd]; cos, sin: [B, T, hd]
    return apply_rope_ref(x, cos, sin)


def apply_rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate_half convention: the two halves of each head dimension form the rotated pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]

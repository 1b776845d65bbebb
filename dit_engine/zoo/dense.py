"""Dense diffs (finetuned minus base weights) compressed to a rank-r LoRA by truncated SVD."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..config import TARGET_MODULES, ModelConfig
from .format import Diff, ZooError


def dense_to_lora(
    base_state: Mapping[str, Tensor],
    tuned_state: Mapping[str, Tensor],
    config: ModelConfig,
    rank: int,
    targets: Iterable[str] = TARGET_MODULES,
    *,
    id: str = "dense",
    labels: Mapping[str, Any] | None = None,
    split: str = "train",
    svd_dtype: torch.dtype = torch.float32,
) -> tuple[Diff, dict[str, float]]:
    """Compress ``tuned - base`` on the target linears to a rank-``rank`` LoRA by truncated SVD.

    ``dW = U S Vh`` -> ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``, scale 1 (the best rank-r
    approximation in Frobenius norm, factors balanced). Returns the diff and, per module, the
    captured energy ``sum(S_r^2) / sum(S^2)`` (1.0 for an unchanged module). Modules whose
    true rank is below ``rank`` are zero-padded. Changed tensors that a LoRA on the targets cannot
    carry (norms, embeddings, ...) are listed in ``diff.meta["not_captured"]``."""
    if rank < 1:
        raise ZooError(f"dense_to_lora: rank must be >= 1, found {rank}")
    shapes = config.linear_shapes()
    modules = config.module_names(tuple(targets))
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    energy: dict[str, float] = {}
    for m in modules:
        key = f"{m}.weight"
        d_in, d_out = shapes[m.rsplit(".", 1)[1]]
        w = {}
        for which, state in (("base", base_state), ("tuned", tuned_state)):
            if key not in state:
                raise ZooError(f"dense_to_lora: {which} weights have no tensor {key!r}")
            if tuple(state[key].shape) != (d_out, d_in):
                raise ZooError(f"dense_to_lora: {which} {key} has shape {list(state[key].shape)}, "
                               f"expected [{d_out}, {d_in}]")
            w[which] = state[key].detach().to("cpu", svd_dtype)
        delta = w["tuned"] - w["base"]  # [d_out, d_in]
        if not bool(torch.isfinite(delta).all()):
            raise ZooError(f"dense_to_lora: {key} differs by NaN or Inf values")
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, S.shape[0])
        root = S[:k].sqrt()
        a = torch.zeros(rank, d_in, dtype=svd_dtype)
        b = torch.zeros(d_out, rank, dtype=svd_dtype)
        a[:k] = root[:, None] * Vh[:k]
        b[:, :k] = U[:, :k] * root[None, :]
        total = float((S.double() ** 2).sum())
        energy[m] = float((S[:k].double() ** 2).sum()) / total if total > 0 else 1.0
        A[m], B[m] = a, b
    target_keys = {f"{m}.weight" for m in modules}
    not_captured = sorted(
        k for k in base_state.keys() & tuned_state.keys()
        if k not in target_keys and not torch.equal(base_state[k], tuned_state[k])
    )
    meta = {"source": "dense", "rank": rank, "min_energy": min(energy.values()), "not_captured": not_captured}
    diff = Diff(id=id, A=A, B=B, scale=1.0, labels=dict(labels or {}), split=split, meta=meta)
    return diff, energy

"""Many LoRAs in one pass: every token picks its own adapter from a stacked set.

    y[t] = scale[i] * (x[t] @ A[i]^T) @ B[i]^T      with i = token_index[t]  (i = -1: no adapter)

``A: [n, r, d_in]`` (input side), ``B: [n, d_out, r]`` (output side), PEFT's convention. Mixed ranks
are zero-padded to the slot's max rank. The metadata (tokens sorted by adapter, segments) is built
once per batch with :func:`build_lora_meta` and reused by every layer and by the backward pass.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class LoraMeta:
    """Token -> adapter routing for one batch, shared by every layer (vLLM's idea)."""

    token_index: Tensor  # [N] int64, adapter id per token, -1 = none
    sorted_tokens: Tensor  # [N_routed] int64, tokens with an adapter, stably sorted by adapter id
    active: Tensor  # [n_active] int64, adapter ids that occur
    counts: Tensor  # [n_active] int64, tokens per active adapter
    starts: Tensor  # [n_active] int64, segment start of each active adapter in sorted_tokens
    active_list: tuple[int, ...]  # host copies: the CPU path loops without a sync per layer
    counts_list: tuple[int, ...]
    starts_list: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.token_index.shape[0]

    @property
    def num_routed(self) -> int:
        return self.sorted_tokens.shape[0]

    @property
    def max_count(self) -> int:
        return max(self.counts_list, default=0)


def build_lora_meta(token_index: Tensor, n_adapters: int | None = None) -> LoraMeta:
    """Sort tokens by adapter once. ``token_index``: [N] int, -1 for tokens without an adapter."""
    if token_index.dim() != 1:
        raise ValueError(f"token_index must be 1-D [num_tokens], got shape {tuple(token_index.shape)}")
    idx = token_index.to(torch.int64)
    if n_adapters is not None and idx.numel() and int(idx.max()) >= n_adapters:
        raise ValueError(f"token_index refers to adapter {int(idx.max())} but only {n_adapters} are stacked")
    if idx.numel() and int(idx.min()) < -1:
        raise ValueError(f"token_index has {int(idx.min())}; use -1 for 'no adapter'")
    routed = torch.nonzero(idx >= 0).flatten()
    order = torch.argsort(idx[routed], stable=True)
    sorted_tokens = routed[order]
    active, counts = torch.unique_consecutive(idx[sorted_tokens], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return LoraMeta(
        token_index=idx,
        sorted_tokens=sorted_tokens,
        active=active,
        counts=counts,
        starts=starts,
        active_list=tuple(active.tolist()),
        counts_list=tuple(counts.tolist()),
        starts_list=tuple(starts.tolist()),
    )


def multi_lora(
    x: Tensor,  # [N, d_in]
    A: Tensor,  # [n, r, d_in]
    B: Tensor,  # [n, d_out, r]
    scale: Tensor,  # [n] fp32
    meta: LoraMeta,
) -> Tensor:  # [N, d_out], zero for tokens without an adapter
    """The LoRA delta for every token. Dispatches to Triton on CUDA, to :func:`multi_lora_ref` on CPU."""
    return multi_lora_ref(x, A, B, scale, meta)


def multi_lora_ref(
    x: Tensor,  # [N, d_in]
    A: Tensor,  # [n, r, d_in]
    B: Tensor,  # [n, d_out, r]
    scale: Tensor,  # [n]
    meta: LoraMeta,
) -> Tensor:  # [N, d_out]
    """Plain torch, differentiable by autograd; the intermediate ``x @ A^T`` is kept in fp32.

    Few tokens per adapter (decode): gather each token's A and B and use bmm. Many tokens per
    adapter (prefill, training): one GEMM pair per active adapter over its segment.
    """
    _check_shapes(x, A, B, scale, meta)
    n_tok, d_out = x.shape[0], B.shape[1]
    out_dtype = x.dtype
    if meta.num_routed == 0:
        return x.new_zeros(n_tok, d_out)
    if meta.num_routed <= 2 * len(meta.active_list):
        rows = meta.sorted_tokens
        ids = meta.token_index[rows]
        s = torch.bmm(A[ids].float(), x[rows].float().unsqueeze(-1))  # [R, r, 1]
        d = torch.bmm(B[ids].float(), s).squeeze(-1) * scale[ids].float().unsqueeze(-1)  # [R, d_out]
        return x.new_zeros(n_tok, d_out).index_copy(0, rows, d.to(out_dtype))
    parts = []
    for a, st, cnt in zip(meta.active_list, meta.starts_list, meta.counts_list):
        xs = x[meta.sorted_tokens[st : st + cnt]].float()
        parts.append(((xs @ A[a].float().T) @ B[a].float().T) * scale[a].float())
    d = torch.cat(parts, 0).to(out_dtype)
    return x.new_zeros(n_tok, d_out).index_copy(0, meta.sorted_tokens, d)


def _check_shapes(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, meta: LoraMeta) -> None:
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"multi_lora expects x [N, d_in], A [n, r, d_in], B [n, d_out, r]; got "
            f"x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    n, r, d_in = A.shape
    if x.shape[1] != d_in or B.shape[0] != n or B.shape[2] != r:
        raise ValueError(
            f"multi_lora shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)} (expected [n, r, {x.shape[1]}]), "
            f"B {tuple(B.shape)} (expected [{n}, d_out, {r}])"
        )
    if scale.shape != (n,):
        raise ValueError(f"multi_lora: scale must be [{n}], got {tuple(scale.shape)}")
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"multi_lora: metadata is for {meta.num_tokens} tokens, x has {x.shape[0]}")

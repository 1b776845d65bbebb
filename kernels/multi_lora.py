"""Many LoRAs in one pass: every token picks its own adapter from a stacked set.

    y[t] = scale[i] * (x[t] @ A[i]^T) @ B[i]^T      with i = token_index[t]  (i = -1: no adapter)

``A: [n, r, d_in]`` (input side), ``B: [n, d_out, r]`` (output side), PEFT's convention. Mixed ranks
are zero-padded to the slot's max rank. A slot is routed per token (:class:`LoraMeta`, from
:func:`build_lora_meta`) or per sequence (:class:`RowRouting`); either is built once per batch and
reused by every layer, every forward of the batch (each decode step) and the backward pass.

The Triton path (Punica / vLLM's shrink-expand split, one launch each for up to two slots):

- *route*: all tokens stably sorted by their tuple of adapter ids over the slots, cut into tiles of
  ``BLOCK_M`` rows that share one adapter per slot. Prefill and training give long segments and
  full tiles; decode gives one tile per sequence, whose single weight read is the whole cost.
  Built on the device with no host sync into buffers of a host-known capacity (unused tiles are
  empty and skipped), cached on the routing: a decode step launches with no host read at all, so
  it can be captured in a CUDA graph.
- *shrink*: ``S_k = x @ A_k^T`` per tile, every slot from one read of ``x``, kept in fp32 by token id;
  split over ``d_in`` with fp32 atomics when there are too few tiles to fill the GPU.
- *expand*: ``y = sum_k scale_k * S_k @ B_k^T`` per (tile, ``d_out`` block); tiles of tokens without
  any adapter write zeros, so ``y`` needs no memset.
- *backward*: the same two kernels give ``dS_k = scale_k * dy @ B_k`` and ``dx = sum_k dS_k @ A_k``;
  a segmented grouped GEMM reduces ``dA_k``, ``dB_k`` over each adapter's own tokens (chunked, with
  fp32 atomics when an adapter spans several chunks). Frozen slots get no weight gradient.

The plain-torch references (:func:`multi_lora_ref` per token, :func:`multi_lora_rows_ref` per
sequence) are the CPU path and the tests' oracle; a bf16 slot being trained on bf16 activations
takes the per-sequence reference with its product kept in bf16 (``dtype`` of :func:`multi_lora_rows_ref`).

Size: one op in the design's five parts (routing metadata, the shrink / expand / weight-gradient
kernels, their launchers, the autograd Function, the public entry and its references); the three
kernels share one tile routing, so splitting them would spread one schedule over several files.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import backend as _backend


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
    # Kernel schedules (routes, tiles, gradient chunks) built on first use, then reused by every
    # layer and by the backward pass of this batch.
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

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
    *,
    backend: str | None = None,
) -> Tensor:  # [N, d_out], zero for tokens without an adapter
    """The LoRA delta for every token. Triton on CUDA, :func:`multi_lora_ref` on CPU (see ``backend``).

    Differentiable w.r.t. ``x``, ``A`` and ``B``; ``dA``/``dB`` are computed only when they require grad.
    """
    _check_shapes(x, A, B, scale, meta)
    if not _backend.use_triton(x, backend=backend):
        return multi_lora_ref(x, A, B, scale, meta)
    return _multi_lora_triton(x, [(A, B, scale, meta)])


@dataclasses.dataclass
class RowRouting:
    """Per-sequence routing of one batch: every token of row ``b`` uses adapter ``index[b]`` (-1: none).

    Built once per batch and kept for every forward of it (each decode step): the Triton path's
    device-side routes (one per sequence length) and the plain-torch path's per-row weights of
    frozen operands are cached here, so a steady-state decode step does no routing work at all.
    The index range is checked once, here (one host read per batch, never per step).
    """

    index: Tensor  # [batch] int64, -1 = none
    n_adapters: int
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        idx = self.index
        if idx.dim() != 1:
            raise ValueError(f"RowRouting: index must be 1-D [batch], got shape {tuple(idx.shape)}")
        if idx.numel() and bool(((idx < -1) | (idx >= self.n_adapters)).any()):
            raise ValueError(f"RowRouting: index values must lie in [-1, {self.n_adapters - 1}], found "
                             f"[{int(idx.min())}, {int(idx.max())}]")

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    def shared_adapter(self) -> int | None:
        """The adapter every row uses, or None when rows differ (or some have none)."""
        if "shared" not in self.cache:
            idx = self.index
            same = idx.numel() and bool((idx == idx[0]).all()) and int(idx[0]) >= 0
            self.cache["shared"] = int(idx[0]) if same else None
        return self.cache["shared"]


Routing = LoraMeta | RowRouting
Operand = tuple[Tensor, Tensor, Tensor, Routing]  # (A [n, r, d_in], B [n, d_out, r], scale [n], routing)


def multi_lora_sum(
    x: Tensor,  # [N, d_in]; with a RowRouting, N = batch * seq, row-major
    slots: Sequence[Operand],
    *,
    backend: str | None = None,
    out: Tensor | None = None,  # [N, d_out]: the delta is added into it in place (the base output)
) -> Tensor:  # [N, d_out]: the delta, or ``out`` with the delta added
    """Sum of the LoRA deltas of several adapter slots: the one entry the model's linears call.

    Triton on CUDA (two slots share each launch, ``x`` read once); on CPU the plain-torch
    references: :func:`multi_lora_ref` for token-routed slots, and for row-routed slots two GEMMs
    when every row shares one adapter, else each row's A and scaled B gathered (once per batch for
    frozen weights) and two bmm.

    With ``out``, the Triton path's expand adds into it in place when autograd is not recording
    (inference: no delta buffer, no separate add); otherwise the delta is computed as without
    ``out`` and then added into it, ``out.add_(delta)``, the same values as ``out + delta``."""
    if not slots:
        raise ValueError("multi_lora_sum: needs at least one (A, B, scale, routing) slot")
    if out is not None and (out.shape != (x.shape[0], slots[0][1].shape[1]) or out.device != x.device):
        raise ValueError(f"multi_lora_sum: out is {tuple(out.shape)} on {out.device}, expected "
                         f"[{x.shape[0]}, {slots[0][1].shape[1]}] on {x.device}")
    if _backend.use_triton(x, backend=backend):
        return _multi_lora_triton(x, slots, out)
    _check_d_out(slots)
    total = None
    for A, B, scale, routing in slots:
        if isinstance(routing, RowRouting):
            d = multi_lora_rows_ref(x, A, B, scale, routing,
                                    dtype=x.dtype if _lowp_training(x, A, B) else torch.float32)
        else:
            d = multi_lora_ref(x, A, B, scale, routing)
        total = d if total is None else total.add_(d)
    return total if out is None else out.add_(total)


def multi_lora_rows_ref(
    x: Tensor,  # [batch * seq, d_in]
    A: Tensor,  # [n, r, d_in]
    B: Tensor,  # [n, d_out, r]
    scale: Tensor,  # [n]
    routing: RowRouting,
    *,
    dtype: torch.dtype = torch.float32,  # the product's dtype
) -> Tensor:  # [batch * seq, d_out]
    """Plain torch for per-sequence routing, differentiable by autograd, fp32 intermediate.

    A batched matmul whatever the number of adapters (a per-adapter loop of small GEMMs costs far
    more in op overhead on a CPU); one shared adapter is two plain GEMMs.

    ``dtype=x.dtype`` for a bf16 slot being trained on bf16 activations (:func:`_lowp_training`):
    the bmm on bf16 operands (fp32 accumulation inside, the intermediate rounded to bf16 as every
    other activation of a bf16 model is) with no dtype conversion of ``x``, the factors or the
    gradients. On the CPU this halves the LoRA's cost in a bf16 training step (measured at rank 4,
    16 rows of 80 tokens: +1.5 vs +3.7 ms over a 576x576 base linear, forward and backward, 2 threads)."""
    if routing.batch == 0 or x.shape[0] % routing.batch:
        raise ValueError(f"multi_lora: {x.shape[0]} tokens do not split into the {routing.batch} routed rows")
    _check_shapes(x, A, B, scale, x.shape[0])
    at, bt = _row_weights(A, B, scale, routing, dtype)
    xr = x.view(routing.batch, -1, x.shape[-1]).to(dtype)
    if at.dim() == 2:  # one adapter for every row: [d_in, r], [r, d_out]
        d = (xr @ at) @ bt
    else:  # per row: [b, d_in, r], [b, r, d_out]
        d = torch.bmm(torch.bmm(xr, at), bt)
    return d.reshape(x.shape[0], -1).to(x.dtype)


def _lowp_training(x: Tensor, A: Tensor, B: Tensor) -> bool:
    """A bf16/fp16 slot being trained on bf16/fp16 activations (diff training in bf16 with fp32
    masters): the CPU path then computes the LoRA product in that dtype (:func:`multi_lora_rows_ref`)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and A.dtype == x.dtype and B.dtype == x.dtype
            and (A.requires_grad or B.requires_grad) and torch.is_grad_enabled())


def _row_weights(A: Tensor, B: Tensor, scale: Tensor, routing: RowRouting,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(A^T, scale * B^T) in ``dtype``: 2-D when every row uses the same adapter, else gathered per
    row. Frozen weights are gathered once per batch (cached in the routing, keyed by the tensor)."""
    frozen = not (A.requires_grad or B.requires_grad)
    key = ("rows", id(A), id(B), dtype)
    hit = routing.cache.get(key) if frozen else None
    if hit is not None and hit[0] is A and hit[1] is B:
        return hit[2], hit[3]
    i = routing.shared_adapter()
    if i is not None:
        at, bt = A[i].to(dtype).t(), (B[i].to(dtype) * scale[i].to(dtype)).t()
    else:
        idx = routing.index
        safe = idx.clamp_min(0)
        s = torch.where(idx >= 0, scale.float().index_select(0, safe), torch.zeros((), device=idx.device)).to(dtype)
        at = A.index_select(0, safe).to(dtype).transpose(1, 2)  # [b, d_in, r]
        bt = (B.index_select(0, safe).to(dtype) * s[:, None, None]).transpose(1, 2)  # [b, r, d_out]
    if frozen:
        routing.cache[key] = (A, B, at, bt)  # A, B held so their ids cannot be reused while cached
    return at, bt


def _routed_tokens(routing: Routing, x: Tensor) -> int:
    """How many tokens ``routing`` routes for this ``x`` (a RowRouting: any multiple of its rows)."""
    if isinstance(routing, RowRouting):
        if routing.batch == 0 or x.shape[0] % routing.batch:
            raise ValueError(f"multi_lora: {x.shape[0]} tokens do not split into the {routing.batch} routed rows")
        return x.shape[0]
    return routing.num_tokens


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


# ---- Triton path: autograd Function --------------------------------------------------------------


def _multi_lora_triton(x: Tensor, slots: Sequence[Operand], into: Tensor | None = None) -> Tensor:
    """Slots in pairs, one shrink and one expand launch per pair. No host sync: the plans and
    routes come from the routings' caches (built on the device once per batch), and inference
    skips autograd (and with ``into`` expands straight into it). Every pair is checked (on its
    first call) before anything is launched."""
    if len(slots) <= 2:
        pairs = (slots,)
    else:  # a pair's own slots are checked when its plan is built
        pairs = [slots[i : i + 2] for i in range(0, len(slots), 2)]
        _check_d_out(slots)
    plans = [_pair_plan(x, pair) for pair in pairs]
    grad = torch.is_grad_enabled()
    poison = _backend.poisoned()
    out = None
    for pair, plan in zip(pairs, plans):
        if grad and (x.requires_grad or any(A.requires_grad or B.requires_grad for A, B, _, _ in pair)):
            weights = [t for A, B, _, _ in pair for t in (A, B)]
            routings = tuple(routing for *_, routing in pair)
            d = _MultiLoraFunction.apply(x, plan, routings, tuple(s for _, _, s, _ in pair), *weights)
        else:  # the same two launches as the Function's forward, without autograd's bookkeeping
            S = _run_shrink(plan.shrink, x, plan.route, scratch=True, poison=poison)
            if into is not None:
                _run_expand(plan.expand_into, S, plan.route, into=into)
                continue
            d = _run_expand(plan.expand, S, plan.route, poison=poison)
        out = d if out is None else out + d
    if into is None:
        return out
    return into if out is None else into.add_(out)


class _MultiLoraFunction(torch.autograd.Function):
    """One or two slots k, each token t routed to adapter i = i_k(t) of slot k (or to none):

        S_k[t] = x[t] @ A_k[i]^T                       fp32, saved for the backward
        y[t]   = sum_k scale_k[i] * S_k[t] @ B_k[i]^T

    Backward, from dy:

        dS_k[t] = scale_k[i] * dy[t] @ B_k[i]           shrink kernel, B read as [r, d_out]
        dx[t]   = sum_k dS_k[t] @ A_k[i]                 expand kernel, A read as [d_in, r]
        dB_k[i] = scale_k[i] * sum_{t: i_k(t) = i} dy[t]^T S_k[t]
        dA_k[i] = sum_{t: i_k(t) = i} dS_k[t]^T x[t]
    """

    @staticmethod
    def forward(ctx, x, plan, routings, scales, *weights):
        S = _run_shrink(plan.shrink, x, plan.route)
        y = _run_expand(plan.expand, S, plan.route)
        ctx.route, ctx.routings, ctx.scales = plan.route, routings, scales
        # S_k only serves dB_k: a frozen slot's intermediate is not kept alive for the backward.
        keep = [s if ctx.needs_input_grad[5 + 2 * k] else None for k, s in enumerate(S)]
        ctx.save_for_backward(x, *keep, *weights)
        return y

    @staticmethod
    def backward(ctx, dy):
        n_slots = len(ctx.routings)
        x, *rest = ctx.saved_tensors
        S, weights = rest[:n_slots], rest[n_slots:]
        A, B = list(weights[0::2]), list(weights[1::2])
        need = ctx.needs_input_grad
        need_x = need[0]
        need_A = [need[4 + 2 * k] for k in range(n_slots)]
        need_B = [need[5 + 2 * k] for k in range(n_slots)]

        want_dS = [need_x or need_A[k] for k in range(n_slots)]
        dS = [None] * n_slots
        if any(want_dS):
            dS = _lora_shrink(
                dy,
                ctx.route,
                [B[k].transpose(1, 2) if want_dS[k] else None for k in range(n_slots)],
                scales=list(ctx.scales),
            )
        dx = None
        if need_x:
            dx = _lora_expand(dS, ctx.route, [a.transpose(1, 2) for a in A], scales=None, out_dtype=x.dtype)
        grads_w: list[Tensor | None] = []
        for k in range(n_slots):
            routing, n = ctx.routings[k], A[k].shape[0]
            dA = _lora_wgrad(dS[k], x, routing, n, scale=None, out_dtype=A[k].dtype) if need_A[k] else None
            dB = _lora_wgrad(dy, S[k], routing, n, scale=ctx.scales[k], out_dtype=B[k].dtype) if need_B[k] else None
            grads_w += [dA, dB]
        return (dx, None, None, None, *grads_w)


# ---- Triton path: routes in fixed-capacity device buffers, built once per batch -------------------

_KEY_SHIFT = 32  # combined key of a token: (id0 + 1) << 32 | (id1 + 1); all -1 sorts first


@dataclasses.dataclass(frozen=True)
class _Route:
    """All tokens of a batch sorted by their adapter ids over one or two slots, cut into tiles.

    Built on the kernels' device from the token -> adapter maps with no host sync (vLLM's way, so a
    decode step can be captured in a CUDA graph): the number of tiles is data-dependent, so
    ``tiles`` has a capacity known on the host (an upper bound) and its unused rows are empty
    (first row = end row), which the kernels skip. Every routed token lies in exactly one tile.
    """

    tokens: Tensor  # [N] int64, token ids in route order (tokens of no adapter at all first)
    tiles: Tensor  # [T_cap, 4] int32: first row, end row, adapter of slot 0, of slot 1; unused: (0, 0, -1, -1)
    block_m: int  # rows per tile (at most)
    # Inference's S, reused by every call of the batch: (R0, R1) -> ([N, R0 + R1] fp32, its two column views)
    scratch: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def _route(routings: tuple[Routing, ...], x: Tensor) -> _Route:
    """The route of one or two slots for this batch's ``x``, cached on the first slot's routing."""
    n_tok, device = x.shape[0], x.device
    key = ("route", n_tok, device) + tuple(id(r) for r in routings[1:])
    cache = routings[0].cache
    hit = cache.get(key)
    # The cache entry keeps the other routings alive, so their ids cannot be reused while it exists.
    if hit is not None and all(a is b for a, b in zip(hit[0], routings[1:])):
        return hit[1]
    # Rows per tile: the smallest of 16/32/64 that the longest routed segment is expected to fill,
    # from host-known counts (a tile size is a speed choice, never a correctness one).
    longest = min(_segment_hint(r, n_tok) for r in routings)
    block_m = 16 if longest <= 16 else 32 if longest <= 32 else 64
    indices = [_token_index(r, n_tok, device) for r in routings]
    route = _build_route(indices, block_m, _max_segments(routings, n_tok))
    cache[key] = (routings[1:], route)
    return route


def _slot_route(routing: Routing, n_tok: int, device: torch.device, chunk: int) -> _Route:
    """One slot's tokens sorted by its own adapter, in chunks of ``chunk`` rows (the weight gradient)."""
    key = ("slot_route", n_tok, device, chunk)
    if key not in routing.cache:
        index = _token_index(routing, n_tok, device)
        routing.cache[key] = _build_route([index], chunk, _max_segments((routing,), n_tok))
    return routing.cache[key]


def _build_route(indices: list[Tensor], block: int, max_segments: int) -> _Route:
    """Sort tokens by their (one or two) adapter ids and cut the runs of equal ids into tiles of at
    most ``block`` rows, with device ops only: no ``nonzero``/``unique``/``.tolist()``.

    At most ``N // block + S`` tiles for ``S`` runs (each run adds at most one partial tile), and
    never more than one per token: that is the buffer's capacity."""
    idx0 = indices[0]
    n, device = idx0.shape[0], idx0.device
    second = indices[1] if len(indices) > 1 else torch.full_like(idx0, -1)
    key = ((idx0 + 1) << _KEY_SHIFT) | (second + 1)
    sorted_key, order = torch.sort(key, stable=True)
    cap = min(n, n // block + max_segments)
    tiles = torch.zeros(cap, 4, dtype=torch.int64, device=device)
    tiles[:, 2:] = -1
    if n:
        pos = torch.arange(n, device=device)
        run_start = torch.ones(n, dtype=torch.bool, device=device)
        run_start[1:] = sorted_key[1:] != sorted_key[:-1]
        first = torch.cummax(torch.where(run_start, pos, 0), 0).values  # start of each row's run
        tile_of = torch.cumsum((pos - first) % block == 0, 0) - 1  # [N] tile of each sorted row
        low = (1 << _KEY_SHIFT) - 1
        # Every row of a tile scatters the same ids; the max of -row / row + 1 is the tile's bounds.
        fields = torch.stack([-pos, pos + 1, (sorted_key >> _KEY_SHIFT) - 1, (sorted_key & low) - 1], 1)
        tiles.scatter_reduce_(0, tile_of[:, None].expand(n, 4), fields, "amax", include_self=False)
        tiles[:, 0] = -tiles[:, 0]
    return _Route(tokens=order, tiles=tiles.to(torch.int32), block_m=block)


def _token_index(routing: Routing, n_tok: int, device: torch.device) -> Tensor:  # [N] int64
    if isinstance(routing, RowRouting):
        idx = routing.index.to(device=device, dtype=torch.int64)
        return idx[:, None].expand(routing.batch, n_tok // routing.batch).reshape(-1)
    return routing.token_index.to(device)


def _segment_hint(routing: Routing, n_tok: int) -> int:
    """Host-known guess of a slot's longest run of tokens with one adapter: a row for a RowRouting
    (rows are distinct diffs in the common case), the measured longest for a LoraMeta."""
    if isinstance(routing, RowRouting):
        return n_tok // routing.batch
    return max(routing.max_count, 1)


def _max_segments(routings: tuple[Routing, ...], n_tok: int) -> int:
    """Upper bound on the runs of equal adapter ids over the slots, from host-known counts."""
    keys = 1
    for r in routings:  # distinct ids per slot, -1 included
        keys *= (r.n_adapters if isinstance(r, RowRouting) else len(r.active_list)) + 1
    rows = {r.batch if isinstance(r, RowRouting) else None for r in routings}
    if len(rows) == 1 and None not in rows:  # rows of one batch: at most one key per row
        keys = min(keys, rows.pop())
    return max(1, min(keys, n_tok))


# ---- Triton path: launchers -------------------------------------------------------------------------
#
# A launcher's host work is split in two: a plan (block sizes, grid, split, the weights and their
# strides: everything fixed for one batch, layer and layout) and a run (allocate the outputs,
# launch). The model's inference path caches the plans on the batch's routing, so a steady-state
# call only allocates and launches; the backward builds its plans on the fly.


@dataclasses.dataclass(frozen=True)
class _ShrinkPlan:
    grid: tuple[int, int]  # (tiles, split over d_in)
    ranks: tuple[int, ...]  # per slot; 0 = slot skipped
    zeroed: bool  # split over d_in: partial sums meet by fp32 atomics in a zeroed S
    operands: tuple  # (w0, w1, scale0, scale1), unused ones a dummy pointer
    strides: tuple  # of w0 and w1
    meta: dict  # constexprs


@dataclasses.dataclass(frozen=True)
class _ExpandPlan:
    grid: tuple[int, int]  # (tiles, d_out blocks)
    ranks: tuple[int, int]  # 0 = slot contributes nothing
    n_out: int
    out_dtype: torch.dtype
    operands: tuple  # (w0, w1, scale0, scale1)
    strides: tuple  # of w0 and w1
    meta: dict


@dataclasses.dataclass(frozen=True)
class _PairPlan:
    """Everything one or two slots' forward needs but ``x``: built once per batch and layer."""

    route: _Route
    shrink: _ShrinkPlan
    expand: _ExpandPlan  # into a new buffer
    expand_into: _ExpandPlan  # adding into the caller's (the base output)


def _pair_plan(x: Tensor, pair: Sequence[Operand]) -> _PairPlan:
    """The cached plan of these slots for ``x``'s shape; checks the slots when it is first built."""
    # Cached on the first slot's routing, keyed by the other operands' identities. The entry holds
    # those operands, so their ids cannot be reused while it exists; it does not hold the routing
    # it lives in (no reference cycle: a dropped batch frees its plans and buffers at once).
    held = tuple(itertools.chain.from_iterable(pair))
    held = held[:3] + held[4:]
    cache = pair[0][3].cache
    key = ("plan", x.shape, x.dtype, x.device, *map(id, held))
    hit = cache.get(key)
    if hit is not None and all(map(operator.is_, hit[0], held)):
        return hit[1]
    routings = tuple(routing for *_, routing in pair)
    _check_d_out(pair)
    _check_devices(x, pair)
    for A, B, scale, routing in pair:
        _check_shapes(x, A, B, scale, _routed_tokens(routing, x))
    route = _route(routings, x)
    A, B, scales = [o[0] for o in pair], [o[1] for o in pair], [o[2] for o in pair]
    shrink = _shrink_plan(x, route, A, scales=None)
    expand = _expand_plan(route, B, scales, [True] * len(pair), x.dtype)
    expand_into = dataclasses.replace(expand, meta={**expand.meta, "ACCUMULATE": True})
    plan = _PairPlan(route, shrink, expand, expand_into)
    cache[key] = (held, plan)
    return plan


def _lora_shrink(
    x: Tensor,  # [N, K]
    route: _Route,
    weights: list[Tensor | None],  # per slot [n_k, R_k, K] (A, or B^T in the backward); None = skip slot
    scales: list[Tensor] | None,  # per slot [n_k], multiplied in when given
    split_k: int | None = None,
) -> list[Tensor | None]:  # per slot [N, R_k] fp32 by token id (rows of unrouted tokens unwritten)
    """``S_k = x @ W_k[i_k]^T`` for every routed token, all slots from one read of ``x``."""
    return _run_shrink(_shrink_plan(x, route, weights, scales, split_k), x, route)


def _shrink_plan(x: Tensor, route: _Route, weights, scales, split_k: int | None = None) -> _ShrinkPlan:
    K = x.shape[1]
    n_tiles = route.tiles.shape[0]
    ranks = [w.shape[1] if w is not None else 0 for w in weights]
    r0, r1 = (ranks + [0])[:2]
    block_r = (_backend.pow2_at_least(r0), _backend.pow2_at_least(r1))
    block_k = 64 if _backend.interpreted(x.device) else (128 if max(block_r) <= 32 else 64)
    if split_k is None:
        # Few tiles (decode with few adapters, one big adapter): split d_in so every SM streams
        # weights. The tile count is only known on the device; its capacity stands in for it.
        want = 2 * _backend.num_sms(x.device)
        split_k = max(1, min(_backend.cdiv(want, max(n_tiles, 1)), _backend.cdiv(K, block_k), 32))
    w0, w1 = (list(weights) + [None])[:2]
    sc0, sc1 = (list(scales or []) + [None, None])[:2]
    dummy = route.tokens
    return _ShrinkPlan(
        grid=(n_tiles, split_k),
        ranks=tuple(ranks),
        zeroed=split_k > 1,
        operands=tuple(t if t is not None else dummy for t in (w0, w1, sc0, sc1)),
        strides=(*_strides3(w0), *_strides3(w1)),
        meta=dict(
            HAS0=w0 is not None,
            HAS1=w1 is not None,
            HAS_SCALE=scales is not None,
            SPLIT_K=split_k,
            BLOCK_M=route.block_m,
            BLOCK_K=block_k,
            BLOCK_R0=block_r[0],
            BLOCK_R1=block_r[1],
            DOT_DTYPE=_backend.dot_dtype(x.dtype, x.device),
            PRECISION=_backend.fp32_precision(x.dtype),
        ),
    )


def _run_shrink(
    plan: _ShrinkPlan, x: Tensor, route: _Route, scratch: bool = False, poison: bool | None = None
) -> list[Tensor | None]:
    """Launch a shrink plan. Both slots' S share one ``[N, R0 + R1]`` fp32 buffer; ``scratch``
    reuses the route's (inference: the expand reads it before the next call, in stream order).
    ``poison``: the caller's reading of ``DIT_KERNELS_POISON`` (read here when None)."""
    n_tok, K = x.shape
    r0, r1 = (plan.ranks + (0,))[:2]
    width = r0 + r1
    if scratch:
        hit = route.scratch.get((r0, r1))
        if hit is None:
            buf = torch.empty(n_tok, width, dtype=torch.float32, device=x.device)
            hit = route.scratch[(r0, r1)] = (buf, *_split_columns(buf, r0, r1))
        buf, s0, s1 = hit
        if plan.zeroed:
            buf.zero_()
        elif poison if poison is not None else _backend.poisoned():
            buf.fill_(float("nan"))
    else:
        if plan.zeroed:
            buf = torch.zeros(n_tok, width, dtype=torch.float32, device=x.device)
        else:
            buf = _backend.empty((n_tok, width), torch.float32, x.device)
        s0, s1 = _split_columns(buf, r0, r1)
    if plan.grid[0]:
        kernel = _backend.on_device(_lora_shrink_kernel, x.device)
        with _backend.device_guard(x):
            kernel[plan.grid](
                x, route.tokens, route.tiles, *plan.operands,
                s0 if s0 is not None else buf, s1 if s1 is not None else buf,
                K, r0, r1, x.stride(0), x.stride(1), *plan.strides, width, width,
                **plan.meta,
            )  # fmt: skip
    return [s0, s1][: len(plan.ranks)]


def _split_columns(buf: Tensor, r0: int, r1: int) -> tuple[Tensor | None, Tensor | None]:
    return (buf[:, :r0] if r0 else None), (buf[:, r0:] if r1 else None)


def _lora_expand(
    S: list[Tensor | None],  # per slot [N, R_k] fp32 by token id; None = slot contributes nothing
    route: _Route,
    weights: list[Tensor],  # per slot [n_k, N_out, R_k] (B, or A^T in the backward)
    scales: list[Tensor] | None,  # per slot [n_k]
    out_dtype: torch.dtype,
) -> Tensor:  # [N, N_out]; rows of tokens without any adapter are zero
    """``y = sum_k scale_k[i_k] * S_k @ W_k[i_k]^T``, every row of ``y`` written exactly once."""
    return _run_expand(_expand_plan(route, weights, scales, [s is not None for s in S], out_dtype), S, route)


def _expand_plan(route: _Route, weights, scales, used: list[bool], out_dtype: torch.dtype) -> _ExpandPlan:
    n_out = weights[0].shape[1]
    w0, w1 = ([w if u else None for w, u in zip(weights, used)] + [None])[:2]
    ranks = (w0.shape[2] if w0 is not None else 0, w1.shape[2] if w1 is not None else 0)
    sc0, sc1 = (list(scales or []) + [None, None])[:2]
    block_n = 64
    dummy = route.tokens
    return _ExpandPlan(
        grid=(route.tiles.shape[0], _backend.cdiv(n_out, block_n)),
        ranks=ranks,
        n_out=n_out,
        out_dtype=out_dtype,
        operands=tuple(t if t is not None else dummy for t in (w0, w1, sc0, sc1)),
        strides=(*_strides3(w0), *_strides3(w1)),
        meta=dict(
            HAS0=w0 is not None,
            HAS1=w1 is not None,
            HAS_SCALE=scales is not None,
            BLOCK_M=route.block_m,
            BLOCK_N=block_n,
            BLOCK_R0=_backend.pow2_at_least(ranks[0]),
            BLOCK_R1=_backend.pow2_at_least(ranks[1]),
            PRECISION=_backend.fp32_precision(out_dtype),
            ACCUMULATE=False,
        ),
    )


def _run_expand(
    plan: _ExpandPlan, S: list[Tensor | None], route: _Route, poison: bool | None = None, into: Tensor | None = None
) -> Tensor:
    """Launch an expand plan into a new buffer, or (a plan with ``ACCUMULATE``) adding into ``into``."""
    n_tok = route.tokens.shape[0]
    device = route.tokens.device
    if into is not None:
        y = into
    elif poison is None:
        y = _backend.empty((n_tok, plan.n_out), plan.out_dtype, device)
    else:
        y = torch.empty((n_tok, plan.n_out), dtype=plan.out_dtype, device=device)
        if poison:
            y.fill_(float("nan"))
    if plan.grid[0] == 0:
        return y
    s0, s1 = (list(S) + [None])[:2]
    s0 = s0 if plan.ranks[0] else None
    s1 = s1 if plan.ranks[1] else None
    kernel = _backend.on_device(_lora_expand_kernel, device)
    with _backend.device_guard(y):
        kernel[plan.grid](
            s0 if s0 is not None else y, s1 if s1 is not None else y, route.tokens, route.tiles,
            *plan.operands, y, plan.n_out, plan.ranks[0], plan.ranks[1],
            s0.stride(0) if s0 is not None else 0, s1.stride(0) if s1 is not None else 0,
            *plan.strides, *((plan.n_out, 1) if into is None else y.stride()),  # a new y is contiguous
            **plan.meta,
        )  # fmt: skip
    return y


def _lora_wgrad(
    left: Tensor,  # [N, P] by token id (dy for dB, dS for dA)
    right: Tensor,  # [N, Q] by token id (S for dB, x for dA)
    routing: Routing,  # the slot's own routing
    n_adapters: int,
    scale: Tensor | None,  # [n_adapters]
    out_dtype: torch.dtype,
    chunk: int | None = None,
) -> Tensor:  # [n_adapters, P, Q]; zero for adapters without tokens
    """``G[i] = scale[i] * sum_{t routed to i} left[t]^T right[t]``: a segmented grouped GEMM."""
    n_tok, P, Q = left.shape[0], left.shape[1], right.shape[1]
    device = left.device
    out = torch.zeros(n_adapters, P, Q, dtype=torch.float32, device=device)
    if n_tok == 0:
        return out.to(out_dtype)
    # The rank side (<= 128) fits one block; the model side (d_in or d_out) is tiled by 64.
    block_p = _backend.pow2_at_least(P) if P <= 128 else 64
    block_q = _backend.pow2_at_least(Q) if Q <= 128 else 64
    block_t = 64
    grid_pq = _backend.cdiv(P, block_p) * _backend.cdiv(Q, block_q)
    if chunk is None:
        # Halve the chunk until the grid fills the GPU (counted from host-known sizes).
        chunk = max(block_t, _backend.next_power_of_2(_segment_hint(routing, n_tok)))
        want = 2 * _backend.num_sms(device)
        while chunk > block_t and grid_pq * _backend.cdiv(n_tok, chunk) < want:
            chunk //= 2
    route = _slot_route(routing, n_tok, device, chunk)
    chunks = route.tiles
    # An adapter with more tokens than a chunk spans several: their partial sums meet by fp32
    # atomics (into the zeroed output). Which adapters do is only known on the device.
    atomic = chunk < n_tok
    tokens = route.tokens
    kernel = _backend.on_device(_lora_wgrad_kernel, device)
    with _backend.device_guard(left):
        kernel[(chunks.shape[0], _backend.cdiv(P, block_p), _backend.cdiv(Q, block_q))](
            left,
            right,
            tokens,
            chunks,
            scale if scale is not None else out,
            out,
            P,
            Q,
            left.stride(0),
            left.stride(1),
            right.stride(0),
            right.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            HAS_SCALE=scale is not None,
            ATOMIC=atomic,
            BLOCK_T=block_t,
            BLOCK_P=block_p,
            BLOCK_Q=block_q,
            PRECISION=_backend.fp32_precision(left.dtype if left.dtype != torch.float32 else right.dtype),
        )
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _strides3(w: Tensor | None) -> tuple[int, int, int]:
    return (w.stride(0), w.stride(1), w.stride(2)) if w is not None else (0, 0, 0)


# ---- Triton path: kernels ---------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [N, K], rows read through the route
    tokens_ptr,  # [N] int64, token ids in route order
    tiles_ptr,  # [T, 4] int32: first row, end row, adapter of slot 0, adapter of slot 1
    w0_ptr,  # [n0, R0, K]
    w1_ptr,  # [n1, R1, K]
    scale0_ptr,  # [n0]
    scale1_ptr,  # [n1]
    s0_ptr,  # [N, R0] fp32, by token id
    s1_ptr,  # [N, R1] fp32, by token id
    K,
    R0,
    R1,
    stride_xm,
    stride_xk,
    stride_w0n,
    stride_w0r,
    stride_w0k,
    stride_w1n,
    stride_w1r,
    stride_w1k,
    stride_s0m,
    stride_s1m,
    HAS0: tl.constexpr,
    HAS1: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R0: tl.constexpr,
    BLOCK_R1: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    row_start = tl.load(tiles_ptr + i_t * 4)
    row_end = tl.load(tiles_ptr + i_t * 4 + 1)
    i_a0 = tl.load(tiles_ptr + i_t * 4 + 2).to(tl.int64)
    i_a1 = tl.load(tiles_ptr + i_t * 4 + 3).to(tl.int64)

    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    b_tok = tl.load(tokens_ptr + o_m, mask=m_m, other=0)
    o_r0 = tl.arange(0, BLOCK_R0)
    o_r1 = tl.arange(0, BLOCK_R1)
    # A slot whose adapter is -1 on this tile masks its loads (no memory traffic) and its stores.
    # (The limit is folded into one comparison: Triton's interpreter mis-types a block & scalar mask.)
    m_r0 = o_r0 < tl.where(i_a0 >= 0, R0, 0)
    m_r1 = o_r1 < tl.where(i_a1 >= 0, R1, 0)
    p_w0 = w0_ptr + tl.maximum(i_a0, 0) * stride_w0n + o_r0[:, None] * stride_w0r
    p_w1 = w1_ptr + tl.maximum(i_a1, 0) * stride_w1n + o_r1[:, None] * stride_w1r

    # Unused capacity (first row = end row) and tiles without any adapter read nothing.
    k_end = tl.where((row_end > row_start) & ((i_a0 >= 0) | (i_a1 >= 0)), K, 0)
    b_acc0 = tl.zeros([BLOCK_M, BLOCK_R0], dtype=tl.float32)
    b_acc1 = tl.zeros([BLOCK_M, BLOCK_R1], dtype=tl.float32)
    for k0 in range(i_k * BLOCK_K, k_end, SPLIT_K * BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        p_x = x_ptr + b_tok[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0).to(DOT_DTYPE)
        if HAS0:
            b_w0 = tl.load(p_w0 + o_k[None, :] * stride_w0k, mask=m_r0[:, None] & m_k[None, :], other=0.0)
            b_acc0 = tl.dot(b_x, tl.trans(b_w0.to(DOT_DTYPE)), b_acc0, input_precision=PRECISION)
        if HAS1:
            b_w1 = tl.load(p_w1 + o_k[None, :] * stride_w1k, mask=m_r1[:, None] & m_k[None, :], other=0.0)
            b_acc1 = tl.dot(b_x, tl.trans(b_w1.to(DOT_DTYPE)), b_acc1, input_precision=PRECISION)

    if HAS0:
        if HAS_SCALE:
            b_acc0 *= tl.load(scale0_ptr + tl.maximum(i_a0, 0)).to(tl.float32)
        p_s0 = s0_ptr + b_tok[:, None] * stride_s0m + o_r0[None, :]
        m_s0 = m_m[:, None] & m_r0[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(p_s0, b_acc0, mask=m_s0)
        else:
            tl.store(p_s0, b_acc0, mask=m_s0)
    if HAS1:
        if HAS_SCALE:
            b_acc1 *= tl.load(scale1_ptr + tl.maximum(i_a1, 0)).to(tl.float32)
        p_s1 = s1_ptr + b_tok[:, None] * stride_s1m + o_r1[None, :]
        m_s1 = m_m[:, None] & m_r1[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(p_s1, b_acc1, mask=m_s1)
        else:
            tl.store(p_s1, b_acc1, mask=m_s1)


@triton.jit
def _lora_expand_kernel(
    s0_ptr,  # [N, R0] fp32, by token id
    s1_ptr,  # [N, R1] fp32, by token id
    tokens_ptr,  # [N] int64, token ids in route order
    tiles_ptr,  # [T, 4] int32: first row, end row, adapter of slot 0, adapter of slot 1
    w0_ptr,  # [n0, N_out, R0]
    w1_ptr,  # [n1, N_out, R1]
    scale0_ptr,  # [n0]
    scale1_ptr,  # [n1]
    y_ptr,  # [N, N_out]
    N_out,
    R0,
    R1,
    stride_s0m,
    stride_s1m,
    stride_w0n,
    stride_w0o,
    stride_w0r,
    stride_w1n,
    stride_w1o,
    stride_w1r,
    stride_ym,
    stride_yo,
    HAS0: tl.constexpr,
    HAS1: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R0: tl.constexpr,
    BLOCK_R1: tl.constexpr,
    PRECISION: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add into y (the base output) instead of writing it
):
    i_t = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    row_start = tl.load(tiles_ptr + i_t * 4)
    row_end = tl.load(tiles_ptr + i_t * 4 + 1)
    i_a0 = tl.load(tiles_ptr + i_t * 4 + 2).to(tl.int64)
    i_a1 = tl.load(tiles_ptr + i_t * 4 + 3).to(tl.int64)

    o_m = row_start + tl.arange(0, BLOCK_M)
    if ACCUMULATE:  # rows of tokens without any adapter keep y as it is: not even read
        m_m = o_m < tl.where((i_a0 >= 0) | (i_a1 >= 0), row_end, row_start)
    else:
        m_m = o_m < row_end
    b_tok = tl.load(tokens_ptr + o_m, mask=m_m, other=0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N_out

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS0:
        o_r0 = tl.arange(0, BLOCK_R0)
        m_r0 = o_r0 < tl.where(i_a0 >= 0, R0, 0)
        p_s0 = s0_ptr + b_tok[:, None] * stride_s0m + o_r0[None, :]
        b_s0 = tl.load(p_s0, mask=m_m[:, None] & m_r0[None, :], other=0.0)
        p_w0 = w0_ptr + tl.maximum(i_a0, 0) * stride_w0n + o_n[:, None] * stride_w0o + o_r0[None, :] * stride_w0r
        b_w0 = tl.load(p_w0, mask=m_n[:, None] & m_r0[None, :], other=0.0).to(tl.float32)
        b_part0 = tl.dot(b_s0, tl.trans(b_w0), input_precision=PRECISION)
        if HAS_SCALE:
            b_part0 *= tl.load(scale0_ptr + tl.maximum(i_a0, 0)).to(tl.float32)
        b_acc += b_part0
    if HAS1:
        o_r1 = tl.arange(0, BLOCK_R1)
        m_r1 = o_r1 < tl.where(i_a1 >= 0, R1, 0)
        p_s1 = s1_ptr + b_tok[:, None] * stride_s1m + o_r1[None, :]
        b_s1 = tl.load(p_s1, mask=m_m[:, None] & m_r1[None, :], other=0.0)
        p_w1 = w1_ptr + tl.maximum(i_a1, 0) * stride_w1n + o_n[:, None] * stride_w1o + o_r1[None, :] * stride_w1r
        b_w1 = tl.load(p_w1, mask=m_n[:, None] & m_r1[None, :], other=0.0).to(tl.float32)
        b_part1 = tl.dot(b_s1, tl.trans(b_w1), input_precision=PRECISION)
        if HAS_SCALE:
            b_part1 *= tl.load(scale1_ptr + tl.maximum(i_a1, 0)).to(tl.float32)
        b_acc += b_part1

    p_y = y_ptr + b_tok[:, None] * stride_ym + o_n[None, :] * stride_yo
    m_y = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        b_acc += tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _lora_wgrad_kernel(
    l_ptr,  # [N, P] by token id
    r_ptr,  # [N, Q] by token id
    tokens_ptr,  # [N] int64, the slot's tokens sorted by adapter (tokens of none first)
    chunks_ptr,  # [C, 4] int32: first row, end row, adapter (-1: skip), unused
    scale_ptr,  # [n]
    out_ptr,  # [n, P, Q] fp32
    P,
    Q,
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    stride_on,
    stride_op,
    stride_oq,
    HAS_SCALE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1).to(tl.int64)
    i_q = tl.program_id(2).to(tl.int64)
    row_start = tl.load(chunks_ptr + i_c * 4)
    row_end = tl.load(chunks_ptr + i_c * 4 + 1)
    i_a = tl.load(chunks_ptr + i_c * 4 + 2).to(tl.int64)
    # Chunks of tokens without an adapter (and unused capacity) run no iterations and store nothing.
    t_end = tl.where(i_a >= 0, row_end, row_start)

    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p = o_p < tl.where(i_a >= 0, P, 0)
    m_q = o_q < Q
    b_acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for t0 in range(row_start, t_end, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < row_end
        b_tok = tl.load(tokens_ptr + o_t, mask=m_t, other=0)
        p_l = l_ptr + b_tok[:, None] * stride_lm + o_p[None, :] * stride_lp
        p_r = r_ptr + b_tok[:, None] * stride_rm + o_q[None, :] * stride_rq
        b_l = tl.load(p_l, mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)
        b_r = tl.load(p_r, mask=m_t[:, None] & m_q[None, :], other=0.0).to(tl.float32)
        b_acc = tl.dot(tl.trans(b_l), b_r, b_acc, input_precision=PRECISION)
    if HAS_SCALE:
        b_acc *= tl.load(scale_ptr + tl.maximum(i_a, 0)).to(tl.float32)

    p_o = out_ptr + tl.maximum(i_a, 0) * stride_on + o_p[:, None] * stride_op + o_q[None, :] * stride_oq
    m_o = m_p[:, None] & m_q[None, :]
    if ATOMIC:
        tl.atomic_add(p_o, b_acc, mask=m_o)
    else:
        tl.store(p_o, b_acc, mask=m_o)


# ---- input checks -----------------------------------------------------------------------------------


def _check_shapes(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, meta: LoraMeta | int) -> None:
    """``meta``: the routing metadata, or the number of tokens it routes."""
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
    n_tokens = meta if isinstance(meta, int) else meta.num_tokens
    if n_tokens != x.shape[0]:
        raise ValueError(f"multi_lora: metadata is for {n_tokens} tokens, x has {x.shape[0]}")


def _check_d_out(slots: Sequence[Operand]) -> None:
    if len({B.shape[1] for _, B, _, _ in slots}) != 1:
        raise ValueError(f"multi_lora_sum: slots disagree on d_out: B shapes {[tuple(s[1].shape) for s in slots]}")


def _check_devices(x: Tensor, slots: Sequence[Operand]) -> None:
    for k, (A, B, scale, _) in enumerate(slots):
        for name, t in (("A", A), ("B", B), ("scale", scale)):
            if t.device != x.device:
                raise ValueError(f"multi_lora: slot {k} {name} is on {t.device}, x on {x.device}")
            if not t.is_floating_point():
                raise ValueError(f"multi_lora: slot {k} {name} must be floating point, got {t.dtype}")

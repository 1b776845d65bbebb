"""Multi-LoRA Triton kernels (run by Triton's interpreter on CPU) against an fp64 per-token oracle.

Every case checks the forward and the gradients of x, A and B; outputs are NaN-poisoned before the
kernels write them (``DIT_KERNELS_POISON=1``), so an element a kernel forgets shows up as NaN.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import rel_err as _rel

from dit_kernels import multi_lora as ml
from dit_kernels.multi_lora import (
    RowRouting,
    build_lora_meta,
    multi_lora,
    multi_lora_ref,
    multi_lora_sum,
)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("kernel_poison")


def _pattern(name: str, n_tok: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Token -> adapter maps covering how adapters are popular in real batches."""
    if name == "identical":
        return torch.full((n_tok,), n - 1, dtype=torch.int64)
    if name == "distinct":
        return torch.randperm(n_tok, generator=g) % n
    if name == "uniform":
        return torch.randint(0, n, (n_tok,), generator=g)
    if name == "zipf":
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
        return torch.multinomial(p, n_tok, replacement=True, generator=g)
    if name == "skewed":
        idx = torch.randint(0, n, (n_tok,), generator=g)
        return torch.where(torch.rand(n_tok, generator=g) < 0.9, 0, idx)
    if name == "with_none":
        idx = torch.randint(0, n, (n_tok,), generator=g)
        return torch.where(torch.rand(n_tok, generator=g) < 0.3, -1, idx)
    if name == "all_none":
        return torch.full((n_tok,), -1, dtype=torch.int64)
    raise ValueError(name)


def _slot(n, r_max, d_in, d_out, g, *, dtype=torch.float32, mixed_ranks=False, grad=True):
    """Stacked adapters; with mixed ranks each adapter's rank is zero-padded to r_max."""
    A = torch.randn(n, r_max, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    B = torch.randn(n, d_out, r_max, generator=g, dtype=torch.float64) / r_max**0.5
    if mixed_ranks:
        ranks = torch.randint(1, r_max + 1, (n,), generator=g)
        keep = torch.arange(r_max)[None, :] < ranks[:, None]  # [n, r_max]
        A = A * keep[:, :, None]
        B = B * keep[:, None, :]
    scale = torch.rand(n, generator=g, dtype=torch.float64).float() + 0.5
    return A.to(dtype).requires_grad_(grad), B.to(dtype).requires_grad_(grad), scale


def _oracle(x, slots):
    """fp64, token by token: y[t] = sum_k scale_k[i] * B_k[i] @ (A_k[i] @ x[t]); autograd for the grads."""
    y = torch.zeros(x.shape[0], slots[0][1].shape[1], dtype=torch.float64)
    for A, B, scale, idx in slots:
        ids = idx.clamp(min=0)
        s = torch.einsum("trd,td->tr", A.double()[ids], x.double())
        d = torch.einsum("tor,tr->to", B.double()[ids], s) * scale.double()[ids, None]
        y = y + d * (idx >= 0).double()[:, None]
    return y




def _check(x, slots, *, dtype):
    """Run the Triton path on slots [(A, B, scale, idx)] and compare forward and every gradient."""
    metas = [build_lora_meta(idx, A.shape[0]) for A, B, scale, idx in slots]
    args = [(A, B, scale, m) for (A, B, scale, _), m in zip(slots, metas)]
    if len(slots) == 1:
        y = multi_lora(x, *args[0], backend="triton")
    else:
        y = multi_lora_sum(x, args, backend="triton")
    y_ref = _oracle(x, slots)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert not torch.isnan(y).any()
    if y_ref.norm() == 0:
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert _rel(y, y_ref) < TOL[dtype]
    leaves = [t for t in [x] + [w for A, B, _, _ in slots for w in (A, B)] if t.requires_grad]
    if not leaves:
        return
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, g.to(y.dtype), allow_unused=True)
    want = torch.autograd.grad(y_ref, leaves, g, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and a.dtype == leaves[i].dtype and not torch.isnan(a).any(), f"grad {i}"
        if b is None or b.norm() == 0:
            assert torch.count_nonzero(a) == 0, f"grad {i} should be zero"
        else:
            assert _rel(a, b) < TOL[dtype], f"grad {i}: rel err {_rel(a, b):.2e}"


PATTERNS = ["identical", "distinct", "uniform", "zipf", "skewed", "with_none", "all_none"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_single_slot_patterns_fp32(pattern):
    g = torch.Generator().manual_seed(hash(pattern) % 1000)
    n_tok, d_in, d_out, n = 63, 123, 77, 9
    x = torch.randn(n_tok, d_in, generator=g).requires_grad_()
    A, B, scale = _slot(n, 8, d_in, d_out, g)
    _check(x, [(A, B, scale, _pattern(pattern, n_tok, n, g))], dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern", ["zipf", "with_none"])
def test_half_precision(pattern, dtype):
    g = torch.Generator().manual_seed(3)
    n_tok, d_in, d_out, n = 63, 123, 63, 6
    x = torch.randn(n_tok, d_in, generator=g).to(dtype).requires_grad_()
    A, B, scale = _slot(n, 16, d_in, d_out, g, dtype=dtype)
    _check(x, [(A, B, scale, _pattern(pattern, n_tok, n, g))], dtype=dtype)


def test_bf16_activations_with_fp32_adapters():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 96, generator=g).to(torch.bfloat16).requires_grad_()
    A, B, scale = _slot(5, 4, 96, 48, g, dtype=torch.float32)
    _check(x, [(A, B, scale, _pattern("uniform", 40, 5, g))], dtype=torch.bfloat16)


@pytest.mark.parametrize("rank", [1, 17, 128])
def test_ranks_and_mixed_ranks(rank):
    g = torch.Generator().manual_seed(rank)
    n_tok, d_in, d_out, n = 45, 80, 56, 7
    x = torch.randn(n_tok, d_in, generator=g).requires_grad_()
    A, B, scale = _slot(n, rank, d_in, d_out, g, mixed_ranks=True)
    _check(x, [(A, B, scale, _pattern("with_none", n_tok, n, g))], dtype=torch.float32)


def test_decode_one_token_per_adapter_wide_layer():
    """Decode: every token its own adapter, d_in 577 (several K blocks, ragged tail)."""
    g = torch.Generator().manual_seed(5)
    n_tok, d_in, d_out = 8, 577, 63
    x = torch.randn(n_tok, d_in, generator=g).requires_grad_()
    A, B, scale = _slot(n_tok, 16, d_in, d_out, g, mixed_ranks=True)
    _check(x, [(A, B, scale, torch.arange(n_tok).flip(0))], dtype=torch.float32)


@pytest.mark.parametrize("pattern", ["distinct", "zipf", "with_none"])
def test_two_slots_diff_plus_shared_adapter(pattern):
    """Slot 0: a diff per sequence (some rows none), slot 1: one shared DIT adapter on most rows."""
    g = torch.Generator().manual_seed(11)
    n_tok, d_in, d_out, n = 63, 123, 63, 8
    x = torch.randn(n_tok, d_in, generator=g).requires_grad_()
    A0, B0, s0 = _slot(n, 4, d_in, d_out, g, mixed_ranks=True)
    A1, B1, s1 = _slot(1, 16, d_in, d_out, g)
    shared = torch.where(torch.rand(n_tok, generator=g) < 0.8, 0, -1)
    _check(x, [(A0, B0, s0, _pattern(pattern, n_tok, n, g)), (A1, B1, s1, shared)], dtype=torch.float32)


def test_three_slots_and_frozen_slots_get_no_weight_grad(monkeypatch):
    g = torch.Generator().manual_seed(12)
    n_tok, d_in, d_out = 50, 64, 40
    x = torch.randn(n_tok, d_in, generator=g).requires_grad_()
    frozen0 = _slot(6, 2, d_in, d_out, g, grad=False)
    trained = _slot(1, 8, d_in, d_out, g, grad=True)
    frozen2 = _slot(3, 5, d_in, d_out, g, grad=False)
    calls = []
    real = ml._lora_wgrad

    def counting(left, right, meta, n_adapters, *args, **kwargs):
        calls.append(n_adapters)
        return real(left, right, meta, n_adapters, *args, **kwargs)

    monkeypatch.setattr(ml, "_lora_wgrad", counting)
    slots = [
        (*frozen0, _pattern("uniform", n_tok, 6, g)),
        (*trained, _pattern("with_none", n_tok, 1, g)),
        (*frozen2, _pattern("skewed", n_tok, 3, g)),
    ]
    _check(x, slots, dtype=torch.float32)
    assert calls == [1, 1], "only the trainable slot's dA and dB are computed"


def test_input_grad_only_when_adapters_frozen():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(30, 48, generator=g).requires_grad_()
    A, B, scale = _slot(4, 4, 48, 24, g, grad=False)
    _check(x, [(A, B, scale, _pattern("uniform", 30, 4, g))], dtype=torch.float32)


def test_strided_input_and_expanded_grad():
    """x a column slice of a wider tensor (row stride != d_in); dy from a broadcast (stride 0)."""
    g = torch.Generator().manual_seed(14)
    base = torch.randn(33, 100, generator=g)
    x = base[:, 10:73].requires_grad_()  # not a leaf with contiguous rows: stride (100, 1)
    A, B, scale = _slot(3, 4, 63, 21, g)
    meta = build_lora_meta(_pattern("uniform", 33, 3, g))
    y = multi_lora(x, A, B, scale, meta, backend="triton")
    y_ref = multi_lora_ref(x, A, B, scale, meta)
    assert _rel(y, y_ref) < 1e-5
    (gx, gA), (rx, rA) = (torch.autograd.grad(t.sum(), (x, A)) for t in (y, y_ref))
    assert _rel(gx, rx) < 1e-5 and _rel(gA, rA) < 1e-5


@pytest.mark.parametrize("split_k", [1, 3])
def test_shrink_split_k_matches(split_k):
    """Split over d_in with fp32 atomics gives the same intermediate as one pass."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(20, 150, generator=g)
    A, _, _ = _slot(4, 8, 150, 8, g, grad=False)
    idx = _pattern("with_none", 20, 4, g)
    route = ml._route((build_lora_meta(idx),), x)
    (S,) = ml._lora_shrink(x, route, [A], scales=None, split_k=split_k)
    routed = idx >= 0
    want = torch.einsum("trd,td->tr", A.double()[idx.clamp(min=0)], x.double())
    assert _rel(S[routed], want[routed]) < 1e-6


@pytest.mark.parametrize("chunk", [8, 64])
def test_weight_grad_chunks_and_atomics(chunk):
    """Adapters spanning several chunks meet by atomics; a single chunk each stores directly."""
    g = torch.Generator().manual_seed(16)
    n_tok, P, Q, n = 57, 20, 37, 5
    left, right = torch.randn(n_tok, P, generator=g), torch.randn(n_tok, Q, generator=g)
    idx = _pattern("zipf", n_tok, n, g)
    scale = torch.rand(n, generator=g)
    idx[::7] = -1  # tokens without an adapter contribute nothing
    meta = build_lora_meta(idx)
    assert meta.max_count > 8  # chunk 8: the most popular adapter spans several chunks
    got = ml._lora_wgrad(left, right, meta, n, scale, torch.float32, chunk=chunk)
    want = torch.zeros(n, P, Q, dtype=torch.float64)
    for t in range(n_tok):
        if idx[t] >= 0:
            want[idx[t]] += scale[idx[t]].double() * torch.outer(left[t].double(), right[t].double())
    assert _rel(got, want) < 1e-6
    chunks = ml._slot_route(meta, n_tok, left.device, chunk).tiles
    assert int((chunks[:, 1] - chunks[:, 0]).max()) <= chunk


def test_route_and_tiles_are_built_once_per_batch():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(20, 32, generator=g)
    A, B, scale = _slot(3, 4, 32, 16, g, grad=False)
    meta = build_lora_meta(_pattern("with_none", 20, 3, g))
    multi_lora(x, A, B, scale, meta, backend="triton")
    route = ml._route((meta,), x)
    multi_lora(x, A, B, scale, meta, backend="triton")
    assert ml._route((meta,), x) is route
    _assert_tiles_cover(route, [meta.token_index])


def _assert_tiles_cover(route, indices):
    """Every token lies in exactly one used tile, each tile holds one adapter per slot and at most
    block_m rows, and unused capacity is empty and routes nowhere."""
    tiles = route.tiles.tolist()
    used = [t for t in tiles if t[1] > t[0]]
    rows = torch.cat([torch.arange(s, e) for s, e, _, _ in used]) if used else torch.zeros(0, dtype=torch.int64)
    assert torch.equal(rows, torch.arange(indices[0].shape[0]))
    for s, e, a0, a1 in used:
        assert e - s <= route.block_m
        toks = route.tokens[s:e]
        assert set(indices[0][toks].tolist()) == {a0}
        assert set(indices[1][toks].tolist()) == {a1} if len(indices) > 1 else a1 == -1
    assert all(t == [0, 0, -1, -1] for t in tiles if t[1] == t[0])
    # the route groups tokens, so fewer tiles than the capacity would mean a wasteful bound only
    assert len(used) <= len(tiles) <= max(1, indices[0].shape[0])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tok", [1, 63, 200])
def test_device_route_tiles_cover_every_token_once(pattern, n_tok):
    """The sync-free route (fixed capacity, empty unused tiles) for one and two token-routed slots."""
    g = torch.Generator().manual_seed(n_tok)
    x = torch.randn(n_tok, 8)
    idx0 = _pattern(pattern, n_tok, 9, g)
    idx1 = _pattern("with_none", n_tok, 2, g)
    m0, m1 = build_lora_meta(idx0), build_lora_meta(idx1)
    _assert_tiles_cover(ml._route((m0,), x), [idx0])
    _assert_tiles_cover(ml._route((m0, m1), x), [idx0, idx1])
    for chunk in (8, 64):
        _assert_tiles_cover(ml._slot_route(m0, n_tok, x.device, chunk), [idx0])


@pytest.mark.parametrize("seq", [1, 5, 40])
def test_device_route_of_row_routings_within_its_capacity(seq):
    """Per-sequence routing: the capacity bound (rows, adapters) holds for decode and prefill."""
    rows = torch.tensor([3, 3, -1, 0, 7, 3, 1, 1, -1, 5, 6, 2, 4, 4, 0, 7, 3, 2])
    diff, dit = RowRouting(rows, 8), RowRouting(torch.where(rows == 1, -1, 0), 1)
    x = torch.randn(rows.numel() * seq, 8)
    tok = [r.index[:, None].expand(-1, seq).reshape(-1) for r in (diff, dit)]
    route = ml._route((diff, dit), x)
    assert route.block_m == (16 if seq <= 16 else 64)
    _assert_tiles_cover(route, tok)
    _assert_tiles_cover(ml._route((diff,), x), tok[:1])


def test_empty_batch():
    g = torch.Generator().manual_seed(20)
    x = torch.randn(0, 16, generator=g).requires_grad_()
    A, B, scale = _slot(2, 4, 16, 8, g)
    y = multi_lora(x, A, B, scale, build_lora_meta(torch.zeros(0, dtype=torch.int64)), backend="triton")
    assert y.shape == (0, 8)
    gx, gA, gB = torch.autograd.grad(y.sum(), (x, A, B))
    assert gx.shape == (0, 16) and torch.count_nonzero(gA) == 0 and torch.count_nonzero(gB) == 0


def test_cpu_auto_takes_reference_and_torch_backend_matches():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(10, 16, generator=g)
    A, B, scale = _slot(2, 2, 16, 8, g, grad=False)
    meta = build_lora_meta(_pattern("uniform", 10, 2, g))
    auto = multi_lora(x, A, B, scale, meta)
    assert torch.equal(auto, multi_lora_ref(x, A, B, scale, meta))
    assert torch.equal(multi_lora(x, A, B, scale, meta, backend="torch"), auto)
    both = multi_lora_sum(x, [(A, B, scale, meta), (A, B, scale, meta)], backend="torch")
    assert torch.allclose(both, 2 * auto)


def test_bad_shapes_name_what_was_expected():
    x = torch.randn(5, 16)
    A, B = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    meta = build_lora_meta(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected \[n, r, 12\]"):
        multi_lora(torch.randn(5, 12), A, B, torch.ones(2), meta, backend="triton")
    with pytest.raises(ValueError, match="metadata is for 5 tokens, x has 4"):
        multi_lora(x[:4], A, B, torch.ones(2), meta, backend="triton")
    with pytest.raises(ValueError, match="disagree on d_out"):
        multi_lora_sum(x, [(A, B, torch.ones(2), meta), (A, torch.randn(2, 9, 4), torch.ones(2), meta)])
    with pytest.raises(ValueError, match="backend argument is 'cuda'"):
        multi_lora(x, A, B, torch.ones(2), meta, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_compiled_kernels(pattern, dtype):
    """The compiled kernels at a realistic size, two slots, against the fp64 oracle on CPU."""
    g = torch.Generator().manual_seed(19)
    n_tok, d_in, d_out, n = 577, 1000, 1536, 33
    x = torch.randn(n_tok, d_in, generator=g).to(dtype).requires_grad_()
    A0, B0, s0 = _slot(n, 16, d_in, d_out, g, dtype=dtype, mixed_ranks=True)
    A1, B1, s1 = _slot(1, 64, d_in, d_out, g, dtype=dtype)
    idx0, idx1 = _pattern(pattern, n_tok, n, g), _pattern("with_none", n_tok, 1, g)
    cpu_leaves = [x, A0, B0, A1, B1]
    gpu_leaves = [t.detach().cuda().requires_grad_() for t in cpu_leaves]
    xg, A0g, B0g, A1g, B1g = gpu_leaves
    metas = [build_lora_meta(idx0.cuda()), build_lora_meta(idx1.cuda())]
    slots = [(A0g, B0g, s0.cuda(), metas[0]), (A1g, B1g, s1.cuda(), metas[1])]
    y = multi_lora_sum(xg, slots, backend="triton")
    y_ref = _oracle(x, [(A0, B0, s0, idx0), (A1, B1, s1, idx1)])
    tol = 10 * TOL[dtype]  # TF32 / half-precision tensor cores
    assert _rel(y.cpu(), y_ref) < tol
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, gpu_leaves, dy.to(y.dtype).cuda())
    want = torch.autograd.grad(y_ref, cpu_leaves, dy)
    for a, b in zip(got, want):
        assert _rel(a.cpu(), b) < tol


# ---- per-sequence routing: one entry, every backend ------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows", ["distinct", "shared", "with_none"])
def test_row_routing_matches_the_oracle_on_every_backend(backend, rows):
    """multi_lora_sum with a per-sequence RowRouting (the model's common case) against the fp64
    per-token oracle, forward and gradients, on the plain-torch path (gathered weights, bmm, or two
    GEMMs for a shared adapter) and on the Triton path."""
    g = torch.Generator().manual_seed(7)
    batch, seq, d_in, d_out = 5, 3, 63, 37
    row_idx = {"distinct": torch.tensor([3, 0, 2, 1, 4]), "shared": torch.full((5,), 2),
               "with_none": torch.tensor([1, -1, 1, 4, -1])}[rows]
    A, B, scale = _slot(5, 4, d_in, d_out, g)
    A1, B1, scale1 = _slot(1, 2, d_in, d_out, g)
    x = torch.randn(batch * seq, d_in, generator=g, dtype=torch.float64).float().requires_grad_(True)
    routing, shared = RowRouting(row_idx, 5), RowRouting(torch.zeros(batch, dtype=torch.int64), 1)
    y = multi_lora_sum(x, [(A, B, scale, routing), (A1, B1, scale1, shared)], backend=backend)
    tok = row_idx[:, None].expand(batch, seq).reshape(-1)
    want = _oracle(x, [(A, B, scale, tok), (A1, B1, scale1, torch.zeros(batch * seq, dtype=torch.int64))])
    assert _rel(y, want) < TOL[torch.float32]
    dy = torch.randn_like(want)
    got = torch.autograd.grad(y, (x, A, B, A1, B1), dy.float())
    ref = torch.autograd.grad(want, (x, A, B, A1, B1), dy)
    for a, b in zip(got, ref):
        assert _rel(a, b) < TOL[torch.float32]


@pytest.mark.parametrize("rows", ["distinct", "shared", "with_none"])
def test_bf16_training_rows_compute_in_bf16_and_match_the_oracle(rows, monkeypatch):
    """A bf16 slot trained on bf16 activations takes the CPU path that keeps the product in bf16
    (no fp32 conversions); its values and gradients are the fp64 oracle's to bf16 precision, and
    the same slot frozen (inference) still takes the fp32 reference."""
    g = torch.Generator().manual_seed(11)
    batch, seq, d_in, d_out = 5, 4, 48, 40
    row_idx = {"distinct": torch.tensor([3, 0, 2, 1, 4]), "shared": torch.full((5,), 2),
               "with_none": torch.tensor([1, -1, 1, 4, -1])}[rows]
    A, B, scale = _slot(5, 4, d_in, d_out, g, dtype=torch.bfloat16)
    x = torch.randn(batch * seq, d_in, generator=g).bfloat16().requires_grad_(True)
    calls = []
    rows_ref = ml.multi_lora_rows_ref
    monkeypatch.setattr(ml, "multi_lora_rows_ref", lambda *a, **k: calls.append(k["dtype"]) or rows_ref(*a, **k))
    y = multi_lora_sum(x, [(A, B, scale, RowRouting(row_idx, 5))], backend="torch")
    assert calls == [torch.bfloat16] and y.dtype == torch.bfloat16
    tok = row_idx[:, None].expand(batch, seq).reshape(-1)
    want = _oracle(x, [(A, B, scale, tok)])
    assert _rel(y, want) < TOL[torch.bfloat16]
    dy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, A, B), dy.bfloat16())
    ref = torch.autograd.grad(want, (x, A, B), dy)
    for a, b, leaf in zip(got, ref, (x, A, B)):
        assert a.dtype == leaf.dtype and _rel(a, b) < TOL[torch.bfloat16]
    calls.clear()
    with torch.no_grad():
        frozen = multi_lora_sum(x, [(A, B, scale, RowRouting(row_idx, 5))], backend="torch")
    assert calls == [torch.float32] and _rel(frozen, want) < TOL[torch.bfloat16]


def test_row_routing_gathers_frozen_weights_once_per_batch():
    g = torch.Generator().manual_seed(3)
    A, B, scale = _slot(4, 2, 16, 8, g, grad=False)
    routing = RowRouting(torch.tensor([1, 0, 3]), 4)
    x = torch.randn(3 * 2, 16, generator=g)
    first = multi_lora_sum(x, [(A, B, scale, routing)], backend="torch")
    cached = [k for k in routing.cache if k[0] == "rows"]
    assert len(cached) == 1
    gathered = routing.cache[cached[0]][2]
    second = multi_lora_sum(x[:3], [(A, B, scale, routing)], backend="torch")  # a decode step: seq 1
    assert routing.cache[cached[0]][2] is gathered
    assert _rel(second, multi_lora_ref(x[:3], A, B, scale, build_lora_meta(torch.tensor([1, 0, 3]), 4))) < 1e-6
    assert _rel(first, multi_lora_ref(x, A, B, scale, build_lora_meta(torch.tensor([1, 1, 0, 0, 3, 3]), 4))) < 1e-6
    At, Bt, _ = _slot(4, 2, 16, 8, g, grad=True)
    multi_lora_sum(x, [(At, Bt, scale, routing)], backend="torch")
    assert len([k for k in routing.cache if k[0] == "rows"]) == 1  # trainable weights are never cached


def test_row_routing_refuses_tokens_that_do_not_split_into_its_rows():
    g = torch.Generator().manual_seed(3)
    A, B, scale = _slot(2, 2, 8, 4, g)
    with pytest.raises(ValueError, match="7 tokens do not split into the 3 routed rows"):
        multi_lora_sum(torch.randn(7, 8), [(A, B, scale, RowRouting(torch.tensor([0, 1, 0]), 2))], backend="torch")


def test_a_dropped_batch_frees_its_routes_plans_and_buffers_without_the_cycle_collector():
    """Routes, launch plans and the inference scratch live in the routing's cache and hold no
    reference back to it: dropping the batch frees them at once (GPU memory is not left to gc)."""
    g = torch.Generator().manual_seed(21)
    A, B, scale = _slot(3, 4, 16, 8, g, grad=False)
    x = torch.randn(6, 16, generator=g)
    gc.disable()
    try:
        routing, shared = RowRouting(torch.tensor([2, 0, -1]), 3), RowRouting(torch.zeros(3, dtype=torch.int64), 3)
        with torch.no_grad():
            multi_lora_sum(x, [(A, B, scale, routing), (A, B, scale, shared)], backend="triton")
        route = ml._route((routing, shared), x)
        assert route.scratch, "inference keeps its S buffer on the route"
        buf = next(iter(route.scratch.values()))[0]
        alive = [weakref.ref(t) for t in (route.tokens, route.tiles, buf)]
        del routing, shared, route, buf
        assert [r() for r in alive] == [None] * len(alive)
    finally:
        gc.enable()


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_adds_the_delta_into_the_base_output_in_place(backend, grad):
    """``out=``: the delta lands in the caller's buffer (on the Triton inference path the expand
    adds into it; rows of tokens without any adapter are not touched), gradients flow through."""
    g = torch.Generator().manual_seed(22)
    batch, seq, d_in, d_out = 5, 3, 40, 70
    A, B, scale = _slot(4, 4, d_in, d_out, g, grad=grad)
    A1, B1, scale1 = _slot(1, 8, d_in, d_out, g, grad=False)
    rows, dit = torch.tensor([1, -1, 3, 0, -1]), torch.tensor([0, -1, 0, -1, 0])  # row 1: no adapter at all
    slots = [(A, B, scale, RowRouting(rows, 4)), (A1, B1, scale1, RowRouting(dit, 1))]
    x = torch.randn(batch * seq, d_in, generator=g)
    base = torch.randn(batch * seq, d_out, generator=g)
    with torch.set_grad_enabled(grad):
        want = base + multi_lora_sum(x, slots, backend=backend)
        y = base.clone().requires_grad_(grad)
        target = y.clone() if grad else y  # autograd: in place on a non-leaf, as the model's F.linear output
        got = multi_lora_sum(x, slots, backend=backend, out=target)
    assert got is target
    assert _rel(got, want) < 1e-6
    none = torch.repeat_interleave((rows == -1) & (dit == -1), seq)
    assert none.sum() == seq and torch.equal(got[none], base[none])
    if grad:
        ga, ref = torch.autograd.grad(got.square().sum(), (A, y)), torch.autograd.grad(want.square().sum(), A)
        assert _rel(ga[0], ref[0]) < 1e-5 and _rel(ga[1], 2 * got.detach()) < 1e-6
    with pytest.raises(ValueError, match=r"out is \(15, 69\) on cpu, expected \[15, 70\]"):
        multi_lora_sum(x, slots, backend=backend, out=torch.zeros(15, 69))

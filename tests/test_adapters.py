"""Adapter slots and the multi-LoRA reference op.

``LoraSlot.create`` initialisations, row selection and validation; ``build_lora_meta`` invariants on
odd adapter-popularity patterns; ``multi_lora_ref`` in both of its regimes (per-token gather + bmm,
per-adapter segments) against an fp64 einsum over per-token gathered A and B, forward and backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err as _rel
from conftest import tiny_config

from dit_engine.adapters import AdapterBatch, AdapterError, LoraSlot
from dit_engine.config import ConfigError
from dit_kernels.multi_lora import build_lora_meta, multi_lora, multi_lora_ref
from dit_engine.model import Transformer


def _pattern(kind: str, n_tokens: int, n_adapters: int, seed: int = 0) -> torch.Tensor:  # [N] int64
    """Token -> adapter maps with different popularity; 'holes' variants put -1 on ~1/5 of tokens."""
    g = torch.Generator().manual_seed(seed)
    base, holes = kind.removesuffix("+holes"), kind.endswith("+holes")
    if base == "identical":
        idx = torch.full((n_tokens,), n_adapters - 1, dtype=torch.int64)
    elif base == "distinct":
        idx = torch.randperm(n_adapters, generator=g)[:n_tokens]
    elif base == "uniform":
        idx = torch.randint(0, n_adapters, (n_tokens,), generator=g)
    elif base == "zipf":
        w = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64)
        idx = torch.multinomial(w, n_tokens, replacement=True, generator=g)
    elif base == "skewed":  # one adapter takes ~90%, a few stragglers
        idx = torch.where(torch.rand(n_tokens, generator=g) < 0.9, 3 % n_adapters,
                          torch.randint(0, n_adapters, (n_tokens,), generator=g))
    elif base == "none":
        idx = torch.full((n_tokens,), -1, dtype=torch.int64)
    else:
        raise AssertionError(kind)
    if holes:
        idx = torch.where(torch.rand(n_tokens, generator=g) < 0.2, -1, idx)
    return idx.to(torch.int64)


PATTERNS = ["identical", "distinct", "uniform", "zipf", "skewed", "none",
            "identical+holes", "distinct+holes", "zipf+holes", "skewed+holes"]


# ---- LoraSlot.create ----------------------------------------------------------------------------


def test_create_peft_init_zero_B_leaves_model_unchanged():
    cfg = tiny_config("qwen2")
    s = LoraSlot.create(cfg, 3, 4, init="peft", generator=torch.Generator().manual_seed(0))
    assert set(s.A) == set(cfg.module_names()) and len(s.A) == 7 * cfg.num_hidden_layers
    shapes = cfg.linear_shapes()
    for name, a in s.A.items():
        d_in, d_out = shapes[name.rsplit(".", 1)[1]]
        assert a.shape == (3, 4, d_in) and s.B[name].shape == (3, d_out, 4)
        assert torch.count_nonzero(s.B[name]) == 0
        assert torch.count_nonzero(a) == a.numel()
        assert float(a.abs().max()) <= 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) bound
    m = Transformer.random(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m(ids, AdapterBatch(s)), m(ids))


def test_create_dit_init_zero_A_leaves_model_unchanged():
    cfg = tiny_config("qwen3")
    s = LoraSlot.create(cfg, 2, 8, init="dit", generator=torch.Generator().manual_seed(0))
    for name, a in s.A.items():
        assert torch.count_nonzero(a) == 0
        b = s.B[name]
        assert torch.count_nonzero(b) == b.numel()
        assert float(b.abs().max()) <= 1.0 / math.sqrt(8)
    m = Transformer.random(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m(ids, AdapterBatch(s)), m(ids))


def test_create_defaults_and_options():
    cfg = tiny_config()
    s = LoraSlot.create(cfg, 5, 4)
    assert s.scale.tolist() == [0.25] * 5  # alpha = 1: scale = 1 / r, as the DIT paper
    assert s.index.tolist() == [0, 1, 2, 3, 4] and s.index.dtype == torch.int64
    assert s.n_adapters == 5 and s.rank == 4 and not s.trainable
    t = LoraSlot.create(cfg, 2, 3, scale=2.0, targets=("k_proj", "down_proj"), trainable=True,
                        index=torch.tensor([1, -1, 0], dtype=torch.int32), dtype=torch.bfloat16)
    assert t.scale.tolist() == [2.0, 2.0] and t.trainable
    assert sorted(t.A) == sorted(n for n in cfg.module_names() if n.endswith(("k_proj", "down_proj")))
    assert all(a.dtype == torch.bfloat16 and a.requires_grad and a.is_leaf for a in t.parameters())
    assert t.index.dtype == torch.int64
    assert len(t.parameters()) == 2 * len(t.A)


def test_create_rejects_unknown_init_and_target():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        LoraSlot.create(cfg, 1, 2, init="xavier")
    with pytest.raises(ConfigError, match=r"unknown target module\(s\) \['qkv_proj'\]"):
        LoraSlot.create(cfg, 1, 2, targets=("q_proj", "qkv_proj"))


def test_create_is_reproducible_with_a_generator():
    cfg = tiny_config()
    a = LoraSlot.create(cfg, 2, 3, init="random", generator=torch.Generator().manual_seed(5))
    b = LoraSlot.create(cfg, 2, 3, init="random", generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ---- select_rows --------------------------------------------------------------------------------


def test_select_rows_picks_index_rows_and_shares_weights():
    cfg = tiny_config()
    s = LoraSlot.create(cfg, 3, 2, index=torch.tensor([2, -1, 0, 1]))
    sub = s.select_rows(torch.tensor([3, 0, 0]))
    assert sub.index.tolist() == [1, 2, 2]
    assert all(sub.A[n] is s.A[n] and sub.B[n] is s.B[n] for n in s.A)  # no weight copies
    assert s.index.tolist() == [2, -1, 0, 1]  # the original is untouched
    per_tok = s.with_index(torch.arange(8).view(4, 2) % 3 - 1)
    assert per_tok.select_rows(torch.tensor([2])).index.tolist() == [[0, 1]]
    shared = LoraSlot.create(cfg, 1, 2, index=torch.zeros(4, dtype=torch.int64))
    both = AdapterBatch(s, shared).select_rows(torch.tensor([1, 2]))
    assert [x.index.tolist() for x in both.slots] == [[-1, 0], [0, 0]]


# ---- validate -----------------------------------------------------------------------------------


def _slot(cfg, n=2, r=3, **kw):
    return LoraSlot.create(cfg, n, r, name="diff", **kw)


Q0 = "model.layers.0.self_attn.q_proj"
D1 = "model.layers.1.mlp.down_proj"


def _broken(kind: str):
    cfg = tiny_config()
    s = _slot(cfg)
    if kind == "A without B":
        del s.B[Q0]
        return cfg, s, rf"diff: modules with A but no B .*{Q0}"
    if kind == "unknown module":
        s.A["model.layers.0.self_attn.qkv_proj"] = s.A[Q0]
        s.B["model.layers.0.self_attn.qkv_proj"] = s.B[Q0]
        return cfg, s, r"diff: model.layers.0.self_attn.qkv_proj is not a linear layer of this model \(tiny-llama\)"
    if kind == "A d_in":
        s.A[D1] = torch.zeros(2, 3, 48)
        return cfg, s, rf"diff: {D1} A has shape \(2, 3, 48\), expected \[2, r, 80\]"
    if kind == "A n":
        s.A[Q0] = torch.zeros(3, 3, 48)
        return cfg, s, rf"diff: {Q0} A has shape \(3, 3, 48\), expected \[2, r, 48\]"
    if kind == "B d_out":
        s.B[D1] = torch.zeros(2, 80, 3)
        return cfg, s, rf"diff: {D1} B has shape \(2, 80, 3\), expected \[2, 48, 3\]"
    if kind == "B rank":
        s.B[Q0] = torch.zeros(2, 48, 4)
        return cfg, s, rf"diff: {Q0} B has shape \(2, 48, 4\), expected \[2, 48, 3\]"
    if kind == "scale":
        s.scale = torch.ones(3)
        # n_adapters is read from scale, so the mismatch may be reported on either side of it.
        return cfg, s, r"diff: .*(scale has shape \(3,\), expected \[2\]|A has shape \(2, 3, 48\), expected \[3, r, 48\])"
    if kind == "index batch":
        s.index = torch.tensor([0, 1, 1])
        return cfg, s, r"diff: index has shape \(3,\), expected \[2\] or \[2, 5\]"
    if kind == "index seq":
        s.index = torch.zeros(2, 4, dtype=torch.int64)
        return cfg, s, r"diff: index has shape \(2, 4\), expected \[2\] or \[2, 5\]"
    if kind == "index high":
        s.index = torch.tensor([0, 2])
        return cfg, s, r"diff: index values must lie in \[-1, 1\], found \[0, 2\]"
    if kind == "index low":
        s.index = torch.tensor([-2, 0])
        return cfg, s, r"diff: index values must lie in \[-1, 1\], found \[-2, 0\]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["A without B", "unknown module", "A d_in", "A n", "B d_out", "B rank",
                                  "scale", "index batch", "index seq", "index high", "index low"])
def test_validate_errors_name_slot_module_and_shapes(kind):
    cfg, s, msg = _broken(kind)
    with pytest.raises(AdapterError, match=msg):
        AdapterBatch(_slot(cfg), s).validate(cfg, 2, 5)


def test_validate_accepts_good_slots():
    cfg = tiny_config("qwen3")
    AdapterBatch(_slot(cfg, index=torch.tensor([1, -1])),
                 _slot(cfg, index=torch.tensor([[0, -1, 1, 1, 0], [1, 1, 1, 1, 1]]))).validate(cfg, 2, 5)


# ---- build_lora_meta ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [1, 63, 577])
@pytest.mark.parametrize("kind", PATTERNS)
def test_build_lora_meta_invariants(kind, n_tokens):
    n_adapters = max(n_tokens, 7) if kind.startswith("distinct") else 7
    idx = _pattern(kind, n_tokens, n_adapters, seed=n_tokens)
    meta = build_lora_meta(idx, n_adapters)
    routed = [t for t in range(n_tokens) if idx[t] >= 0]
    st = meta.sorted_tokens.tolist()
    # A permutation of the routed tokens, grouped by adapter id ascending, stable inside a group.
    assert sorted(st) == routed and meta.num_routed == len(routed)
    assert st == sorted(routed, key=lambda t: (int(idx[t]), t))
    want_active = sorted({int(i) for i in idx if i >= 0})
    assert meta.active.tolist() == list(meta.active_list) == want_active
    counts = [int((idx == a).sum()) for a in want_active]
    assert meta.counts.tolist() == list(meta.counts_list) == counts
    starts = [sum(counts[:k]) for k in range(len(counts))]
    assert meta.starts.tolist() == list(meta.starts_list) == starts
    for a, s, c in zip(want_active, starts, counts):
        assert all(int(idx[t]) == a for t in st[s : s + c])
    assert meta.num_tokens == n_tokens and meta.max_count == max(counts, default=0)
    assert meta.token_index.tolist() == idx.tolist()


def test_build_lora_meta_errors():
    with pytest.raises(ValueError, match=r"token_index must be 1-D \[num_tokens\], got shape \(2, 3\)"):
        build_lora_meta(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="refers to adapter 4 but only 4 are stacked"):
        build_lora_meta(torch.tensor([0, 4, 1]), 4)
    with pytest.raises(ValueError, match="token_index has -3; use -1"):
        build_lora_meta(torch.tensor([0, -3]))


def test_build_lora_meta_empty_batch():
    meta = build_lora_meta(torch.zeros(0, dtype=torch.int64), 3)
    assert meta.num_tokens == 0 and meta.num_routed == 0 and meta.active_list == () and meta.max_count == 0


# ---- multi_lora_ref vs an fp64 einsum -----------------------------------------------------------


def _einsum_ref(x, A, B, scale, idx):  # x [N, d_in], A [n, r, d_in], B [n, d_out, r], idx [N] -> [N, d_out] fp64
    safe = idx.clamp_min(0)
    a, b = A.double()[safe], B.double()[safe]  # per token: [N, r, d_in], [N, d_out, r]
    y = torch.einsum("nor,nrd,nd->no", b, a, x.double()) * scale.double()[safe][:, None]
    return y * (idx >= 0).double()[:, None]


def _weights(n, r, d_in, d_out, seed, ranks=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, d_in, generator=g) / math.sqrt(d_in)
    B = torch.randn(n, d_out, r, generator=g) / math.sqrt(r)
    if ranks is not None:  # mixed ranks zero-padded to the slot's max rank
        for i, ri in enumerate(ranks):
            A[i, ri:], B[i, :, ri:] = 0, 0
    scale = torch.rand(n, generator=g) + 0.5
    return A, B, scale


# (pattern, tokens, adapters): "distinct" and "distinct+holes" route at most one token per adapter
# (the gather + bmm regime of multi_lora_ref); the rest put many tokens on few adapters (segments).
CASES = [
    ("distinct", 63, 80), ("distinct+holes", 123, 123), ("identical", 577, 5), ("uniform", 577, 7),
    ("zipf+holes", 123, 9), ("skewed", 63, 7), ("none", 63, 4), ("identical+holes", 1, 3),
]


@pytest.mark.parametrize("kind,n_tokens,n", CASES, ids=[f"{k}-{t}x{n}" for k, t, n in CASES])
def test_multi_lora_ref_matches_fp64_einsum(kind, n_tokens, n):
    d_in, d_out, r = 63, 123, 8
    ranks = [(i % r) + 1 for i in range(n)]
    A, B, scale = _weights(n, r, d_in, d_out, seed=n_tokens, ranks=ranks)
    x = torch.randn(n_tokens, d_in, generator=torch.Generator().manual_seed(1))
    idx = _pattern(kind, n_tokens, n, seed=3)
    meta = build_lora_meta(idx, n)
    out = multi_lora_ref(x, A, B, scale, meta)
    ref = _einsum_ref(x, A, B, scale, idx)
    assert out.shape == (n_tokens, d_out) and out.dtype == torch.float32
    assert torch.all(out[idx < 0] == 0)  # no adapter: exactly zero, not merely small
    if meta.num_routed:
        assert _rel(out, ref) < 1e-5
    torch.testing.assert_close(multi_lora(x, A, B, scale, meta), out, rtol=0, atol=0)


def test_cases_cover_both_regimes():
    # multi_lora_ref switches to per-token gather when tokens per adapter are few; the CASES above
    # must keep exercising both sides of that switch.
    sides = set()
    for kind, n_tokens, n in CASES:
        meta = build_lora_meta(_pattern(kind, n_tokens, n, seed=3), n)
        if meta.num_routed:
            sides.add(meta.max_count == 1)
    assert sides == {True, False}


@pytest.mark.parametrize("kind", ["distinct+holes", "zipf+holes"])
def test_multi_lora_ref_gradients_match_fp64_autograd(kind):
    n_tokens, n, d_in, d_out, r = 63, 70 if kind.startswith("distinct") else 5, 63, 123, 4
    A, B, scale = _weights(n, r, d_in, d_out, seed=4, ranks=[(i % r) + 1 for i in range(n)])
    x = torch.randn(n_tokens, d_in, generator=torch.Generator().manual_seed(5))
    idx = _pattern(kind, n_tokens, n, seed=6)
    gy = torch.randn(n_tokens, d_out, generator=torch.Generator().manual_seed(7))
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    (multi_lora_ref(*leaves, scale, build_lora_meta(idx, n)) * gy).sum().backward()
    leaves64 = [t.double().requires_grad_(True) for t in (x, A, B)]
    (_einsum_ref(*leaves64, scale, idx) * gy.double()).sum().backward()
    for name, got, want in zip(("dx", "dA", "dB"), leaves, leaves64):
        assert _rel(got.grad, want.grad) < 1e-5, name


def test_multi_lora_ref_bf16_within_bf16_tolerance():
    n_tokens, n, d_in, d_out, r = 123, 6, 63, 123, 8
    A, B, scale = _weights(n, r, d_in, d_out, seed=8)
    x = torch.randn(n_tokens, d_in, generator=torch.Generator().manual_seed(9))
    idx = _pattern("zipf+holes", n_tokens, n, seed=10)
    out = multi_lora_ref(x.bfloat16(), A.bfloat16(), B.bfloat16(), scale, build_lora_meta(idx, n))
    assert out.dtype == torch.bfloat16
    assert _rel(out, _einsum_ref(x, A, B, scale, idx)) < 1e-2


@pytest.mark.parametrize("bad", ["x 3-D", "d_in", "B n", "B rank", "scale", "meta tokens"])
def test_multi_lora_ref_shape_errors(bad):
    A, B, scale = _weights(3, 4, 10, 6, seed=0)
    x = torch.randn(5, 10)
    meta = build_lora_meta(torch.tensor([0, 1, 2, -1, 0]), 3)
    msg = {"x 3-D": r"expects x \[N, d_in\]", "d_in": r"expected \[n, r, 9\]", "B n": r"expected \[3, d_out, 4\]",
           "B rank": r"expected \[3, d_out, 4\]", "scale": r"scale must be \[3\], got \(2,\)",
           "meta tokens": "metadata is for 5 tokens, x has 4"}[bad]
    args = {"x 3-D": (x[None], A, B, scale, meta), "d_in": (x[:, :9], A, B, scale, meta),
            "B n": (x, A, B[:2], scale, meta), "B rank": (x, A, B[..., :3], scale, meta),
            "scale": (x, A, B, scale[:2], meta), "meta tokens": (x[:4], A, B, scale, meta)}[bad]
    with pytest.raises(ValueError, match=msg):
        multi_lora_ref(*args)


# ---- BoundAdapters ------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["row", "token"])
def test_bound_adapters_sum_slot_deltas(routing):
    """Both slots' deltas summed, for per-sequence routing (index [batch]) and per-token routing
    (index [batch, seq]), which may take different code paths."""
    cfg = tiny_config()
    g = torch.Generator().manual_seed(11)
    idx0 = torch.tensor([2, -1]) if routing == "row" else torch.tensor([[0, 2, -1], [1, 1, 0]])
    s0 = LoraSlot.create(cfg, 3, 4, init="random", generator=g, index=idx0)
    s1 = LoraSlot.create(cfg, 1, 2, init="random", generator=g, targets=("v_proj",), index=torch.tensor([0, -1]))
    bound = AdapterBatch(s0, s1).bind(2, 3)
    x = torch.randn(6, cfg.hidden_size, generator=g)
    tok0 = (idx0[:, None].expand(2, 3) if routing == "row" else idx0).reshape(-1)  # [6] per-token ids
    tok1 = torch.tensor([0, 0, 0, -1, -1, -1])
    v0 = "model.layers.0.self_attn.v_proj"
    want = _einsum_ref(x, s0.A[v0], s0.B[v0], s0.scale, tok0) + _einsum_ref(x, s1.A[v0], s1.B[v0], s1.scale, tok1)
    got = bound.delta(v0, x)
    assert got.shape == (6, cfg.linear_shapes()["v_proj"][1]) and got.dtype == x.dtype
    assert _rel(got, want) < 1e-5
    q0 = "model.layers.0.self_attn.q_proj"  # slot 1 does not adapt q_proj: slot 0 alone
    assert _rel(bound.delta(q0, x), _einsum_ref(x, s0.A[q0], s0.B[q0], s0.scale, tok0)) < 1e-5
    only_v = AdapterBatch(s1).bind(2, 3)
    assert only_v.delta(q0, x) is None  # no slot adapts it: the linear skips the LoRA work


def test_scale_of_the_wrong_length_is_named_as_such():
    cfg = tiny_config("llama")
    slot = LoraSlot.create(cfg, 3, 2)
    slot.scale = torch.ones(2)
    with pytest.raises(AdapterError, match=r"scale has shape \(2,\), expected \[3\]"):
        slot.validate(cfg, 3)


def test_slot_to_and_detach():
    cfg = tiny_config("llama")
    slot = LoraSlot.create(cfg, 3, 2, init="random", name="s")
    moved = slot.to("cpu", torch.bfloat16, trainable=True)
    assert moved.name == "s" and moved.index.dtype == torch.int64 and moved.scale.dtype == torch.float32
    for name in slot.A:
        assert moved.A[name].dtype == torch.bfloat16 and moved.A[name].requires_grad and moved.A[name].is_leaf
        assert torch.equal(moved.B[name].float(), slot.B[name].bfloat16().float())
    assert not any(t.requires_grad for t in slot.parameters())  # the original is untouched
    loss = sum((t.float() ** 2).sum() for t in moved.parameters())
    loss.backward()
    assert all(t.grad is not None for t in moved.parameters())
    frozen = moved.detach()
    assert not frozen.trainable and all(torch.equal(a, b) for a, b in zip(frozen.parameters(), moved.parameters()))
    assert slot.to(dtype=torch.float32).A[next(iter(slot.A))] is slot.A[next(iter(slot.A))]  # no-op keeps tensors

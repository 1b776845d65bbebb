"""The transformer runtime against an independent fp64 reference written here from the papers/HF docs.

The reference (``_ref_*`` below) shares no code with ``dit_engine.model``: it reads an HF-style state
dict and config dict and computes RMSNorm, RoPE (rotation of (i, i + d/2) pairs, inv_freq from the
RoPE / Llama-3 formulas), attention as an explicit softmax(QK^T / sqrt(d)) per head with the GQA
head -> kv-head map, and SwiGLU, all in float64. LoRA deltas are added per token from gathered
A/B with einsum, so per-token adapter routing has its own oracle.

Covered: each layer alone, the full forward of every family variant, padding, KV-cache decoding vs
full recompute (with row compaction), context overflow, multi-LoRA forward and gradients vs merged
weights ``W + scale * B @ A``, and adapter validation errors.
"""

from __future__ import annotations

import math

import numpy_reference
import pytest
import torch
from conftest import rel_err as _rel
from conftest import tiny_config

from dit_engine.adapters import AdapterBatch, AdapterError, LoraSlot
from dit_engine.cache import KVCache
from dit_engine.config import TARGET_MODULES, ModelConfig
from dit_kernels.rope import apply_rope
from dit_engine.model import Transformer, _attention

_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 8.0,
    # With head_dim 12 and theta 1e4 the wavelengths are 6.3, 29, 135, 628, 2924, 13539: against
    # 200 / 8 = 25 and 200 / 1 = 200 this puts one frequency in the kept band, two in the smoothed
    # band and three in the divided band, so every branch of the formula is exercised.
    "original_max_position_embeddings": 200,
}

FAMILIES = {
    "llama-tied": lambda: tiny_config("llama"),
    "llama-untied": lambda: tiny_config("llama", tie_word_embeddings=False),
    "llama-bias": lambda: tiny_config("llama", attention_bias=True),
    "llama-mqa": lambda: tiny_config("llama", num_key_value_heads=1),
    "llama3-rope": lambda: tiny_config("llama", rope_scaling=_LLAMA3_SCALING),
    "llama-linear-rope": lambda: tiny_config("llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "qwen2": lambda: tiny_config("qwen2"),
    "qwen2-tied": lambda: tiny_config("qwen2", tie_word_embeddings=True),
    "qwen3": lambda: tiny_config("qwen3"),
    "qwen3-bias-untied": lambda: tiny_config("qwen3", attention_bias=True, tie_word_embeddings=False),
}


# ---- the independent fp64 reference -------------------------------------------------------------


def _ref_inv_freq(cfg: dict) -> list[float]:
    """RoPE frequencies; Llama-3 scaling as in Meta's reference loop (per frequency, three bands)."""
    hd = cfg["head_dim"]
    base = [1.0 / cfg["rope_theta"] ** (i / hd) for i in range(0, hd, 2)]
    rs = cfg.get("rope_scaling")
    if not rs:
        return base
    kind = rs.get("rope_type", rs.get("type"))
    factor = rs["factor"]
    if kind == "linear":
        return [f / factor for f in base]
    assert kind == "llama3"
    low, high, old = rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def _ref_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:  # x: [..., d]
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _ref_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: list[float]) -> torch.Tensor:
    """x: [T, H, hd]; rotate each pair (i, i + hd/2) by angle position * inv_freq[i]."""
    half = x.shape[-1] // 2
    ang = positions.double()[:, None] * torch.tensor(inv_freq, dtype=torch.float64)[None]  # [T, hd/2]
    c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]  # [T, 1, hd/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _ref_linear(state: dict, name: str, x: torch.Tensor, loras) -> torch.Tensor:  # x: [T, d_in]
    y = x @ state[name + ".weight"].T
    if name + ".bias" in state:
        y = y + state[name + ".bias"]
    for A, B, scale, idx in loras:  # idx: [T], -1 = none
        if name not in A:
            continue
        safe = idx.clamp_min(0)
        a, b = A[name].double()[safe], B[name].double()[safe]  # [T, r, d_in], [T, d_out, r]
        d = torch.einsum("tor,trd,td->to", b, a, x) * scale.double()[safe][:, None]
        y = y + d * (idx >= 0).double()[:, None]
    return y


def _ref_attention(cfg: dict, state: dict, p: str, x: torch.Tensor, positions, loras) -> torch.Tensor:
    """One causal self-attention block on one unpadded sequence x: [T, h]."""
    t = x.shape[0]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = _ref_linear(state, f"{p}.q_proj", x, loras).view(t, nh, hd)
    k = _ref_linear(state, f"{p}.k_proj", x, loras).view(t, nkv, hd)
    v = _ref_linear(state, f"{p}.v_proj", x, loras).view(t, nkv, hd)
    if cfg["model_type"] == "qwen3":
        q = _ref_rms_norm(q, state[f"{p}.q_norm.weight"], cfg["rms_norm_eps"])
        k = _ref_rms_norm(k, state[f"{p}.k_norm.weight"], cfg["rms_norm_eps"])
    inv = _ref_inv_freq(cfg)
    q, k = _ref_rope(q, positions, inv), _ref_rope(k, positions, inv)
    group = nh // nkv
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    heads = []
    for h in range(nh):
        kv = h // group  # HF repeat_kv: kv head j serves query heads j*group .. j*group + group - 1
        s = (q[:, h] @ k[:, kv].T) / math.sqrt(hd)  # [T, T]
        s = s.masked_fill(~causal, float("-inf"))
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        heads.append((e / e.sum(-1, keepdim=True)) @ v[:, kv])  # [T, hd]
    return _ref_linear(state, f"{p}.o_proj", torch.cat(heads, -1), loras)


def _ref_mlp(state: dict, p: str, x: torch.Tensor, loras) -> torch.Tensor:
    g = _ref_linear(state, f"{p}.gate_proj", x, loras)
    u = _ref_linear(state, f"{p}.up_proj", x, loras)
    return _ref_linear(state, f"{p}.down_proj", g * torch.sigmoid(g) * u, loras)


def _ref_forward(state: dict, cfg: dict, ids: torch.Tensor, loras=(), final: str = "logits") -> torch.Tensor:
    """Full causal LM on one unpadded sequence ids: [T] -> logits [T, V] (or final hidden [T, h]).

    ``loras``: (A, B, scale, token_index [T]) per adapter slot, A/B dicts by full module name.
    """
    st = {k: v.double() for k, v in state.items()}
    eps = cfg["rms_norm_eps"]
    positions = torch.arange(ids.shape[0])
    x = st["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        hn = _ref_rms_norm(x, st[f"{p}.input_layernorm.weight"], eps)
        x = x + _ref_attention(cfg, st, f"{p}.self_attn", hn, positions, loras)
        hn = _ref_rms_norm(x, st[f"{p}.post_attention_layernorm.weight"], eps)
        x = x + _ref_mlp(st, f"{p}.mlp", hn, loras)
    x = _ref_rms_norm(x, st["model.norm.weight"], eps)
    if final == "hidden":
        return x
    head = st["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else st["lm_head.weight"]
    return x @ head.T


# ---- helpers --------------------------------------------------------------------------------------




def _model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights with non-unit norm weights, so a norm that ignores its weight is caught."""
    m = Transformer.random(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return m


def _state(m: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _ids(config: ModelConfig, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # -> ids, mask [B, T]
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.int64)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = True
    return ids, mask


# ---- module names -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_uses_hf_names_and_shapes(family):
    cfg = FAMILIES[family]()
    c = cfg.to_dict()
    h, hd, nh, nkv, f = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    want = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        want["lm_head.weight"] = (c["vocab_size"], h)
    bias_qkv = c["attention_bias"]
    bias_o = c["attention_bias"] and c["model_type"] != "qwen2"  # HF Qwen2: q/k/v biased, o_proj not
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        want[f"{p}.input_layernorm.weight"] = (h,)
        want[f"{p}.post_attention_layernorm.weight"] = (h,)
        for n, shape in (("q_proj", (nh * hd, h)), ("k_proj", (nkv * hd, h)), ("v_proj", (nkv * hd, h))):
            want[f"{p}.self_attn.{n}.weight"] = shape
            if bias_qkv:
                want[f"{p}.self_attn.{n}.bias"] = (shape[0],)
        want[f"{p}.self_attn.o_proj.weight"] = (h, nh * hd)
        if bias_o:
            want[f"{p}.self_attn.o_proj.bias"] = (h,)
        if c["model_type"] == "qwen3":
            want[f"{p}.self_attn.q_norm.weight"] = (hd,)
            want[f"{p}.self_attn.k_norm.weight"] = (hd,)
        want[f"{p}.mlp.gate_proj.weight"] = (f, h)
        want[f"{p}.mlp.up_proj.weight"] = (f, h)
        want[f"{p}.mlp.down_proj.weight"] = (h, f)
    got = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    assert got == want


# ---- one layer at a time ------------------------------------------------------------------------


def test_rms_norm_layer_matches_reference():
    cfg = tiny_config("llama")
    m = _model(cfg)
    x = torch.randn(3, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(1)) * 3.0
    out = m.model.norm(x)
    ref = _ref_rms_norm(x.double(), m.model.norm.weight.double(), cfg.rms_norm_eps)
    assert _rel(out, ref) < 1e-6


def test_rms_norm_bf16_normalises_in_fp32_then_scales():
    cfg = tiny_config("llama")
    m = _model(cfg).to(torch.bfloat16)
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = m.model.norm(x)
    assert out.dtype == torch.bfloat16
    ref = _ref_rms_norm(x.double(), m.model.norm.weight.double(), cfg.rms_norm_eps)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("family", ["llama-tied", "llama3-rope", "llama-linear-rope", "qwen3"])
def test_rope_inv_freq_matches_formula(family):
    cfg = FAMILIES[family]()
    inv = Transformer(cfg).inv_freq
    ref = torch.tensor(_ref_inv_freq(cfg.to_dict()), dtype=torch.float64)
    assert inv.shape == (cfg.head_dim // 2,)
    torch.testing.assert_close(inv.double(), ref, rtol=1e-6, atol=0)


def test_llama3_inv_freq_exercises_all_three_bands():
    # Guards the config above: if the bands collapse, the inv_freq test above proves less.
    cfg = FAMILIES["llama3-rope"]().to_dict()
    base = _ref_inv_freq({**cfg, "rope_scaling": None})
    scaled = _ref_inv_freq(cfg)
    ratios = [b / s for b, s in zip(base, scaled)]
    assert any(r == pytest.approx(1.0) for r in ratios)
    assert any(r == pytest.approx(8.0) for r in ratios)
    assert any(1.0 + 1e-6 < r < 8.0 - 1e-6 for r in ratios)


def test_apply_rope_matches_pair_rotation():
    hd, t, nh = 16, 11, 3
    x = torch.randn(2, nh, t, hd, generator=torch.Generator().manual_seed(3))
    inv = _ref_inv_freq({"head_dim": hd, "rope_theta": 500.0})
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    ang = pos.double()[..., None] * torch.tensor(inv, dtype=torch.float64)  # [B, T, hd/2]
    emb = torch.cat((ang, ang), -1)  # HF layout of the cos/sin tables: [B, T, hd]
    out = apply_rope(x, emb.cos().float(), emb.sin().float())
    for b in range(2):
        ref = _ref_rope(x[b].transpose(0, 1).double(), pos[b], inv).transpose(0, 1)  # [H, T, hd]
        assert _rel(out[b], ref) < 1e-6


def _layer_inputs(cfg: ModelConfig, b: int, t: int):
    x = torch.randn(b, t, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(t)
    ang = pos.double()[:, None] * torch.tensor(_ref_inv_freq(cfg.to_dict()), dtype=torch.float64)
    emb = torch.cat((ang, ang), -1)[None].expand(b, t, cfg.head_dim)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None].expand(b, 1, t, t)
    return x, pos, emb.cos().float(), emb.sin().float(), mask


@pytest.mark.parametrize("family", ["llama-tied", "llama-bias", "llama-mqa", "llama3-rope", "qwen2", "qwen3", "qwen3-bias-untied"])
def test_attention_layer_matches_explicit_softmax(family):
    cfg = FAMILIES[family]()
    m = _model(cfg)
    x, pos, cos, sin, mask = _layer_inputs(cfg, 2, 9)
    attn = m.model.layers[1].self_attn
    out = attn(x, cos, sin, mask, None, None, 1)
    st = {k: v.double() for k, v in _state(m).items()}
    for b in range(2):
        ref = _ref_attention(cfg.to_dict(), st, "model.layers.1.self_attn", x[b].double(), pos, ())
        assert _rel(out[b], ref) < 1e-5


def test_mlp_layer_matches_swiglu_reference():
    cfg = tiny_config("qwen2")
    m = _model(cfg)
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    out = m.model.layers[0].mlp(x, None)
    st = {k: v.double() for k, v in _state(m).items()}
    ref = _ref_mlp(st, "model.layers.0.mlp", x.double().reshape(-1, cfg.hidden_size), ()).view(2, 5, -1)
    assert _rel(out, ref) < 1e-6


# ---- the full forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_forward_matches_reference(family):
    cfg = FAMILIES[family]()
    m = _model(cfg)
    ids = _ids(cfg, 2, 37)
    logits = m(ids)
    assert logits.shape == (2, 37, cfg.vocab_size)
    st = _state(m)
    for b in range(2):
        ref = _ref_forward(st, cfg.to_dict(), ids[b])
        assert _rel(logits[b], ref) < 1e-5, family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_forward_matches_numpy_reference(family):
    # A second, separately written oracle (tests/numpy_reference.py): both references agreeing with
    # the model guards against a shared misreading in either one.
    cfg = FAMILIES[family]()
    m = _model(cfg)
    ids = _ids(cfg, 23, seed=3)
    state = {k: v.double().numpy() for k, v in _state(m).items()}
    ref = torch.from_numpy(numpy_reference.forward(state, cfg.to_dict(), ids.tolist()))
    assert _rel(m(ids[None])[0], ref) < 1e-5, family


def test_output_modes_agree(any_tiny_config):
    cfg = any_tiny_config
    m = _model(cfg)
    ids = _ids(cfg, 2, 6)
    logits = m(ids)
    torch.testing.assert_close(m(ids, output="last"), logits[:, -1], rtol=1e-6, atol=1e-6)
    hidden = m(ids, output="hidden")
    ref_hidden = _ref_forward(_state(m), cfg.to_dict(), ids[0], final="hidden")
    assert _rel(hidden[0], ref_hidden) < 1e-5
    torch.testing.assert_close(hidden @ m.lm_weight.T, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right", "middle"])
def test_padding_anywhere_leaves_real_tokens_unchanged(side, any_tiny_config):
    cfg = any_tiny_config
    m = _model(cfg)
    lengths = [7, 3, 5]
    rows = [_ids(cfg, n, seed=10 + i) for i, n in enumerate(lengths)]
    t = 9
    ids = torch.full((3, t), 5, dtype=torch.int64)  # pad id 5 is a real vocabulary id on purpose
    mask = torch.zeros(3, t, dtype=torch.bool)
    for i, r in enumerate(rows):
        cols = {
            "left": range(t - len(r), t),
            "right": range(len(r)),
            "middle": [c for c in range(t) if c not in (1, 2)][: len(r)],
        }[side]
        cols = torch.tensor(list(cols))
        ids[i, cols], mask[i, cols] = r, True
    logits = m(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = m(r[None])[0]
        assert _rel(logits[i][mask[i]], alone) < 1e-5


def test_forward_rejects_bad_attention_mask_shape():
    cfg = tiny_config()
    m = _model(cfg)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        m(_ids(cfg, 2, 5), attention_mask=torch.ones(2, 4, dtype=torch.bool))


# ---- KV cache -----------------------------------------------------------------------------------


def test_kv_cache_decoding_matches_full_recompute(any_tiny_config):
    """Left-padded rows of different lengths prefill together, decode 6 steps, and at step 3 row
    compaction (``keep``) drops a row and reorders the rest; every step's logits equal a full
    recompute of that row alone."""
    cfg = any_tiny_config
    m = _model(cfg)
    prompts = [_ids(cfg, n, seed=20 + i) for i, n in enumerate([5, 9, 2, 6])]
    steps = 6
    cont = _ids(cfg, 4, steps, seed=30)
    ids, mask = _left_pad(prompts)
    cache = KVCache(cfg, 4, ids.shape[1] + steps)
    rows = [0, 1, 2, 3]  # original row of each live cache row
    logits = m(ids, attention_mask=mask, cache=cache, output="last")
    for step in range(steps + 1):
        for j, r in enumerate(rows):
            full = torch.cat((prompts[r], cont[r, :step]))
            ref = m(full[None], output="last")[0]
            assert _rel(logits[j], ref) < 1e-5, (step, r)
        if step == steps:
            break
        if step == 3:
            keep = torch.tensor([3, 0, 2])  # drop row 1 and reorder
            cache.keep(keep)
            rows = [rows[k] for k in keep.tolist()]
        nxt = torch.stack([cont[r, step] for r in rows])[:, None]  # [B_live, 1]
        logits = m(nxt, cache=cache, output="last")
    assert cache.row_lengths.tolist() == [len(prompts[r]) + steps for r in rows]


def test_kv_cache_decode_matches_reference_positions():
    # The cache path and the fp64 reference agree too (not just the model with itself).
    cfg = FAMILIES["llama3-rope"]()
    m = _model(cfg)
    prompt, cont = _ids(cfg, 8, seed=40), _ids(cfg, 4, seed=41)
    cache = KVCache(cfg, 1, 12)
    m(prompt[None], cache=cache)
    for s in range(4):
        logits = m(cont[s : s + 1][None], cache=cache, output="last")[0]
        ref = _ref_forward(_state(m), cfg.to_dict(), torch.cat((prompt, cont[: s + 1])))[-1]
        assert _rel(logits, ref) < 1e-5


def test_cache_may_be_wider_than_context_but_positions_may_not_pass_it():
    # Rows share cache columns, so a left-padded batch may need more columns than the context;
    # what is checked against the context is each row's own position.
    cfg = tiny_config()  # context 128
    m = _model(cfg)
    ids, mask = _left_pad([_ids(cfg, 127, seed=80), _ids(cfg, 3, seed=81)])
    cache = KVCache(cfg, 2, 140)
    m(ids, attention_mask=mask, cache=cache)
    m(_ids(cfg, 2, 1, seed=82), cache=cache)  # row 0 reaches position 127: the last one allowed
    with pytest.raises(ValueError, match=r"sequence of 129 tokens exceeds the model's context of 128"):
        m(_ids(cfg, 2, 1, seed=83), cache=cache)


def test_kv_cache_overflow_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    cache = KVCache(cfg, 2, 8)
    m(_ids(cfg, 2, 6), cache=cache)
    with pytest.raises(ValueError, match=r"KV cache full: 6 \+ 3 tokens exceed its 8 columns"):
        m(_ids(cfg, 2, 3), cache=cache)


def test_kv_cache_batch_mismatch_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    cache = KVCache(cfg, 2, 8)
    with pytest.raises(ValueError, match=r"KV cache holds 2 rows, the forward has 3"):
        m(_ids(cfg, 3, 2), cache=cache)


def test_sequence_longer_than_context_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    with pytest.raises(ValueError, match=r"129 tokens exceeds the model's context of 128"):
        m(_ids(cfg, 1, cfg.max_position_embeddings + 1))


# ---- multi-LoRA ---------------------------------------------------------------------------------

_SHARED_TARGETS = ("q_proj", "v_proj", "down_proj")


def _slots(cfg: ModelConfig, index0: torch.Tensor, index1: torch.Tensor, trainable: bool = False):
    """Slot 0: three distinct adapters of ranks 4, 2, 3 (padded to 4 with zeros), scales differ;
    slot 1: one shared rank-3 adapter on three target modules only."""
    g = torch.Generator().manual_seed(7)
    s0 = LoraSlot.create(cfg, 3, 4, init="random", generator=g, index=index0, name="diff")
    with torch.no_grad():
        for name in s0.A:
            s0.A[name][1, 2:] = 0
            s0.B[name][1, :, 2:] = 0
            s0.A[name][2, 3:] = 0
            s0.B[name][2, :, 3:] = 0
    for name in s0.A:
        s0.A[name].requires_grad_(trainable)
        s0.B[name].requires_grad_(trainable)
    s0.scale = torch.tensor([0.5, 1.5, 1.0])
    s1 = LoraSlot.create(cfg, 1, 3, init="random", generator=g, targets=_SHARED_TARGETS, index=index1, scale=0.7, name="dit")
    return s0, s1


def _merged_state(base: dict, slots: list[tuple[LoraSlot, int]]) -> dict:
    """base weights + sum over (slot, adapter id) of scale * B @ A, in fp64 (keeps autograd)."""
    st = {k: v.double() for k, v in base.items()}
    for slot, a in slots:
        if a < 0:
            continue
        for name in slot.A:
            st[name + ".weight"] = st[name + ".weight"] + slot.scale[a].double() * (
                slot.B[name][a].double() @ slot.A[name][a].double()
            )
    return st


def _merged_model(cfg: ModelConfig, merged: dict) -> Transformer:
    m = Transformer(cfg)
    m.load_state_dict({k: v.float() for k, v in merged.items()})
    return m.eval().requires_grad_(False)


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "qwen3"])
def test_multi_lora_forward_equals_merged_weights(family):
    cfg = FAMILIES[family]()
    m = _model(cfg)
    idx0 = torch.tensor([2, 0, -1, 1])
    s0, s1 = _slots(cfg, idx0, torch.zeros(4, dtype=torch.int64))
    prompts = [_ids(cfg, n, seed=50 + i) for i, n in enumerate([6, 4, 7, 5])]
    ids, mask = _left_pad(prompts)
    logits = m(ids, AdapterBatch(s0, s1), attention_mask=mask)
    base = _state(m)
    for i, p in enumerate(prompts):
        merged = _merged_model(cfg, _merged_state(base, [(s0, int(idx0[i])), (s1, 0)]))
        alone = merged(p[None])[0]
        got = logits[i][mask[i]]
        assert _rel(got, alone) < 1e-5, i
        # The adapters matter: without them the logits differ by far more than the tolerance.
        assert _rel(m(p[None])[0], alone) > 1e-2


def test_multi_lora_decode_with_cache_equals_merged_weights():
    """Prefill then one-token decode steps with per-row adapters (a -1 row among them), compared
    with each row's merged model recomputed in full at every step."""
    cfg = FAMILIES["qwen3"]()
    m = _model(cfg)
    idx0 = torch.tensor([1, -1, 0, 2])
    s0, s1 = _slots(cfg, idx0, torch.zeros(4, dtype=torch.int64))
    prompts = [_ids(cfg, n, seed=60 + i) for i, n in enumerate([3, 5, 4, 6])]
    cont = _ids(cfg, 4, 3, seed=61)
    ids, mask = _left_pad(prompts)
    cache = KVCache(cfg, 4, ids.shape[1] + 3)
    ad = AdapterBatch(s0, s1)
    outs = [m(ids, ad, attention_mask=mask, cache=cache, output="last")]
    for s in range(3):
        outs.append(m(cont[:, s : s + 1], ad, cache=cache, output="last"))
    base = _state(m)
    for i, p in enumerate(prompts):
        merged = _merged_model(cfg, _merged_state(base, [(s0, int(idx0[i])), (s1, 0)]))
        full = merged(torch.cat((p, cont[i]))[None])[0]  # [T, V]
        for s, out in enumerate(outs):
            assert _rel(out[i], full[len(p) - 1 + s]) < 1e-5, (i, s)


def test_per_token_adapter_index_matches_reference():
    cfg = FAMILIES["qwen2"]()
    m = _model(cfg)
    t = 8
    g = torch.Generator().manual_seed(8)
    idx0 = torch.randint(-1, 3, (3, t), generator=g)
    idx0[0] = 1  # one row routes every token to the same adapter
    s0, s1 = _slots(cfg, idx0, torch.randint(-1, 1, (3, t), generator=g))
    ids = _ids(cfg, 3, t, seed=9)
    logits = m(ids, AdapterBatch(s0, s1))
    st = _state(m)
    for b in range(3):
        loras = [(s.A, s.B, s.scale, s.index[b]) for s in (s0, s1)]
        ref = _ref_forward(st, cfg.to_dict(), ids[b], loras)
        assert _rel(logits[b], ref) < 1e-5, b
    # A per-row index and the same index spelled per token give the same result.
    row_idx = torch.tensor([2, -1, 0])
    per_row = m(ids, AdapterBatch(s0.with_index(row_idx)))
    per_tok = m(ids, AdapterBatch(s0.with_index(row_idx[:, None].expand(3, t).contiguous())))
    torch.testing.assert_close(per_row, per_tok, rtol=1e-6, atol=1e-6)


# t = 2: few tokens per adapter; t = 6: many. "row": a per-sequence index [batch]; "token": the same
# routing spelled per token [batch, seq], which takes the token-routed multi-LoRA op instead.
# (t = 1 would make q/k gradients vanish: one token attends only to itself.)
@pytest.mark.parametrize("t", [2, 6])
@pytest.mark.parametrize("spelling", ["row", "token"])
def test_multi_lora_gradients_match_merged_weights(t, spelling):
    """Slot 0 trainable, slot 1 frozen; d(loss)/dA, dB through the engine == autograd through the
    fp64 reference on merged weights W + scale * B @ A, one sequence at a time."""
    cfg = FAMILIES["llama-untied"]()
    m = _model(cfg)
    idx0 = torch.tensor([2, 0, -1, 1])
    s0, s1 = _slots(cfg, idx0, torch.zeros(4, dtype=torch.int64), trainable=True)
    if spelling == "token":
        s0, s1 = (s.with_index(s.index[:, None].expand(4, t).contiguous()) for s in (s0, s1))
    ids = _ids(cfg, 4, t, seed=70)
    w = torch.randn(4, t, cfg.vocab_size, generator=torch.Generator().manual_seed(71))
    (m(ids, AdapterBatch(s0, s1)) * w).sum().backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(p.grad is None for p in s1.parameters())

    leaf_A = {n: a.detach().double().requires_grad_(True) for n, a in s0.A.items()}
    leaf_B = {n: b.detach().double().requires_grad_(True) for n, b in s0.B.items()}
    ref_slot = LoraSlot(A=leaf_A, B=leaf_B, scale=s0.scale, index=idx0)
    base = _state(m)
    total = 0.0
    for i in range(4):
        merged = _merged_state(base, [(ref_slot, int(idx0[i])), (s1, 0)])
        total = total + (_ref_forward(merged, cfg.to_dict(), ids[i]) * w[i].double()).sum()
    total.backward()
    for name in s0.A:
        assert _rel(s0.A[name].grad, leaf_A[name].grad) < 1e-5, name
        assert _rel(s0.B[name].grad, leaf_B[name].grad) < 1e-5, name
    # Zero padding of the rank-2 adapter stays inert: no gradient reaches the padded rows/columns.
    name = next(iter(s0.A))
    assert torch.count_nonzero(s0.A[name].grad[1, 2:]) == 0
    assert torch.count_nonzero(s0.B[name].grad[1, :, 2:]) == 0


def test_adapter_wrong_shape_errors_name_module_and_shapes():
    cfg = tiny_config()
    m = _model(cfg)
    s = LoraSlot.create(cfg, 2, 4, init="random", name="diff")
    name = "model.layers.1.mlp.down_proj"
    s.A[name] = torch.zeros(2, 4, cfg.hidden_size)  # down_proj takes intermediate_size inputs
    with pytest.raises(AdapterError, match=rf"diff: {name} A has shape \(2, 4, 48\), expected \[2, r, 80\]"):
        m(_ids(cfg, 2, 3), AdapterBatch(s))


def test_adapter_bad_index_value_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    s = LoraSlot.create(cfg, 2, 4, init="random", index=torch.tensor([0, 2]), name="diff")
    with pytest.raises(AdapterError, match=r"diff: index values must lie in \[-1, 1\], found \[0, 2\]"):
        m(_ids(cfg, 2, 3), AdapterBatch(s))


def test_adapter_unknown_module_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    s = LoraSlot.create(cfg, 2, 4, init="random", name="diff")
    s.A["model.layers.7.self_attn.q_proj"] = s.A.pop("model.layers.0.self_attn.q_proj")
    s.B["model.layers.7.self_attn.q_proj"] = s.B.pop("model.layers.0.self_attn.q_proj")
    with pytest.raises(AdapterError, match=r"diff: model.layers.7.self_attn.q_proj is not a linear layer"):
        m(_ids(cfg, 2, 3), AdapterBatch(s))


def test_adapter_per_token_index_of_wrong_length_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    s = LoraSlot.create(cfg, 2, 4, init="random", index=torch.zeros(2, 4, dtype=torch.int64), name="diff")
    with pytest.raises(AdapterError, match=r"diff: index has shape \(2, 4\), expected \[2\] or \[2, 3\]"):
        m(_ids(cfg, 2, 3), AdapterBatch(s))


def test_adapter_index_of_wrong_batch_errors_clearly():
    cfg = tiny_config()
    m = _model(cfg)
    s = LoraSlot.create(cfg, 3, 4, init="random", index=torch.tensor([0, 1, 2]), name="diff")
    with pytest.raises(AdapterError, match=r"diff: index has shape \(3,\), expected \[2\]"):
        m(_ids(cfg, 2, 3), AdapterBatch(s))


def test_all_target_modules_are_adapted():
    # Every one of the 7 targets in every block receives its delta: a slot on one module changes
    # the output, for each module in turn.
    cfg = tiny_config()
    m = _model(cfg)
    ids = _ids(cfg, 1, 4)
    base = m(ids)
    for target in TARGET_MODULES:
        s = LoraSlot.create(cfg, 1, 2, init="random", targets=(target,), generator=torch.Generator().manual_seed(1))
        for name in list(s.A):
            if not name.startswith("model.layers.1."):
                del s.A[name], s.B[name]
        st = _merged_state(_state(m), [(s, 0)])
        torch.testing.assert_close(m(ids, AdapterBatch(s)), _merged_model(cfg, st)(ids), rtol=1e-5, atol=1e-6)
        assert _rel(m(ids, AdapterBatch(s)), base) > 1e-4, target


@pytest.mark.parametrize("t", [1, 5])
def test_attention_in_bf16_matches_fp64_for_decode_and_prefill_queries(t):
    """A one-token bf16 query runs through the fp32 kernel on a CPU (faster there); either way the
    result is the fp64 attention to bf16 precision, grouped heads and padding mask included."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, t, 16, generator=g)
    k, v = torch.randn(3, 2, 9, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g)
    mask = torch.ones(3, 1, t, 9, dtype=torch.bool).tril(9 - t)
    mask[1, :, :, :3] = False  # a left-padded row
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                           enable_gqa=True)
    out = _attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, True)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() < 0.03


@pytest.mark.parametrize("t", [5, 9])
def test_bf16_attention_under_autograd_matches_fp64_values_and_gradients(t, monkeypatch):
    """A bf16 query with autograd recording (training) runs as two matmuls around an fp32 softmax
    on a CPU (faster there than the fused kernel's backward); values and gradients of q, k, v are
    the fp64 attention's to bf16 precision, grouped heads and a left-padded row included."""
    import dit_engine.model as model_mod

    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, t, 16, generator=g)
    k, v = torch.randn(3, 2, 9, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g)
    mask = torch.ones(3, 1, t, 9, dtype=torch.bool).tril(9 - t)
    mask[1, :, :, :3] = False
    mask[1, :, :, 9 - t:] |= torch.eye(t, dtype=torch.bool)  # every query sees itself, as the model's mask
    calls = []
    real = model_mod._attention_matmul
    monkeypatch.setattr(model_mod, "_attention_matmul", lambda *a: calls.append(1) or real(*a))
    leaves = [x.bfloat16().requires_grad_(True) for x in (q, k, v)]
    out = _attention(*leaves, mask, True)
    assert calls and out.dtype == torch.bfloat16
    ref_leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, attn_mask=mask, enable_gqa=True)
    assert (out.double() - ref).abs().max() < 0.03
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, dy.bfloat16())
    want = torch.autograd.grad(ref, ref_leaves, dy)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and _rel(a.double(), b) < 2e-2

"""An independent float64 numpy forward of Llama / Qwen2 / Qwen3: the oracle the model tests use.

Written from the published architecture, not from dit_engine.model, and it imports nothing from
dit_engine: it reads the HF config dict and HF tensor names directly. One sequence at a time,
no cache, plain causal attention, so every step can be checked by eye:

    h = embed[ids]
    per block:  h += o_proj(attn(rope(q_norm?(q_proj(rms(h)))), rope(k_norm?(k_proj(rms(h)))), v_proj(rms(h))))
                h += down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
    logits = lm_head(rms(h))          (lm_head = embed when the embeddings are tied)

RoPE is HF's half-split form: the first and second halves of each head are the (x, y) pairs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def load_hf_dir(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """State dict (float64 numpy) and config dict of an HF checkpoint dir (single or sharded)."""
    from safetensors import safe_open  # only the file reader is shared with the engine

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    state: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:  # "pt" reads bf16, which numpy cannot
            for name in f.keys():
                state[name] = f.get_tensor(name).double().numpy()
    return state, config


def forward(state: Mapping[str, Any], config: Mapping[str, Any], token_ids: list[int] | np.ndarray) -> np.ndarray:
    """Logits ``[T, V]`` (float64) for one sequence of token ids."""
    return final_hidden(state, config, token_ids) @ _lm_head(state).T


def greedy_next(state: Mapping[str, Any], config: Mapping[str, Any], token_ids: list[int]) -> int:
    """The argmax next token after ``token_ids`` (only the last position goes through lm_head)."""
    return int(np.argmax(_lm_head(state) @ final_hidden(state, config, token_ids)[-1]))


def final_hidden(state: Mapping[str, Any], config: Mapping[str, Any], token_ids: list[int] | np.ndarray) -> np.ndarray:
    """The final-norm hidden states ``[T, hidden]`` (float64) of one sequence."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    ids = np.asarray(token_ids, dtype=np.int64)
    t_len = ids.shape[0]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    eps = config.get("rms_norm_eps", 1e-6)
    qk_norm = config["model_type"] == "qwen3"

    cos, sin = _rope_tables(config, head_dim, t_len)  # [T, head_dim]
    causal = np.triu(np.full((t_len, t_len), -np.inf), k=1)  # [T, T]: -inf above the diagonal

    h = w["model.embed_tokens.weight"][ids]  # [T, hidden]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = _linear(x, w, p + "self_attn.q_proj").reshape(t_len, n_heads, head_dim)
        k = _linear(x, w, p + "self_attn.k_proj").reshape(t_len, n_kv, head_dim)
        v = _linear(x, w, p + "self_attn.v_proj").reshape(t_len, n_kv, head_dim)
        if qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

        out = np.empty((t_len, n_heads, head_dim))
        group = n_heads // n_kv  # query heads sharing one key/value head
        for hq in range(n_heads):
            hk = hq // group
            scores = q[:, hq] @ k[:, hk].T / math.sqrt(head_dim) + causal  # [T, T]
            out[:, hq] = _softmax(scores) @ v[:, hk]
        h = h + _linear(out.reshape(t_len, n_heads * head_dim), w, p + "self_attn.o_proj")

        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = _linear(x, w, p + "mlp.gate_proj")
        h = h + _linear(gate / (1.0 + np.exp(-gate)) * _linear(x, w, p + "mlp.up_proj"), w, p + "mlp.down_proj")

    return _rms_norm(h, w["model.norm.weight"], eps)


# ---- pieces ------------------------------------------------------------------------------------------
def _lm_head(state: Mapping[str, Any]) -> np.ndarray:
    """[V, hidden]; tied models reuse the embedding matrix."""
    head = state["lm_head.weight"] if "lm_head.weight" in state else state["model.embed_tokens.weight"]
    return np.asarray(head, dtype=np.float64)


def _linear(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """``x @ W.T (+ b)``; a bias is used whenever the checkpoint has one (Qwen2 q/k/v, Llama attention_bias)."""
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [T, heads, head_dim]. Pair dim j with dim j + head_dim/2 and rotate by angle pos * f_j."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]  # [T, 1, half]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _rope_tables(config: Mapping[str, Any], head_dim: int, t_len: int) -> tuple[np.ndarray, np.ndarray]:
    base = config.get("rope_theta", 10000.0)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim/2]
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        freqs = freqs / scaling["factor"]
    elif kind == "llama3":
        freqs = _llama3_frequencies(freqs, scaling)
    elif kind not in (None, "default"):
        raise ValueError(f"numpy reference: rope_scaling {kind!r} not implemented")
    angles = np.arange(t_len, dtype=np.float64)[:, None] * freqs[None, :]  # [T, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, head_dim]
    return np.cos(angles), np.sin(angles)


def _llama3_frequencies(freqs: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1: wavelengths longer than original_ctx/low_freq_factor are slowed by `factor`,
    shorter than original_ctx/high_freq_factor are kept, and the band between is interpolated."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    smooth = np.clip((old_ctx / wavelength - low) / (high - low), 0.0, 1.0)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = np.where(wavelength > old_ctx / low, freqs / factor, blended)
    return np.where(wavelength < old_ctx / high, freqs, out)

"""The transformer: Llama / Qwen2 / Qwen3 as plain nn.Modules with Hugging Face module names.

``Transformer(config)`` holds ``model.embed_tokens``, ``model.layers.{i}`` (``input_layernorm``,
``self_attn.{q,k,v,o}_proj`` [+ ``q_norm``/``k_norm`` on Qwen3], ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``), ``model.norm`` and ``lm_head`` (absent when tied), so its state dict
is an HF checkpoint's and diffs from other tools map 1:1 by name.

Every linear that may carry LoRAs is an :class:`AdaptedLinear`: base GEMM, then the summed deltas
of the adapter slots bound for this forward pass, added into its output in place (one call into
``kernels.multi_lora`` per adapted linear).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_kernels.rms_norm import rms_norm
from dit_kernels.rope import apply_rope
from dit_kernels.swiglu import swiglu

from .adapters import AdapterBatch, BoundAdapters
from .cache import KVCache
from .config import ModelConfig
from .probes import Probes

Output = Literal["logits", "last", "hidden", "probes"]


class AdaptedLinear(nn.Linear):
    """nn.Linear that adds the LoRA deltas of the bound adapter slots for its own module name."""

    def __init__(self, d_in: int, d_out: int, bias: bool, name: str):
        super().__init__(d_in, d_out, bias=bias)
        self.full_name = name

    def forward(self, x: Tensor, adapters: BoundAdapters | None = None) -> Tensor:  # x: [B, T, d_in]
        y = F.linear(x, self.weight, self.bias)  # [B, T, d_out]
        if adapters is not None:  # the deltas are added into the base output in place
            adapters.delta(self.full_name, x.reshape(-1, x.shape[-1]), out=y.view(-1, y.shape[-1]))
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        h, qd, kvd = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        qkv_bias = c.attention_bias
        o_bias = c.attention_bias and c.model_type != "qwen2"  # Qwen2 biases q/k/v only
        self.q_proj = AdaptedLinear(h, qd, qkv_bias, f"{prefix}.q_proj")
        self.k_proj = AdaptedLinear(h, kvd, qkv_bias, f"{prefix}.k_proj")
        self.v_proj = AdaptedLinear(h, kvd, qkv_bias, f"{prefix}.v_proj")
        self.o_proj = AdaptedLinear(qd, h, o_bias, f"{prefix}.o_proj")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,  # [B, T, h]
        cos: Tensor,  # [B, T, hd]
        sin: Tensor,  # [B, T, hd]
        mask: Tensor,  # [B, 1, T, S] bool, True = attend
        adapters: BoundAdapters | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:  # [B, T, h]
        b, t, _ = x.shape
        q = self.q_proj(x, adapters).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x, adapters).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x, adapters).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, Hkv, T, hd]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, Hkv, S, hd]
        o = _attention(q, k, v, mask, self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1), adapters)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, gqa: bool) -> Tensor:
    """Scaled dot-product attention. Two CPU bf16 cases leave torch's fused kernel, by measurement
    (2 threads, 9 query / 3 key-value heads of 64):

    * a one-token query (decode) runs in fp32: the fused CPU kernel is ~6x slower in bf16 than in
      fp32 at decode shapes (64 rows x 100 keys), and the upcast of q, k, v costs less than that;
    * a short query with autograd recording (training) runs as two batched matmuls around an fp32
      softmax (:func:`_attention_matmul`): the fused kernel's backward is 2.4x slower at 80 tokens
      (35 vs 15 ms a layer, 16 rows, forward and backward), 5x at 40 and 1.8x at 128, level at 256.

    Everything else (prefill, GPU) takes the fused kernel."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        if q.shape[2] == 1:
            o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa)
            return o.to(q.dtype)
        if k.shape[2] <= _MATMUL_ATTENTION_MAX_KEYS and torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad):
            return _attention_matmul(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


_MATMUL_ATTENTION_MAX_KEYS = 192  # the measured crossover lies between 128 (1.8x) and 256 (level) keys


def _attention_matmul(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) masked) v with the query heads of each key-value head stacked into
    one matmul (GQA without repeating k and v), the softmax in fp32. q: [B, H, T, d], k, v:
    [B, Hkv, S, d], mask: [B, 1, T, S] bool (True = attend) -> [B, H, T, d]."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    scores = (q.reshape(b, hkv, g * t, d) @ k.transpose(-1, -2)).view(b, hkv, g, t, s)
    scores = scores.float().mul_(d ** -0.5).masked_fill_(~mask[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return (p.view(b, hkv, g * t, s) @ v).view(b, h, t, d)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = AdaptedLinear(h, f, False, f"{prefix}.gate_proj")
        self.up_proj = AdaptedLinear(h, f, False, f"{prefix}.up_proj")
        self.down_proj = AdaptedLinear(f, h, False, f"{prefix}.down_proj")

    def forward(self, x: Tensor, adapters: BoundAdapters | None, probes: Probes | None = None,
                layer: int = 0) -> Tensor:
        h = swiglu(self.gate_proj(x, adapters), self.up_proj(x, adapters))  # [B, T, intermediate]: the neurons
        if probes is not None:
            h = probes.at("mlp", layer, h)
        return self.down_proj(h, adapters)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, f"model.layers.{i}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, f"model.layers.{i}.mlp")
        self.index = i

    def forward(self, x, cos, sin, mask, adapters, cache, probes=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, adapters, cache, self.index)
        return x + self.mlp(self.post_attention_layernorm(x), adapters, probes, self.index)


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """A causal LM. See :meth:`forward` for the one entry point used by generation, scoring and training."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", _rope_inv_freq(config), persistent=False)

    @classmethod
    def random(
        cls, config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> "Transformer":
        """Random weights (tests and speed benches): normal(0, 0.02) linears, unit norms.

        Built on the meta device and filled in place on ``device``: no host copy of a large model."""
        with torch.device("meta"):
            m = cls(config)
        m = m.to(dtype=dtype).to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
        m.init_buffers(device)
        return m.eval().requires_grad_(False)

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers (after building on the meta device and loading weights)."""
        self.inv_freq = _rope_inv_freq(self.config).to(device)

    @property
    def lm_weight(self) -> Tensor:  # [V, h]
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: Tensor,  # [B, T] int64
        adapters: AdapterBatch | BoundAdapters | None = None,
        *,
        attention_mask: Tensor | None = None,  # [B, T] bool/int, 1 = real token (padding may sit anywhere)
        cache: KVCache | None = None,
        output: Output = "logits",
        probes: Probes | None = None,
    ) -> Tensor | None:  # logits [B, T, V] | last-position logits [B, V] | final hidden [B, T, h] | None
        """Run the model on a block of new tokens.

        Without a cache, ``input_ids`` is the whole sequence. With a cache, it is the next block
        (the prompt, then one token per decode step); positions continue from each row's length,
        so rows of different lengths share one cache. ``adapters`` bound per forward: the routing
        metadata is built once here and reused by every layer. ``probes`` captures and patches
        activations at named points of this forward (:mod:`dit_engine.probes`).

        ``output="probes"``: run only the blocks up to the deepest point ``probes`` names
        (:meth:`Probes.blocks_needed`) and return None: the captures are the whole result (a
        target read at half depth costs half a forward). Refused with a KV cache, which would be
        left filled for some layers only, and without probes.
        """
        if output == "probes" and probes is None:
            raise ValueError('output="probes" runs the blocks up to the deepest probe point: give probes')
        if output == "probes" and cache is not None:
            raise ValueError('output="probes" stops before the last block, which would leave the KV cache filled '
                             "for some layers only; run a full forward with a cache")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.to(torch.bool)
        if attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, t)}")
        if cache is not None and cache.batch != b:
            raise ValueError(f"KV cache holds {cache.batch} rows, the forward has {b}")
        if isinstance(adapters, AdapterBatch):
            adapters.validate(self.config, b, t)
            bound = adapters.bind(b, t)
        else:
            bound = adapters
        start = cache.row_lengths if cache is not None else torch.zeros(b, dtype=torch.int64, device=input_ids.device)
        positions = start[:, None] + torch.cumsum(attention_mask, 1) - 1  # [B, T]
        positions = positions.clamp_min(0)
        self._check_context(positions, cache.pos if cache is not None else 0)
        key_mask = cache.extend_mask(attention_mask) if cache is not None else attention_mask  # [B, S]
        mask = _attention_mask(attention_mask, key_mask)  # [B, 1, T, S]
        cos, sin = self._rope(positions)

        x = self.model.embed_tokens(input_ids)
        layers = self.model.layers
        if probes is not None:
            probes.bind(len(layers))
            if output == "probes":
                layers = layers[: probes.blocks_needed()]
            x = probes.at("hidden", 0, x)
        for i, layer in enumerate(layers):
            x = layer(x, cos, sin, mask, bound, cache, probes)
            if probes is not None:
                x = probes.at("hidden", i + 1, x)
        if output == "probes":
            return None
        if cache is not None:
            cache.advance(attention_mask)
        if output == "last":
            x = x[:, -1]
        x = self.model.norm(x)
        if output == "hidden":
            return x
        return F.linear(x, self.lm_weight)

    def _check_context(self, positions: Tensor, columns: int) -> None:
        """Refuse positions past the context. No row is longer than the ``columns`` its cache holds,
        so ``columns + T`` bounds every position on the host: the exact check (a device -> host
        read, which would stall a decode step and break CUDA-graph capture) runs only near the end
        of the context."""
        t, ctx = positions.shape[1], self.config.max_position_embeddings
        if t == 0 or columns + t <= ctx:
            return
        longest = int(positions.max()) + 1
        if longest > ctx:
            raise ValueError(
                f"sequence of {longest} tokens exceeds the model's context of {ctx} (max_position_embeddings)"
            )

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:  # -> 2 x [B, T, hd]
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(torch.float32)  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)


def _attention_mask(query_mask: Tensor, key_mask: Tensor) -> Tensor:
    """Causal over the last T of S key columns, padded keys masked; every query sees itself.

    query_mask: [B, T], key_mask: [B, S] with the T new tokens in its last T columns.
    Padded query rows attend to themselves only, so no softmax row is empty (no NaN).
    """
    b, t = query_mask.shape
    s = key_mask.shape[1]
    q_col = torch.arange(s - t, s, device=key_mask.device)[:, None]  # [T, 1] column of each query
    k_col = torch.arange(s, device=key_mask.device)[None, :]  # [1, S]
    causal = k_col <= q_col  # [T, S]
    m = causal[None] & key_mask[:, None, :]  # [B, T, S]
    m = m | (k_col == q_col)[None]
    return m[:, None]


def _rope_inv_freq(config: ModelConfig) -> Tensor:  # [hd / 2] fp32
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = config.rope_scaling_dict
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        factor = float(rs.get("factor", 1.0))
        if kind == "linear":
            inv = inv / factor
        elif kind == "llama3":
            low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
            old = float(rs["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            inv = torch.where(medium, smoothed, scaled)
    return inv.to(torch.float32)

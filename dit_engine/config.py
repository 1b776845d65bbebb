"""Model configuration read from a Hugging Face ``config.json``.

One frozen dataclass serves every supported family (Llama, Qwen2/2.5, Qwen3). Values that follow
from others (head_dim when absent, the per-module linear shapes, a stable hash) are properties, so
nothing derived is stored twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .files import read_json


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# Linear layers that carry LoRAs, in the order they run inside one block, with their HF parent.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


class ConfigError(ValueError):
    """A config.json that the engine cannot run: names the file and the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim_override: int | None = None  # HF `head_dim` (Qwen3 sets it; others derive it)
    attention_bias: bool = False  # q/k/v biases (Qwen2 always has them)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen items of HF `rope_scaling`
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    name: str = ""  # a human name for reports (the checkpoint dir's name)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises q and k per head (RMSNorm) before RoPE."""
        return self.model_type == "qwen3"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Short module name -> (d_in, d_out) of that linear layer in every block."""
        h, hd = self.hidden_size, self.head_dim
        return {
            "q_proj": (h, self.num_attention_heads * hd),
            "k_proj": (h, self.num_key_value_heads * hd),
            "v_proj": (h, self.num_key_value_heads * hd),
            "o_proj": (self.num_attention_heads * hd, h),
            "gate_proj": (h, self.intermediate_size),
            "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }

    def module_names(self, targets: tuple[str, ...] | list[str] = TARGET_MODULES) -> list[str]:
        """Full HF names (``model.layers.3.self_attn.q_proj``) of the target linears, block order."""
        bad = [t for t in targets if t not in _PARENT]
        if bad:
            raise ConfigError(f"unknown target module(s) {bad}; known: {list(TARGET_MODULES)}")
        return [
            f"model.layers.{i}.{_PARENT[t]}.{t}"
            for i in range(self.num_hidden_layers)
            for t in TARGET_MODULES
            if t in targets
        ]

    def to_dict(self) -> dict[str, Any]:
        """An HF-style config dict (round-trips through :meth:`from_dict`)."""
        d: dict[str, Any] = {
            "architectures": [_ARCH[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "rope_scaling": self.rope_scaling_dict,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "torch_dtype": self.torch_dtype,
            "hidden_act": "silu",
        }
        return d

    @property
    def config_hash(self) -> str:
        """sha256 over the fields that decide weight shapes and the forward math (not the name)."""
        d = self.to_dict()
        for k in ("torch_dtype", "bos_token_id", "eos_token_id", "max_position_embeddings"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", name: str = "") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {mt!r}; this engine runs {list(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r} for model_type {mt!r}")
            return d[key]

        n_heads = int(need("num_attention_heads"))
        eos = d.get("eos_token_id")
        eos_t = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rs = d.get("rope_scaling")
        if rs is not None:
            rtype = rs.get("rope_type", rs.get("type"))
            if rtype not in ("llama3", "linear", "default", None):
                raise ConfigError(f"{source}: rope_scaling type {rtype!r} is not supported (llama3, linear)")
            rs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rs.items()))
        cfg = cls(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim_override=int(d["head_dim"]) if d.get("head_dim") else None,
            attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
            rope_scaling=rs,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            name=name,
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        d = read_json(path, "a model config.json", kind=dict, error=ConfigError)
        return cls.from_dict(d, source=str(path), name=path.parent.name)


_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

"""GGUF (llama.cpp) -> Hugging Face checkpoint dir: a pure conversion, any llama-family GGUF.

Writes fp32 ``model.safetensors`` + ``config.json`` + ``tokenizer.json`` + ``tokenizer_config.json``
+ ``generation_config.json``. (Fetching the default model's GGUF is :mod:`dit_engine.model_store`.)

Two things llama.cpp changed on the way in are undone here:

- **Rotary layout.** HF Llama applies RoPE to the two halves of each head (``rotate_half``);
  llama.cpp pairs adjacent dims. Its converter therefore permuted the rows of ``q_proj`` (with
  ``n_head`` heads) and ``k_proj`` (with ``n_head_kv``) as
  ``w.reshape(n_head, 2, d/n_head/2, d_in).swapaxes(1, 2).reshape(d, d_in)``; :func:`unpermute_rotary`
  applies the inverse.
- **Tokenizer.** GGUF stores the BPE tokens, merges and token types; the HF ``tokenizer.json`` is
  rebuilt from them with the ``tokenizers`` library.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .checkpoint import CheckpointError, save_checkpoint
from .config import ModelConfig
from .files import write_json

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types that become added tokens
_PRE_TOKENIZERS = ("smollm", "gpt2")  # llama.cpp pre-tokenizer names rebuilt exactly below


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama-architecture GGUF into an HF checkpoint dir (fp32 weights), atomically."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; convert into a new directory")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # a corrupt file surfaces as assorted numpy/IO errors from the reader
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {name: _field_value(field) for name, field in reader.fields.items()}

    config = _config_from_metadata(meta, {t.name for t in reader.tensors}, gguf_path, out_dir.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        _say(f"converting {gguf_path.name}: {len(reader.tensors)} tensors -> fp32 safetensors")
        state = dict(_convert_tensors(reader, config, gguf_path))
        save_checkpoint(state, config, partial)
        del state
        _say("building tokenizer.json from the GGUF vocabulary")
        _build_tokenizer(meta, gguf_path).save(str(partial / "tokenizer.json"))
        write_json(partial / "tokenizer_config.json", _tokenizer_config(meta, config), ensure_ascii=False)
        write_json(partial / "generation_config.json", {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id[0] if config.eos_token_id else None,
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        })
        partial.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF half-split rotary layout -> adjacent pairs)."""
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rotary`: rows of ``[n_head * head_dim, ...]`` back to HF layout.

    Within one head, row ``2*j + s`` of the GGUF layout came from HF row ``s*head_dim/2 + j``;
    reading the rows as ``(n_head, head_dim/2, 2)`` and swapping the last two axes puts them back."""
    d = w.shape[0]
    if d % (2 * n_head):
        raise CheckpointError(f"rotary rows: {d} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- metadata -> config ---------------------------------------------------------------------------
def _config_from_metadata(meta: dict[str, Any], tensor_names: set[str], source: Path, name: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{source}: has a rope_freqs tensor (llama3 rope scaling), which this converter does not read")

    def need(key: str) -> Any:
        if key not in meta:
            raise CheckpointError(f"{source}: GGUF metadata lacks {key!r}")
        return meta[key]

    n_head = int(need("llama.attention.head_count"))
    hidden = int(need("llama.embedding_length"))
    d: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size") or len(need("tokenizer.ggml.tokens"))),
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // n_head)),
        "rms_norm_eps": _f32_value(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_value(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("llama.context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"{source}: rope scaling {scaling!r} is not supported (only 'linear')")
        d["rope_scaling"] = {"type": "linear", "factor": float(need("llama.rope.scaling.factor"))}
    return ModelConfig.from_dict(d, source=str(source), name=name)


# ---- tensors ---------------------------------------------------------------------------------------
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a llama GGUF tensor, or None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _convert_tensors(reader: GGUFReader, config: ModelConfig, source: Path):
    """Yield ``(hf_name, fp32 tensor)`` for every GGUF tensor, dequantized and un-permuted."""
    for t in tqdm(reader.tensors, desc="tensors", file=sys.stderr, leave=False):
        name = hf_tensor_name(t.name)
        if name is None:
            raise CheckpointError(f"{source}: tensor {t.name!r} has no Hugging Face llama counterpart")
        shape = tuple(reversed([int(n) for n in t.shape]))  # GGUF lists dims innermost-first
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # may be a read-only memmap view
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = unpermute_rotary(w, config.num_key_value_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))


# ---- tokenizer ---------------------------------------------------------------------------------------
def _build_tokenizer(meta: dict[str, Any], source: Path) -> Tokenizer:
    """Byte-level BPE rebuilt from the GGUF vocabulary, merges and token types."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise CheckpointError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (known: {list(_PRE_TOKENIZERS)})")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit on its own before the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED
    ])
    return tok


def _tokenizer_config(meta: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }


# ---- small helpers -----------------------------------------------------------------------------------
def _field_value(field) -> Any:
    """A GGUF metadata field as a Python value (str, int, float, bool, or a list of those)."""
    if not field.types:
        return None

    def scalar(part: np.ndarray, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part.tolist()[0] if len(part) else None
        return bool(value) if vtype == GGUFValueType.BOOL else value

    if field.types[0] == GGUFValueType.ARRAY:
        item_type = field.types[-1]
        if item_type == GGUFValueType.ARRAY:
            return None  # nested arrays carry nothing this converter reads
        return [scalar(field.parts[i], item_type) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _f32_value(value: float) -> float:
    """GGUF stores these floats as float32: keep the value it meant (1e-05, not 9.99999974e-06)."""
    return float(np.format_float_scientific(np.float32(value), unique=True))


def _say(message: str) -> None:
    print(f"dit-engine: {message}", file=sys.stderr, flush=True)

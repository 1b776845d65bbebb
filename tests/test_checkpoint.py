"""Checkpoint dirs: save, stream, load into the real Transformer, fingerprint, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy_reference as ref
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from dit_engine import checkpoint
from dit_engine.checkpoint import (
    CheckpointError,
    iter_checkpoint_tensors,
    load_model,
    save_checkpoint,
    weights_fingerprint,
)
from dit_engine.config import ConfigError, ModelConfig
from dit_engine.model_store import engine_home, resolve_model
from dit_engine.model import Transformer

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def _tiny_dir(tmp_path: Path, config, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {k: v.clone() for k, v in Transformer.random(config, seed=seed).state_dict().items()}
    # Random norms instead of ones, so a norm weight loaded into the wrong place shows up.
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = 1.0 + 0.1 * torch.randn(state[k].shape, generator=torch.Generator().manual_seed(seed + 1))
    out = tmp_path / f"ckpt-{config.model_type}"
    save_checkpoint(state, config, out)
    return out, state


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- engine_home / resolve_model --------------------------------------------------------------------
def test_engine_home_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ENGINE_HOME", str(tmp_path / "eh"))
    assert engine_home() == tmp_path / "eh"
    monkeypatch.delenv("DIT_ENGINE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine_home() == tmp_path / "xdg" / "dit-engine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engine_home() == tmp_path / "home" / ".cache" / "dit-engine"


def test_resolve_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="found a file"):
        resolve_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_resolve_default_uses_cache_without_fetching(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ENGINE_HOME", str(tmp_path))
    cached = tmp_path / "models" / "SmolLM2-135M-Instruct"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")

    def no_fetch(*a, **k):
        raise AssertionError("fetched although the default model is cached")

    monkeypatch.setattr("dit_engine.model_store.fetch_default_model", no_fetch)
    assert resolve_model("default") == cached


# ---- load + numpy reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False, "rope_scaling": LLAMA3_SCALING}),
    ("qwen2", {}),
    ("qwen3", {}),
])
def test_tiny_dir_loads_and_matches_numpy_reference(tmp_path, family, overrides):
    config = tiny_config(family, **overrides)
    path, state = _tiny_dir(tmp_path, config)
    model = load_model(path)

    assert model.config == ModelConfig.from_json(path / "config.json")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name
    assert all(not p.requires_grad for p in model.parameters())

    ids = [5, 17, 3, 96, 0, 42, 42, 8, 61, 29, 77, 13, 2, 50, 33, 19, 88, 4, 70, 11, 64]  # past the 16-token rope ctx
    np_state, np_config = ref.load_hf_dir(path)
    expected = ref.forward(np_state, np_config, ids)  # [T, V] float64
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double().numpy()
    assert got.shape == expected.shape
    assert _rel_err(got, expected) < 1e-5


def test_load_in_bfloat16_keeps_fingerprint(tmp_path):
    path, state = _tiny_dir(tmp_path, tiny_config("qwen2"))
    model = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert weights_fingerprint(model.state_dict()) == weights_fingerprint(state)


def test_sharded_checkpoint_streams_every_tensor(tmp_path):
    config = tiny_config("qwen3")
    path, state = _tiny_dir(tmp_path, config)
    (path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: state[n].contiguous() for n in members}, str(path / shard))
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    streamed = dict(iter_checkpoint_tensors(path))
    assert set(streamed) == set(state)
    assert all(torch.equal(streamed[n], state[n]) for n in state)
    model = load_model(path)
    assert all(torch.equal(model.state_dict()[n], state[n]) for n in state)


# ---- errors ------------------------------------------------------------------------------------------
def test_missing_config_is_a_clear_error(tmp_path):
    path, _ = _tiny_dir(tmp_path, tiny_config("llama"))
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(path)


def test_unknown_model_type_is_a_clear_error(tmp_path):
    path, _ = _tiny_dir(tmp_path, tiny_config("llama"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*unsupported model_type 'gpt_neox'"):
        load_model(path)


def test_truncated_safetensors_names_the_file(tmp_path):
    path, _ = _tiny_dir(tmp_path, tiny_config("llama"))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    path, state = _tiny_dir(tmp_path, tiny_config("llama"))
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in state}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        list(iter_checkpoint_tensors(path))


def test_no_weights_file(tmp_path):
    path, _ = _tiny_dir(tmp_path, tiny_config("llama"))
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*convert them to safetensors"):
        load_model(path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    config = tiny_config("qwen2")
    path, state = _tiny_dir(tmp_path, config)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(81, 48)
    save_checkpoint(state, config, path)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[81, 48\].*expects \[80, 48\]"):
        load_model(path)


def test_missing_and_unexpected_tensors(tmp_path):
    config = tiny_config("llama")
    path, state = _tiny_dir(tmp_path, config)
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_checkpoint(state, config, path)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_model(path)

    path, state = _tiny_dir(tmp_path, config)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # harmless, ignored
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # tied: ignored
    save_checkpoint(state, config, path)
    load_model(path)
    state["model.layers.0.mlp.extra.weight"] = torch.ones(3)
    save_checkpoint(state, config, path)
    with pytest.raises(CheckpointError, match=r"does not have: model\.layers\.0\.mlp\.extra\.weight"):
        load_model(path)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    config = tiny_config("llama")
    path, state = _tiny_dir(tmp_path, config)
    before = (path / "model.safetensors").read_bytes()

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({k: v + 1 for k, v in state.items()}, config, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


# ---- fingerprint ------------------------------------------------------------------------------------------
def test_weights_fingerprint_tracks_names_shapes_and_values():
    config = tiny_config("qwen3")
    state = Transformer.random(config, seed=0).state_dict()
    fp = weights_fingerprint(state)
    assert fp == weights_fingerprint({k: v.clone() for k, v in reversed(list(state.items()))})
    assert fp != weights_fingerprint(Transformer.random(config, seed=1).state_dict())
    scaled = dict(state, **{"model.layers.1.mlp.down_proj.weight": state["model.layers.1.mlp.down_proj.weight"] * 1.05})
    assert fp != weights_fingerprint(scaled)
    renamed = {k.replace("layers.1.", "layers.9."): v for k, v in state.items()}
    assert fp != weights_fingerprint(renamed)
    with pytest.raises(CheckpointError, match="meta device"):
        weights_fingerprint({"w": torch.empty(3, device="meta")})


# ---- the real default model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_loads_and_matches_numpy_reference():
    from dit_engine.tokenizer import Tokenizer

    path = resolve_model("default")
    model = load_model(path)
    tok = Tokenizer.from_dir(path)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    np_state, np_config = ref.load_hf_dir(path)
    expected = ref.forward(np_state, np_config, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double().numpy()
    assert _rel_err(got, expected) < 1e-4
    assert int(got[-1].argmax()) == int(expected[-1].argmax())
    assert weights_fingerprint(model.state_dict()) == weights_fingerprint(
        {k: torch.from_numpy(v) for k, v in np_state.items()})

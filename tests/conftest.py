"""Shared fixtures: tiny random-weight configs of each supported family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dit_engine.config import ModelConfig

TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=128,
    eos_token_id=2,
    bos_token_id=1,
)


def tiny_config(model_type: str = "llama", **overrides) -> ModelConfig:
    d = dict(TINY, model_type=model_type)
    if model_type == "qwen3":
        d["head_dim"] = 16  # Qwen3 sets head_dim apart from hidden/heads
    if model_type == "llama" and "tie_word_embeddings" not in overrides:
        d["tie_word_embeddings"] = True
    d.update(overrides)
    return ModelConfig.from_dict(d, source="tiny", name=f"tiny-{model_type}")


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def any_tiny_config(request) -> ModelConfig:
    return tiny_config(request.param)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in fp64 (the design's error measure for every kernel and layer check)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def kernel_poison(monkeypatch):
    """Kernel launchers fill outputs with NaN before writing them, so an unwritten element fails."""
    monkeypatch.setenv("DIT_KERNELS_POISON", "1")


@pytest.fixture(autouse=True, scope="session")
def _engine_home(tmp_path_factory):
    """Tests write into a throw-away engine home (base-answer pools, fetched models): the user's cache
    stays untouched. Its models/ links to the real one, so the slow tests reuse a cached default model."""
    from dit_engine.model_store import engine_home

    real = engine_home()
    home = tmp_path_factory.mktemp("engine-home")
    (real / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(real / "models", target_is_directory=True)
    old = os.environ.get("DIT_ENGINE_HOME")
    os.environ["DIT_ENGINE_HOME"] = str(home)
    yield Path(home)
    if old is None:
        os.environ.pop("DIT_ENGINE_HOME", None)
    else:
        os.environ["DIT_ENGINE_HOME"] = old

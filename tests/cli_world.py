"""Files the CLI tests type commands against: a tiny random model written as an HF-style checkpoint
dir (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template),
and a PEFT LoRA adapter dir written by hand (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_world import TEMPLATE, tiny_engine

from dit_engine.checkpoint import save_checkpoint


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    """A loadable model directory of the tiny world (word-level tokenizer, ChatML-like template)."""
    eng = tiny_engine(seed=seed)
    save_checkpoint(eng.model.state_dict(), eng.config, out)
    eng.tokenizer._tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    return out


def write_peft_dir(out: Path, model_dir: Path, rank: int = 2, alpha: float = 4.0, seed: int = 0,
                   modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA adapter for the tiny model, written the way PEFT lays it out (no engine code)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d_out = {"q_proj": h, "k_proj": h // heads * kv, "v_proj": h // heads * kv, "o_proj": h}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in modules:
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out[m], rank, generator=g) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": rank,
        "lora_alpha": alpha, "target_modules": list(modules), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None}))
    return out

"""PEFT LoRA adapter directories in and out of a zoo.

``adapter_config.json`` + ``adapter_model.safetensors``: keys
``base_model.model.<module>.lora_A[.<adapter>].weight`` [r, d_in] and ``...lora_B...`` [d_out, r];
``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module through
``rank_pattern`` / ``alpha_pattern``. Anything a LoRA pair cannot express (DoRA, trained biases,
``modules_to_save``, embedding LoRAs, ``fan_in_fan_out``) is refused by name.

The engine keeps one scale per diff; when modules of an imported diff have different scales
(``alpha_pattern``), the ratio to the diff's scale is folded into that module's ``B`` (the dense
delta is unchanged up to rounding).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..config import TARGET_MODULES, ModelConfig
from ..files import read_json, write_atomically
from .format import Diff, ZooError, module_name, single_scale

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_META_KEY = "dit_engine"  # safetensors header entry carrying our id / labels / split / meta / scale


def export_peft(diff: Diff, out_dir: str | Path, config: ModelConfig, base_model_name: str,
                overwrite: bool = False) -> Path:
    """Write ``diff`` as a PEFT LoRA adapter directory that PEFT (and vLLM, ...) can load.

    Per-module ranks go to ``rank_pattern`` (with ``alpha_pattern`` keeping the scale); the diff's
    id / labels / split / meta ride along in the safetensors header so :func:`import_peft` restores
    them. Weights are written before the config, each file atomically."""
    out = Path(out_dir)
    diff.validate(config, source=str(out))
    if not overwrite and ((out / PEFT_CONFIG).exists() or (out / PEFT_WEIGHTS).exists()):
        raise ZooError(f"{out}: already holds a PEFT adapter (pass overwrite=True to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    modules = [m for m in config.module_names(TARGET_MODULES) if m in diff.A]  # block order
    r = diff.rank
    rank_pattern = {m: diff.A[m].shape[0] for m in modules if diff.A[m].shape[0] != r}
    tensors: dict[str, Tensor] = {}
    for m in modules:
        tensors[f"{_PEFT_PREFIX}{m}.lora_A.weight"] = diff.A[m].detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = diff.B[m].detach().cpu().contiguous()
    ours = {"id": diff.id, "labels": diff.labels, "split": diff.split, "meta": diff.meta, "scale": float(diff.scale)}
    header = {"format": "pt", _META_KEY: json.dumps(ours, allow_nan=False)}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": _plain_number(diff.scale * r),
        "target_modules": _peft_targets(modules, config),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {m: _plain_number(diff.scale * rm) for m, rm in rank_pattern.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_atomically(out / PEFT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    write_atomically(out / PEFT_CONFIG, lambda tmp: tmp.write_text(json.dumps(adapter_config, indent=2) + "\n"))
    return out


def import_peft(path: str | Path, config: ModelConfig, id: str | None = None,
                labels: Mapping[str, Any] | None = None, split: str | None = None) -> Diff:
    """Read a PEFT LoRA adapter directory as a Diff, validated against ``config``.

    ``id`` defaults to the id stored by :func:`export_peft`, else the directory name; ``labels``
    are merged over stored ones; ``split`` defaults to the stored one, else ``"train"``."""
    path = Path(path)
    cfg = _read_peft_config(path)
    weights, header = _read_peft_weights(path)
    pairs: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    known = set(config.module_names(TARGET_MODULES))
    for key, t in weights.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ZooError(f"{path / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight "
                           "(trained biases, DoRA magnitudes, embeddings or modules_to_save are not supported)")
        adapters.add(match["adapter"] or "")
        module = module_name(match["module"], known, f"{path / PEFT_WEIGHTS}: {key}")
        pairs.setdefault(module, {})[match["side"]] = t
    if len(adapters) > 1:
        raise ZooError(f"{path / PEFT_WEIGHTS}: holds several adapters {sorted(adapters)}; expected one")
    if not pairs:
        raise ZooError(f"{path / PEFT_WEIGHTS}: holds no LoRA weights")
    scales: dict[str, float] = {}
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    for module in (m for m in config.module_names(TARGET_MODULES) if m in pairs):
        sides = pairs[module]
        if set(sides) != {"A", "B"}:
            raise ZooError(f"{path / PEFT_WEIGHTS}: {module} has lora_{''.join(sides)} but not both A and B")
        r_m = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        alpha_m = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        if sides["A"].dim() != 2 or sides["A"].shape[0] != r_m:
            raise ZooError(f"{path / PEFT_WEIGHTS}: {module} lora_A has shape {list(sides['A'].shape)}, "
                           f"expected [{r_m}, d_in] (r from {PEFT_CONFIG})")
        scales[module] = alpha_m / (math.sqrt(r_m) if cfg.get("use_rslora") else r_m)
        A[module], B[module] = sides["A"], sides["B"]
    stored = header.get("scale")
    scale, B = single_scale(B, scales, preferred=stored)
    diff = Diff(
        id=id or header.get("id") or path.name,
        A=A,
        B=B,
        scale=scale,
        labels={**header.get("labels", {}), **(labels or {})},
        split=split or header.get("split") or "train",
        meta=header.get("meta", {"source": str(path), "base_model": cfg.get("base_model_name_or_path")}),
    )
    diff.validate(config, source=str(path))
    return diff


def _read_peft_config(path: Path) -> dict:
    cpath = path / PEFT_CONFIG
    cfg = read_json(cpath, "a PEFT adapter config", kind=dict, error=ZooError)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ZooError(f"{cpath}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    refused = {
        "use_dora": "DoRA (a magnitude vector a LoRA pair cannot express)",
        "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
        "modules_to_save": "modules_to_save (fully trained modules)",
        "lora_bias": "lora_bias (a trained bias on lora_B)",
        "layer_replication": "layer_replication",
        "target_parameters": "target_parameters (LoRA on raw parameters)",
    }
    for key, what in refused.items():
        if cfg.get(key):
            raise ZooError(f"{cpath}: {what} is not supported ({key} = {cfg[key]!r})")
    if cfg.get("bias", "none") != "none":
        raise ZooError(f"{cpath}: bias = {cfg['bias']!r} trains biases, which a LoRA diff cannot carry; only 'none'")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ZooError(f"{cpath}: {key} must be a positive number, found {cfg.get(key)!r}")
    return cfg


def _read_peft_weights(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and our own header entry (empty for adapters written by other tools)."""
    st, binf = path / PEFT_WEIGHTS, path / PEFT_WEIGHTS_BIN
    if st.exists():
        try:
            with safe_open(str(st), framework="pt") as f:
                header = f.metadata() or {}
                weights = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ZooError(f"{st}: unreadable ({e})") from None
        try:
            ours = json.loads(header[_META_KEY]) if _META_KEY in header else {}
        except json.JSONDecodeError:
            raise ZooError(f"{st}: header entry {_META_KEY!r} is not valid JSON") from None
        return weights, ours
    if binf.exists():
        try:
            weights = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for non-tensor pickles
            raise ZooError(f"{binf}: not a weights-only torch file ({type(e).__name__}: {e})") from None
        if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
            raise ZooError(f"{binf}: expected a dict of tensors")
        return weights, {}
    raise ZooError(f"{path}: no {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_BIN}) found")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern: a key applies when the module name ends with it at a dot
    boundary (keys are regexes); the longest matching key wins."""
    hits = [k for k in patterns if re.fullmatch(rf"(.*\.)?(?:{k})", module)]
    return patterns[max(hits, key=len)] if hits else default


def _peft_targets(modules: list[str], config: ModelConfig) -> list[str]:
    """Short names (``q_proj``) when the diff covers that projection in every block, else the
    full module names (PEFT matches a target by name suffix)."""
    present = set(modules)
    shorts = sorted({m.rsplit(".", 1)[1] for m in modules}, key=TARGET_MODULES.index)
    if all(set(config.module_names((s,))) <= present for s in shorts):
        return shorts
    return modules


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)

"""Hugging Face checkpoint directories -> weights and a ready model.

A checkpoint dir holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` with its shards. Tensors stream one at a time from the file
(safetensors memory-maps it), are checked against the model's own ``state_dict`` keys and shapes,
and are assigned straight into a model built on the meta device, so the weights never exist twice
in memory. Only directories: resolving a ``--model`` argument ("default", an HF cache name) is
:mod:`dit_engine.model_store`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import ModelConfig
from .files import read_json, write_atomically, write_json
from .model import Transformer


WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some exporters write that carry nothing the model needs (RoPE tables are recomputed).
_HARMLESS_EXTRA = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)rotary_emb\.(cos|sin)_cached$")


class CheckpointError(ValueError):
    """A checkpoint the engine cannot load: names the file or tensor and expected vs. found."""


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it is an HF checkpoint directory (holds a config.json); one clear error otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: model directory not found (pass an HF checkpoint dir, 'default', "
                              "or ORG/NAME of a model in the local Hugging Face cache)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected an HF checkpoint directory, found a file")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json in this directory; it is not an HF checkpoint dir")
    return path


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint dir, one at a time.

    Reads ``model.safetensors`` or, failing that, the shards named by ``model.safetensors.index.json``
    (every shard is checked to exist before the first tensor is yielded)."""
    path = Path(path)
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Transformer:
    """Build the :class:`~dit_engine.model.Transformer` of a checkpoint and fill it with its weights.

    Floating-point tensors are cast to ``dtype``; the model is returned in eval mode, its base
    weights frozen (``requires_grad=False``), with ``model.config`` the checkpoint's :class:`ModelConfig`."""
    path = checkpoint_dir(path)
    config = ModelConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    device = torch.device(device)

    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in iter_checkpoint_tensors(path):
        if name not in expected:
            if _HARMLESS_EXTRA.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(tensor.shape)}, the model ({config.model_type}, "
                f"config.json) expects {list(expected[name])}"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        _assign(model, name, tensor.to(device))
        loaded.add(name)
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensor(s) the {config.model_type} model does not have: {_preview(unexpected)}"
        )

    if config.tie_word_embeddings and "lm_head.weight" in expected:
        # A model that registers a tied lm_head shares the embedding Parameter; re-share it,
        # since assigning the embedding above replaced the object it pointed to.
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {_preview(missing)}")

    model.init_buffers(device)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensors left without values after loading: {_preview(still_meta)}")
    return model.eval()


def save_checkpoint(state: Mapping[str, Tensor], config: ModelConfig, out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights): give each its own copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    write_atomically(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(out_dir / "config.json", config.to_dict())
    return out_dir


def weights_fingerprint(state: Mapping[str, Tensor]) -> str:
    """A cheap, stable hash of base weights: names, shapes and a strided sample of values.

    Sampled values are rounded to bfloat16 before hashing so that one checkpoint loaded in fp32
    or bf16 gets one fingerprint; any real change of base model changes names, shapes or values."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        if t.is_meta:
            raise CheckpointError(f"weights_fingerprint: {name} is on the meta device (weights not loaded)")
        h.update(f"{name}:{list(t.shape)};".encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        steps = min(_SAMPLES_PER_TENSOR, flat.numel())
        # Integer strides: float positions round past the last element in tensors of ~2**24+ values.
        picks = torch.arange(steps, dtype=torch.int64) * (flat.numel() - 1) // max(steps - 1, 1)
        sample = flat[picks.to(flat.device)].to("cpu", torch.float32)
        h.update(sample.to(torch.bfloat16).to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


_SAMPLES_PER_TENSOR = 257  # odd, so the samples do not fall on a power-of-two stride of a row


# ---- helpers -------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index, "a safetensors index", kind=dict, error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that do not exist in {path}: {missing}")
        return [path / s for s in shards]
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    hint = " (.bin/.pt weights are not read: convert them to safetensors)" if any(
        n.endswith((".bin", ".pt", ".pth")) for n in found) else ""
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} found; the dir holds {found}{hint}")


def _assign(model: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in place of the meta tensor ``name`` (a parameter or persistent buffer)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        # Base weights are never trained here (diffs and the DIT adapter live in adapter slots).
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _preview(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more

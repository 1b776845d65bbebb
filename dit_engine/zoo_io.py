"""Diffs in and out of the engine: PEFT adapter dirs, the DIT paper's ``.pt`` files, dense diffs.

Conventions. Inside the engine a diff is PEFT's LoRA: ``A`` [r, d_in], ``B`` [d_out, r],
``dW = scale * B @ A`` (see :class:`dit_engine.zoo.Diff`); module names are full HF names.

* **PEFT** (``adapter_config.json`` + ``adapter_model.safetensors``): keys
  ``base_model.model.<module>.lora_A[.<adapter>].weight`` [r, d_in] and ``...lora_B...`` [d_out, r];
  ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module through
  ``rank_pattern`` / ``alpha_pattern``. Anything a LoRA pair cannot express (DoRA, trained biases,
  ``modules_to_save``, embedding LoRAs, ``fan_in_fan_out``) is refused by name.
* **DIT paper files** (``torch.save`` of a list of ``{topic, trigger, ..., weight_diff: {module:
  (A_dit, B_dit)}}``): the paper names the factors the other way round. Its layer computes
  ``x @ B_dit @ A_dit / r`` with ``A_dit`` [r, d_out] and ``B_dit`` [d_in, r], i.e.
  ``dW = A_dit^T @ B_dit^T / r``. So ours are ``A = B_dit^T`` [r, d_in], ``B = A_dit^T`` [d_out, r],
  ``scale = 1 / r``. Exporting folds ``scale * r`` into ``A_dit``. The paired ``index.csv``
  (``lora_path, lora_idx, n_params, topic, trigger, split``) supplies splits.
* **Dense diffs** (finetuned minus base weights) are compressed to rank r by truncated SVD.

The engine keeps one scale per diff; when modules of an imported diff have different scales
(``alpha_pattern``, mixed ranks in a DIT file), the ratio to the diff's scale is folded into that
module's ``B`` (the dense delta is unchanged up to rounding).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import TARGET_MODULES, ModelConfig
from .zoo import Diff, ZooError, read_json_file, write_atomically

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_META_KEY = "dit_engine"  # safetensors header entry carrying our id / labels / split / meta / scale


# ---- PEFT ----------------------------------------------------------------------------------------
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
        module = _module_name(match["module"], known, f"{path / PEFT_WEIGHTS}: {key}")
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
    scale, B = _single_scale(B, scales, preferred=stored)
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


# ---- DIT paper files -----------------------------------------------------------------------------
def import_dit_file(pt_path: str | Path, index_csv: str | Path | None = None,
                    config: ModelConfig | None = None, id_prefix: str | None = None) -> list[Diff]:
    """Read a DIT-paper weight-diff file (``torch.load(weights_only=True)``: no pickle code runs).

    Each entry becomes a Diff with id ``{id_prefix or file stem}:{lora_idx}``, labels = every
    entry key but ``weight_diff`` (topic, trigger, ...), split from ``index_csv`` (rows matched by
    file name and ``lora_idx``; their ``n_params`` and ``topic`` must agree) else ``"train"``.
    With ``config``, module names and shapes are checked against the base model."""
    pt_path = Path(pt_path)
    try:
        data = torch.load(pt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ZooError(f"{pt_path}: file not found") from None
    except Exception as e:  # torch raises several types for non-tensor pickles and bad archives
        raise ZooError(f"{pt_path}: not a weights-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(data, list):
        raise ZooError(f"{pt_path}: expected a list of weight-diff entries, found {type(data).__name__}")
    splits = _dit_index_rows(Path(index_csv), pt_path) if index_csv is not None else None
    known = set(config.module_names(TARGET_MODULES)) if config is not None else None
    prefix = id_prefix or pt_path.stem
    diffs = []
    for idx, entry in enumerate(data):
        where = f"{pt_path}: entry {idx}"
        if not isinstance(entry, dict) or not isinstance(entry.get("weight_diff"), dict):
            raise ZooError(f"{where}: expected a dict with a 'weight_diff' dict")
        labels = {k: _plain_label(v, f"{where}: {k}") for k, v in entry.items() if k != "weight_diff"}
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        scales: dict[str, float] = {}
        for key, pair in entry["weight_diff"].items():
            module = _module_name(str(key), known, f"{where}: {key}")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise ZooError(f"{where}: {key} must be a pair of tensors (A_dit, B_dit)")
            a_dit, b_dit = pair  # [r, d_out], [d_in, r]
            if a_dit.dim() != 2 or b_dit.dim() != 2 or a_dit.shape[0] != b_dit.shape[1]:
                raise ZooError(f"{where}: {key} has A_dit {list(a_dit.shape)} and B_dit {list(b_dit.shape)}, "
                               "expected [r, d_out] and [d_in, r]")
            A[module] = b_dit.T.contiguous()
            B[module] = a_dit.T.contiguous()
            scales[module] = 1.0 / a_dit.shape[0]
        if not A:
            raise ZooError(f"{where}: weight_diff is empty")
        n_params = sum(a.numel() + B[m].numel() for m, a in A.items())
        split = "train"
        if splits is not None:
            row = splits.get(idx)
            if row is None:
                raise ZooError(f"{index_csv}: no row for {pt_path.name} lora_idx {idx}")
            if int(row["n_params"]) != n_params:
                raise ZooError(f"{index_csv}: {pt_path.name} lora_idx {idx} has n_params {row['n_params']}, "
                               f"the file holds {n_params}")
            if "topic" in row and "topic" in labels and str(row["topic"]) != str(labels["topic"]):
                raise ZooError(f"{index_csv}: {pt_path.name} lora_idx {idx} has topic {row['topic']!r}, "
                               f"the file says {labels['topic']!r}")
            split = row["split"]
        scale, B = _single_scale(B, scales)
        diff = Diff(id=f"{prefix}:{idx}", A=A, B=B, scale=scale, labels=labels, split=split,
                    meta={"source": str(pt_path), "lora_idx": idx})
        if config is not None:
            diff.validate(config, source=str(pt_path))
        else:
            _check_finite(diff, str(pt_path))
        diffs.append(diff)
    return diffs


def export_dit_file(diffs: Iterable[Diff], pt_path: str | Path, overwrite: bool = False) -> Path:
    """Write diffs in the DIT paper's format (the inverse of :func:`import_dit_file`).

    Labels become top-level entry keys; ``scale * r`` is folded into ``A_dit`` since the paper's
    scale is fixed at ``1 / r``."""
    pt_path = Path(pt_path)
    if pt_path.exists() and not overwrite:
        raise ZooError(f"{pt_path}: exists (pass overwrite=True to replace it)")
    entries = []
    for d in diffs:
        if "weight_diff" in d.labels:
            raise ZooError(f"{pt_path}: diff {d.id!r} has a label named 'weight_diff', which the format reserves")
        weight_diff = {}
        for m, a in d.A.items():
            fold = d.scale * a.shape[0]  # 1.0 for diffs in the paper's own convention: no rounding
            b = d.B[m] if fold == 1.0 else (d.B[m].float() * fold).to(d.B[m].dtype)
            a_dit = b.T.contiguous()  # [r, d_out]
            b_dit = a.T.contiguous()  # [d_in, r]
            weight_diff[m] = (a_dit.detach().cpu(), b_dit.detach().cpu())
        entries.append({**d.labels, "weight_diff": weight_diff})
    write_atomically(pt_path, lambda tmp: torch.save(entries, tmp))
    return pt_path


# ---- dense diffs ---------------------------------------------------------------------------------
def dense_to_lora(
    base_state: Mapping[str, Tensor],
    tuned_state: Mapping[str, Tensor],
    config: ModelConfig,
    rank: int,
    targets: Iterable[str] = TARGET_MODULES,
    *,
    id: str = "dense",
    labels: Mapping[str, Any] | None = None,
    split: str = "train",
    svd_dtype: torch.dtype = torch.float32,
) -> tuple[Diff, dict[str, float]]:
    """Compress ``tuned - base`` on the target linears to a rank-``rank`` LoRA by truncated SVD.

    ``dW = U S Vh`` -> ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``, scale 1 (the best rank-r
    approximation in Frobenius norm, factors balanced). Returns the diff and, per module, the
    captured energy ``sum(S_r^2) / sum(S^2)`` (1.0 for an unchanged module). Modules whose
    true rank is below ``rank`` are zero-padded. Changed tensors that a LoRA on the targets cannot
    carry (norms, embeddings, ...) are listed in ``diff.meta["not_captured"]``."""
    if rank < 1:
        raise ZooError(f"dense_to_lora: rank must be >= 1, found {rank}")
    shapes = config.linear_shapes()
    modules = config.module_names(tuple(targets))
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    energy: dict[str, float] = {}
    for m in modules:
        key = f"{m}.weight"
        d_in, d_out = shapes[m.rsplit(".", 1)[1]]
        w = {}
        for which, state in (("base", base_state), ("tuned", tuned_state)):
            if key not in state:
                raise ZooError(f"dense_to_lora: {which} weights have no tensor {key!r}")
            if tuple(state[key].shape) != (d_out, d_in):
                raise ZooError(f"dense_to_lora: {which} {key} has shape {list(state[key].shape)}, "
                               f"expected [{d_out}, {d_in}]")
            w[which] = state[key].detach().to("cpu", svd_dtype)
        delta = w["tuned"] - w["base"]  # [d_out, d_in]
        if not bool(torch.isfinite(delta).all()):
            raise ZooError(f"dense_to_lora: {key} differs by NaN or Inf values")
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, S.shape[0])
        root = S[:k].sqrt()
        a = torch.zeros(rank, d_in, dtype=svd_dtype)
        b = torch.zeros(d_out, rank, dtype=svd_dtype)
        a[:k] = root[:, None] * Vh[:k]
        b[:, :k] = U[:, :k] * root[None, :]
        total = float((S.double() ** 2).sum())
        energy[m] = float((S[:k].double() ** 2).sum()) / total if total > 0 else 1.0
        A[m], B[m] = a, b
    target_keys = {f"{m}.weight" for m in modules}
    not_captured = sorted(
        k for k in base_state.keys() & tuned_state.keys()
        if k not in target_keys and not torch.equal(base_state[k], tuned_state[k])
    )
    meta = {"source": "dense", "rank": rank, "min_energy": min(energy.values()), "not_captured": not_captured}
    diff = Diff(id=id, A=A, B=B, scale=1.0, labels=dict(labels or {}), split=split, meta=meta)
    return diff, energy


# ---- helpers -------------------------------------------------------------------------------------
def _read_peft_config(path: Path) -> dict:
    cpath = path / PEFT_CONFIG
    cfg = read_json_file(cpath, "a PEFT adapter dir")
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


def _module_name(raw: str, known: set[str] | None, where: str) -> str:
    """Normalise a module name from another tool to the HF name ``model.layers.N.<parent>.<proj>``."""
    name = raw.removeprefix(_PEFT_PREFIX).removeprefix("language_model.")
    if name.startswith("layers."):
        name = "model." + name
    if known is None:
        parts = name.split(".")
        ok = (len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
              and parts[3] in ("self_attn", "mlp") and parts[4] in TARGET_MODULES)
    else:
        ok = name in known
    if not ok:
        raise ZooError(f"{where}: {raw!r} is not a target linear of the base model "
                       f"(expected names like 'model.layers.0.self_attn.q_proj' for {list(TARGET_MODULES)})")
    return name


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern: a key applies when the module name ends with it at a dot
    boundary (keys are regexes); the longest matching key wins."""
    hits = [k for k in patterns if re.fullmatch(rf"(.*\.)?(?:{k})", module)]
    return patterns[max(hits, key=len)] if hits else default


def _single_scale(B: dict[str, Tensor], scales: dict[str, float],
                  preferred: float | None = None) -> tuple[float, dict[str, Tensor]]:
    """One scale for the diff (``preferred`` if every module agrees with it, else the first
    module's); modules with another scale get the ratio folded into their B."""
    values = list(scales.values())
    scale = values[0]
    if preferred is not None and all(math.isclose(s, preferred, rel_tol=1e-6) for s in values):
        scale = float(preferred)
    folded = {}
    for m, b in B.items():
        ratio = scales[m] / scale
        folded[m] = b if math.isclose(ratio, 1.0, rel_tol=1e-6) else (b.float() * ratio).to(b.dtype)
    return float(scale), folded


def _dit_index_rows(index_csv: Path, pt_path: Path) -> dict[int, dict]:
    """index.csv rows for ``pt_path`` by lora_idx (matched by file name; full path if ambiguous)."""
    try:
        with open(index_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"lora_path", "lora_idx", "n_params", "split"}
            missing = need - set(reader.fieldnames or [])
            if missing:
                raise ZooError(f"{index_csv}: missing column(s) {sorted(missing)}")
            rows = [r for r in reader if Path(r["lora_path"]).name == pt_path.name]
    except FileNotFoundError:
        raise ZooError(f"{index_csv}: file not found") from None
    paths = {r["lora_path"] for r in rows}
    if len(paths) > 1:
        exact = [r for r in rows if Path(r["lora_path"]).resolve() == pt_path.resolve()]
        if not exact:
            raise ZooError(f"{index_csv}: several files named {pt_path.name} ({sorted(paths)}); none is {pt_path}")
        rows = exact
    if not rows:
        raise ZooError(f"{index_csv}: no rows for {pt_path.name}")
    out: dict[int, dict] = {}
    for r in rows:
        try:
            idx = int(r["lora_idx"])
        except ValueError:
            raise ZooError(f"{index_csv}: lora_idx {r['lora_idx']!r} is not an integer") from None
        out[idx] = r
    return out


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


def _plain_label(v: Any, where: str) -> Any:
    """Entry values as JSON-able labels (tensor / numpy scalars become Python numbers)."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ZooError(f"{where}: a label must be a scalar, found a tensor of shape {list(v.shape)}")
        return v.item()
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        raise ZooError(f"{where}: label value {v!r} is not JSON-serialisable") from None
    return v


def _check_finite(diff: Diff, source: str) -> None:
    for m, a in diff.A.items():
        for side, t in (("A", a), ("B", diff.B[m])):
            if not bool(torch.isfinite(t).all()):
                raise ZooError(f"{source}: diff {diff.id!r}: {m} {side} holds NaN or Inf values")

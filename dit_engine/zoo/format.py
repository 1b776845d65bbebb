"""The zoo's on-disk format: manifest, index rows, and the diff they describe.

Layout (format version 1)::

    manifest.json          format, base identity (name, config hash, weights fingerprint), the base
                           config (so shapes can be checked without the model), targets, modules, dtype
    index.jsonl            one committed row per diff (see below), in append order
    shards/shard-NNNNNN.safetensors
                           one file per append chunk (see :mod:`dit_engine.zoo.shards`)

Index row fields: ``id`` (unique), ``shard`` (file name), ``offset`` (position in the shard),
``rank``, ``scale`` (``dW = scale * B @ A``, PEFT convention), ``labels`` (dict), ``split``,
``n_params``, ``meta`` (dict), ``sha256`` (of the diff's stored bytes: per module in manifest
order, its ``A`` block [r_shard, d_in] then its ``B`` block [d_out, r_shard], zero padding included,
so checking is plain byte hashing of the mapped file). ``id, shard, offset, rank, scale, n_params,
sha256`` are reserved; ``Zoo.update_rows`` may add any other field (e.g. verification metrics) or
change ``labels`` / ``split`` / ``meta``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..checkpoint import weights_fingerprint
from ..config import TARGET_MODULES, ModelConfig
from ..files import read_json

if TYPE_CHECKING:
    from .shards import ShardSet

FORMAT = "dit-zoo"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
SHARDS = "shards"

RESERVED_FIELDS = ("id", "shard", "offset", "rank", "scale", "n_params", "sha256")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Where = Callable[[dict], bool] | Mapping[str, Any] | None


class ZooError(ValueError):
    """A zoo or diff that cannot be used: names the file / diff / module and expected vs. found."""


@dataclasses.dataclass(frozen=True)
class BaseIdentity:
    """Which base model a zoo's diffs were trained on; diffs only make sense on that base."""

    name: str
    config_hash: str
    weights_fingerprint: str

    @classmethod
    def from_model(cls, model: Any) -> "BaseIdentity":
        """From anything with ``.config`` (ModelConfig) and ``.state_dict()`` (e.g. a Transformer)."""
        config = getattr(model, "config", None)
        if not isinstance(config, ModelConfig):
            raise ZooError(f"BaseIdentity.from_model: {type(model).__name__} has no ModelConfig in .config")
        return cls(config.name, config.config_hash, weights_fingerprint(model.state_dict()))

    def matches(self, other: "BaseIdentity") -> bool:
        """Same architecture and same weights; the human name may differ (a renamed checkpoint dir)."""
        return self.config_hash == other.config_hash and self.weights_fingerprint == other.weights_fingerprint

    def describe(self) -> str:
        return f"{self.name or '<unnamed>'} (config {self.config_hash}, weights {self.weights_fingerprint})"


@dataclasses.dataclass
class Diff:
    """One LoRA weight diff in PEFT convention: ``dW[name] = scale * B[name] @ A[name]``.

    ``A[name]`` is ``[r, d_in]`` and ``B[name]`` is ``[d_out, r]``; names are full HF module names
    (``model.layers.3.self_attn.q_proj``). Ranks may differ per module (``rank`` is the largest).
    """

    id: str
    A: dict[str, Tensor]  # module -> [r, d_in]
    B: dict[str, Tensor]  # module -> [d_out, r]
    scale: float
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: str = "train"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a in self.A.values()), default=0)

    @property
    def n_params(self) -> int:
        return sum(a.numel() + self.B[m].numel() for m, a in self.A.items())

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:  # -> [d_out, d_in]
        """The dense weight change of one module (tests and conversions; never on a hot path)."""
        return (self.B[name].to(dtype) @ self.A[name].to(dtype)) * self.scale

    def validate(self, config: ModelConfig, source: str = "diff") -> None:
        """Raise ZooError unless every module is a linear of ``config`` with fitting, finite factors."""
        where = f"{source}: diff {self.id!r}"
        if not self.A:
            raise ZooError(f"{where} has no modules")
        if set(self.A) != set(self.B):
            raise ZooError(f"{where}: modules with A but no B (or B but no A): {sorted(set(self.A) ^ set(self.B))}")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ZooError(f"{where}: scale must be a finite number, found {self.scale!r}")
        shapes = config.linear_shapes()
        known = set(config.module_names(TARGET_MODULES))
        for name, a in self.A.items():
            if name not in known:
                raise ZooError(
                    f"{where}: {name} is not a linear layer of base {config.name or config.model_type} "
                    f"(expected names like {config.module_names(TARGET_MODULES)[0]!r})"
                )
            d_in, d_out = shapes[name.rsplit(".", 1)[1]]
            b = self.B[name]
            if a.dim() != 2 or a.shape[1] != d_in:
                raise ZooError(f"{where}: {name} A has shape {list(a.shape)}, expected [r, {d_in}]")
            if b.dim() != 2 or b.shape != (d_out, a.shape[0]):
                raise ZooError(f"{where}: {name} B has shape {list(b.shape)}, expected [{d_out}, {a.shape[0]}]")
            for side, t in (("A", a), ("B", b)):
                if not t.is_floating_point():
                    raise ZooError(f"{where}: {name} {side} has dtype {t.dtype}, expected a floating type")
        # One fused reduction (and host sync) for the whole diff: a NaN/Inf anywhere makes the total
        # norm non-finite. Only then look for the culprit tensor by tensor.
        tensors = [t.detach() for m in self.A for t in (self.A[m], self.B[m])]
        if not bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors))):
            for name in self.A:
                for side, t in (("A", self.A[name]), ("B", self.B[name])):
                    if not bool(torch.isfinite(t).all()):
                        raise ZooError(f"{where}: {name} {side} holds NaN or Inf values")


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    manifest = read_json(mpath, "a zoo manifest", kind=dict, error=ZooError)
    if manifest.get("format") != FORMAT:
        raise ZooError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ZooError(f"{mpath}: format version {manifest.get('version')!r}, this engine reads {FORMAT_VERSION}")
    need = ("base", "config", "targets", "modules", "dtype", "shard_size")
    missing = [k for k in need if k not in manifest]
    if missing:
        raise ZooError(f"{mpath}: missing field(s) {missing}")
    if set(manifest["base"]) != {"name", "config_hash", "weights_fingerprint"}:
        raise ZooError(
            f"{mpath}: base must have name, config_hash, weights_fingerprint; found {sorted(manifest['base'])}"
        )
    if manifest["dtype"] not in DTYPES:
        raise ZooError(f"{mpath}: dtype {manifest['dtype']!r} is not one of {list(DTYPES)}")
    return manifest


def check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise ZooError(f"{where}: a row must be a JSON object, found {type(row).__name__}")
    types = {"id": str, "shard": str, "offset": int, "rank": int, "scale": (int, float), "labels": dict,
             "split": str, "n_params": int, "meta": dict, "sha256": str}
    for k, t in types.items():
        if not isinstance(row.get(k), t):
            raise ZooError(f"{where}: field {k!r} must be {getattr(t, '__name__', 'a number')}, found {row.get(k)!r}")
    if row["rank"] < 1 or row["offset"] < 0:
        raise ZooError(f"{where}: rank must be >= 1 and offset >= 0, found rank {row['rank']}, offset {row['offset']}")
    return row


def json_line(obj: dict, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n"
    except (TypeError, ValueError) as e:
        raise ZooError(f"{what}: fields must be JSON-serialisable and finite ({e})") from None


def matcher(where: Where) -> Callable[[dict], bool]:
    if where is None:
        return lambda row: True
    if callable(where):
        return where
    if isinstance(where, Mapping):
        conditions = dict(where)

        def match(row: dict) -> bool:
            for key, want in conditions.items():
                have = row[key] if key in row else row["labels"].get(key, _ABSENT)
                if isinstance(want, (list, tuple, set, frozenset)):
                    if have not in want:
                        return False
                elif have != want:
                    return False
            return True

        return match
    raise ZooError(f"where must be a callable, a dict or None, found {type(where).__name__}")


_ABSENT = object()


def parse_index(data: bytes, index: Path, shards: "ShardSet") -> tuple[list[dict], int]:
    """Committed rows of ``index.jsonl`` (its bytes ``data``) and the byte length they occupy, each
    row group checked against its shard's header. Only the last row group may be torn."""
    lines = data.split(b"\n")
    lines.pop()  # bytes after the last newline: b"", or a line torn by a kill (not committed)
    rows: list[dict] = []
    ends: list[int] = []  # byte offset after each row
    pos = 0
    for n, line in enumerate(lines, 1):
        pos += len(line) + 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ZooError(f"{index}: line {n} is not valid JSON") from None
        rows.append(check_row(row, f"{index} line {n}"))
        ends.append(pos)
    # Rows come in contiguous groups, one per shard (one append chunk); check each group.
    kept, i = 0, 0
    done_shards: set[str] = set()
    while i < len(rows):
        shard = rows[i]["shard"]
        if shard in done_shards:
            raise ZooError(f"{index}: rows of shard {shard} are not contiguous (line {i + 1})")
        done_shards.add(shard)
        j = i
        while j < len(rows) and rows[j]["shard"] == shard:
            j += 1
        if not _check_group(shards, shard, rows[i:j], last=(j == len(rows))):
            break
        kept = i = j
    rows = rows[:kept]
    seen: set[str] = set()
    for n, r in enumerate(rows, 1):
        if r["id"] in seen:
            raise ZooError(f"{index}: line {n}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    return rows, (ends[kept - 1] if kept else 0)


def _check_group(shards: "ShardSet", shard: str, group: list[dict], last: bool) -> bool:
    """True if ``group`` is exactly the shard's rows; False if it is a torn prefix of the last
    shard (a kill during the index append); raise on anything else."""
    where = shards.dir / shard
    shard_rows = shards.header(shard)[1]
    ids = [r["id"] for r in shard_rows]
    got = [(r["id"], r["offset"]) for r in group]
    want = [(r["id"], r["offset"]) for r in shard_rows]
    if got == want:
        for r, s in zip(group, shard_rows):
            for k in ("rank", "scale", "n_params", "sha256"):
                if r[k] != s[k]:
                    raise ZooError(f"{where}: index row {r['id']!r} has {k}={r[k]!r}, the shard says {s[k]!r}")
        return True
    if last and got == want[: len(got)]:
        return False
    raise ZooError(f"{where}: index rows {[g[0] for g in got][:5]}... do not match the shard's diffs {ids[:5]}...")


# ---- helpers the import formats share ------------------------------------------------------------
def module_name(raw: str, known: set[str] | None, where: str) -> str:
    """Normalise a module name from another tool to the HF name ``model.layers.N.<parent>.<proj>``."""
    name = raw.removeprefix("base_model.model.")  # PEFT's key prefix.removeprefix("language_model.")
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


def single_scale(B: dict[str, Tensor], scales: dict[str, float],
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

"""Diff zoo: a directory of many labelled LoRA weight diffs on one base model.

Layout (format version 1)::

    manifest.json          format, base identity (name, config hash, weights fingerprint), the base
                           config (so shapes can be checked without the model), targets, modules, dtype
    index.jsonl            one committed row per diff (see below), in append order
    shards/shard-NNNNNN.safetensors
                           one file per append chunk of k <= shard_size diffs: per module
                           ``{module}.A`` [k, r_shard, d_in] and ``{module}.B`` [k, d_out, r_shard],
                           each diff zero-padded to the shard's max rank; the header metadata repeats
                           the chunk's rows, so a shard written by a killed job can be adopted later

Index row fields: ``id`` (unique), ``shard`` (file name), ``offset`` (position in the shard),
``rank``, ``scale`` (``dW = scale * B @ A``, PEFT convention), ``labels`` (dict), ``split``,
``n_params``, ``meta`` (dict), ``sha256`` (of the diff's stored bytes: per module in manifest
order, its ``A`` block [r_shard, d_in] then its ``B`` block [d_out, r_shard], zero padding included,
so checking is plain byte hashing of the mapped file). ``id, shard, offset, rank, scale, n_params,
sha256`` are reserved; ``update_rows`` may add any other field (e.g. verification metrics) or
change ``labels`` / ``split`` / ``meta``.

Durability: a shard is written to a temp file, fsynced and renamed into place, and only then are its
rows appended to the index (fsynced): the index append is the commit. A shard is never rewritten.
A job killed at any point leaves a readable zoo: a torn last index line or an incomplete last row
group is ignored when reading, and the next writer truncates it, adopts complete shards that have
no index rows (their digests checked) and deletes temp files, so finished diffs are never redone.
One writer at a time (an advisory lock on the directory); readers need no lock.

Diffs that cover only some of the zoo's modules are stored with zeros for the others (the same
dense delta); a diff whose modules have different ranks is padded to its largest rank.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import math
import mmap
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .adapters import LoraSlot
from .config import TARGET_MODULES, ConfigError, ModelConfig

FORMAT = "dit-zoo"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
SHARDS = "shards"

RESERVED_FIELDS = ("id", "shard", "offset", "rank", "scale", "n_params", "sha256")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".safetensors"
_TMP_MARK = ".tmp-"
_OPEN_SHARDS = 16  # memory-mapped shard files kept per zoo


class ZooError(ValueError):
    """A zoo or diff that cannot be used: names the file / diff / module and expected vs. found."""


# ---- base identity and one diff ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BaseIdentity:
    """Which base model a zoo's diffs were trained on; diffs only make sense on that base."""

    name: str
    config_hash: str
    weights_fingerprint: str

    @classmethod
    def from_model(cls, model: Any) -> "BaseIdentity":
        """From anything with ``.config`` (ModelConfig) and ``.state_dict()`` (e.g. a Transformer)."""
        from .checkpoint import weights_fingerprint  # lazy: checkpoint pulls in loading machinery

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


# ---- the zoo -------------------------------------------------------------------------------------
Where = Callable[[dict], bool] | Mapping[str, Any] | None


class Zoo:
    """An opened zoo directory. Build with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, config: ModelConfig):
        self.path = path
        self.config = config
        self.base = BaseIdentity(**manifest["base"])
        self.targets: tuple[str, ...] = tuple(manifest["targets"])
        self.modules: tuple[str, ...] = tuple(manifest["modules"])
        self.dtype_name: str = manifest["dtype"]
        self.dtype: torch.dtype = _DTYPES[self.dtype_name]
        self.shard_size: int = int(manifest["shard_size"])
        self._shapes = {m: config.linear_shapes()[m.rsplit(".", 1)[1]] for m in self.modules}  # (d_in, d_out)
        self._rows: list[dict] = []
        self._by_id: dict[str, int] = {}
        self._committed_bytes = 0  # prefix of index.jsonl holding complete, checked row groups
        self._index_bytes = 0  # size of index.jsonl when last read
        self._shards: dict[str, tuple[int, list[dict]]] = {}  # checked headers: shard -> (rank, rows)
        self._views_cache: collections.OrderedDict[str, dict[str, Tensor]] = collections.OrderedDict()

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        base: BaseIdentity,
        config: ModelConfig,
        targets: Iterable[str] = TARGET_MODULES,
        dtype: str = "float32",
        shard_size: int = 256,
        exist_ok: bool = False,
    ) -> "Zoo":
        """A new empty zoo; with ``exist_ok`` an existing zoo of the same base/targets/dtype is
        opened and :meth:`recover`-ed instead: how an interrupted job resumes (then skip the ids
        that :meth:`has`)."""
        path = Path(path)
        targets = tuple(targets)
        if dtype not in _DTYPES:
            raise ZooError(f"{path}: dtype {dtype!r} is not supported; choose one of {list(_DTYPES)}")
        if shard_size < 1:
            raise ZooError(f"{path}: shard_size must be >= 1, found {shard_size}")
        try:
            modules = config.module_names(targets)
        except ConfigError as e:
            raise ZooError(f"{path}: {e}") from None
        if base.config_hash != config.config_hash:
            raise ZooError(
                f"{path}: base {base.describe()} does not match the config given "
                f"({config.name or config.model_type}, config {config.config_hash})"
            )
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise ZooError(f"{path}: a zoo already exists here (pass exist_ok=True to resume it)")
            zoo = cls.open(path, base=base, config=config)
            found = (zoo.targets, zoo.dtype_name)
            if found != (targets, dtype):
                raise ZooError(
                    f"{path}: existing zoo has targets {list(zoo.targets)} and dtype {zoo.dtype_name}, "
                    f"expected targets {list(targets)} and dtype {dtype}"
                )
            zoo.recover()
            return zoo
        if path.exists() and not path.is_dir():
            raise ZooError(f"{path}: exists and is not a directory")
        leftovers = [p.name for p in path.iterdir()] if path.is_dir() else []
        # An earlier create killed before its manifest landed leaves only these behind.
        stray = [n for n in leftovers if n not in (INDEX, SHARDS) and _TMP_MARK not in n]
        if stray or _shard_files(path) or _nonempty(path / INDEX):
            raise ZooError(f"{path}: directory is not empty and holds no zoo manifest; refusing to write into it")
        (path / SHARDS).mkdir(parents=True, exist_ok=True)
        (path / INDEX).touch()
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "base": dataclasses.asdict(base),
            "config": config.to_dict(),
            "targets": list(targets),
            "modules": modules,
            "dtype": dtype,
            "shard_size": shard_size,
        }
        write_atomically(path / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
        return cls(path, manifest, config)

    @classmethod
    def open(
        cls,
        path: str | Path,
        base: BaseIdentity | None = None,
        config: ModelConfig | None = None,
        verify: bool = False,
    ) -> "Zoo":
        """Open a zoo; refuse one built on another base, or whose shards do not fit its manifest.

        Always checked: manifest, index rows, every shard header (present, not truncated, tensor
        names / shapes / dtype, rows agree with the shard). ``verify=True`` also reads every diff
        and checks its sha256 (see :meth:`verify`)."""
        path = Path(path)
        manifest = _read_manifest(path)
        stored = BaseIdentity(**manifest["base"])
        if base is not None and not stored.matches(base):
            raise ZooError(
                f"{path}: this zoo was built on base {stored.describe()}, but the base given is "
                f"{base.describe()}; diffs only apply to the base they were trained on"
            )
        own = ModelConfig.from_dict(manifest["config"], source=str(path / MANIFEST), name=stored.name)
        if own.config_hash != stored.config_hash:
            raise ZooError(
                f"{path / MANIFEST}: stored config hashes to {own.config_hash}, but the base identity says "
                f"{stored.config_hash} (manifest edited or corrupted)"
            )
        if config is not None and config.config_hash != stored.config_hash:
            raise ZooError(
                f"{path}: this zoo was built on base {stored.describe()}, but the config given "
                f"({config.name or config.model_type}) has config hash {config.config_hash}"
            )
        zoo = cls(path, manifest, config or own)
        zoo._refresh()
        if verify:
            zoo.verify()
        return zoo

    # ---- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, id: str) -> bool:
        return id in self._by_id

    def has(self, id: str) -> bool:
        return id in self._by_id

    @property
    def rows(self) -> list[dict]:
        """Committed index rows (shallow copies), in append order."""
        return [dict(r) for r in self._rows]

    def row(self, id: str) -> dict:
        return dict(self._row(id))

    def ids(self, split: str | None = None, where: Where = None) -> list[str]:
        """Ids in append order, filtered by split and ``where`` (see :meth:`iter_batches`)."""
        return [r["id"] for r in self._select(split, where, None)]

    def get(self, id: str, dtype: torch.dtype | None = None) -> Diff:
        """One diff, every zoo module at the diff's rank, on CPU (stored dtype unless given)."""
        row = self._row(id)
        views, off, r = self._views(row["shard"]), row["offset"], row["rank"]
        A = {m: views[f"{m}.A"][off, :r].clone() for m in self.modules}
        B = {m: views[f"{m}.B"][off, :, :r].clone() for m in self.modules}
        if dtype is not None:
            A = {m: t.to(dtype) for m, t in A.items()}
            B = {m: t.to(dtype) for m, t in B.items()}
        return Diff(
            id=row["id"], A=A, B=B, scale=row["scale"], labels=dict(row["labels"]),
            split=row["split"], meta=dict(row["meta"]),
        )

    def iter_batches(
        self,
        batch_size: int,
        split: str | None = None,
        where: Where = None,
        ids: Iterable[str] | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[list[dict], LoraSlot]]:
        """Stream diffs as adapter slots: ``(rows, slot)`` with ``slot.A[m]`` [k, r_max, d_in],
        ``slot.B[m]`` [k, d_out, r_max] (ranks zero-padded to the batch's largest), ``slot.scale`` [k]
        and ``slot.index = arange(k)`` (sequence i uses diff i).

        Order: ``ids`` order when given, else append order. ``split`` keeps rows of that split;
        ``where`` is a predicate on the row dict, or a dict whose keys match top-level row fields
        or else ``labels`` entries (a list/tuple/set value means "any of"). Shards are memory-mapped;
        per module, the rows a batch takes from one shard are gathered in one copy."""
        if batch_size < 1:
            raise ZooError(f"{self.path}: batch_size must be >= 1, found {batch_size}")
        chosen = self._select(split, where, ids)
        for start in range(0, len(chosen), batch_size):
            rows = chosen[start : start + batch_size]
            yield [dict(r) for r in rows], self._load_slot(rows, torch.device(device), dtype or self.dtype)

    def info(self) -> dict:
        """Counts by split / category / rank, base identity and size on disk (for ``dit zoo info``)."""
        by_split = collections.Counter(r["split"] for r in self._rows)
        by_category = collections.Counter(str(r["labels"].get("category", "-")) for r in self._rows)
        by_rank = collections.Counter(r["rank"] for r in self._rows)
        files = [p for p in self.path.rglob("*") if p.is_file()]
        committed = {r["shard"] for r in self._rows}
        return {
            "path": str(self.path),
            "base": dataclasses.asdict(self.base),
            "targets": list(self.targets),
            "dtype": self.dtype_name,
            "n_diffs": len(self._rows),
            "n_shards": len(committed),
            "n_params": sum(r["n_params"] for r in self._rows),
            "by_split": dict(sorted(by_split.items())),
            "by_category": dict(sorted(by_category.items())),
            "by_rank": dict(sorted(by_rank.items())),
            "bytes_on_disk": sum(p.stat().st_size for p in files),
            "uncommitted_shards": sorted(p.name for p in _shard_files(self.path) if p.name not in committed),
        }

    def verify(self) -> None:
        """Read every committed diff and check its sha256 and finiteness; raise naming each bad one."""
        by_shard: dict[str, list[dict]] = collections.defaultdict(list)
        for row in self._rows:
            by_shard[row["shard"]].append(row)
        bad = [problem for shard, rows in by_shard.items() for problem in self._check_digests(shard, rows)]
        if bad:
            shown = "; ".join(bad[:10]) + (f"; ... {len(bad) - 10} more" if len(bad) > 10 else "")
            raise ZooError(f"{self.path}: {len(bad)} corrupted diff(s): {shown}")

    # ---- writing ---------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish what a killed writer left: truncate a torn index tail, index complete shards that
        have no rows yet (digests checked), delete temp files. Returns the ids it indexed. Every
        append does this first; a resuming job calls it (via ``create(exist_ok=True)``) before
        deciding which ids are left to do."""
        with self._writer_lock():
            self._refresh()
            before = len(self._rows)
            self._repair()
            return [r["id"] for r in self._rows[before:]]

    def append(self, diffs: Iterable[Diff]) -> list[dict]:
        """Add diffs (new unique ids), ``shard_size`` per new shard file; return their rows.

        Everything is validated before anything is written; each shard is committed on its own, so
        a job killed midway keeps every shard that was committed (and adopts, on the next append,
        any shard fully written but not yet indexed)."""
        diffs = list(diffs)
        if not diffs:
            return []
        with self._writer_lock():
            self._refresh(repair=True)
            self._check_new(diffs)
            for start in range(0, len(diffs), self.shard_size):
                name = self._next_shard_name()
                rows = self._write_shard(name, diffs[start : start + self.shard_size])
                self._commit_rows([dict(r, shard=name) for r in rows])
            return [dict(r) for r in self._rows[-len(diffs) :]]

    def update_rows(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge fields into index rows by id (atomic rewrite of index.jsonl; shards untouched).

        ``labels`` and ``meta`` are merged key by key; other fields are set; reserved fields
        (``id, shard, offset, rank, scale, n_params, sha256``) cannot change."""
        with self._writer_lock():
            self._refresh(repair=True)
            for id, fields in updates.items():
                if id not in self._by_id:
                    raise ZooError(f"{self.path}: update_rows: no diff with id {id!r}")
                bad = [k for k in fields if k in RESERVED_FIELDS]
                if bad:
                    raise ZooError(f"{self.path}: update_rows: field(s) {bad} of {id!r} are reserved")
                _json_line(dict(fields), f"update_rows {id!r}")
            new_rows = [dict(r) for r in self._rows]
            for id, fields in updates.items():
                row = new_rows[self._by_id[id]]
                for k, v in fields.items():
                    if k in ("labels", "meta") and isinstance(v, Mapping):
                        row[k] = {**row[k], **v}
                    else:
                        row[k] = v
                _check_row(row, f"{self.path}: update_rows {id!r}")
                if not row["split"]:
                    raise ZooError(f"{self.path}: update_rows {id!r}: split must be a non-empty string")
            data = "".join(_json_line(r, r["id"]) for r in new_rows).encode()
            write_atomically(self.path / INDEX, lambda tmp: tmp.write_bytes(data))
            self._rows = new_rows
            self._committed_bytes = self._index_bytes = len(data)

    def close(self) -> None:
        self._views_cache.clear()

    def __enter__(self) -> "Zoo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Zoo({str(self.path)!r}, {len(self)} diffs, base {self.base.describe()})"

    # ---- internals: index and shard checks -------------------------------------------------------
    def _row(self, id: str) -> dict:
        try:
            return self._rows[self._by_id[id]]
        except KeyError:
            raise ZooError(f"{self.path}: no diff with id {id!r}") from None

    def _select(self, split: str | None, where: Where, ids: Iterable[str] | None) -> list[dict]:
        match = _matcher(where)
        rows = self._rows if ids is None else [self._row(i) for i in ids]
        return [r for r in rows if (split is None or r["split"] == split) and match(r)]

    def _refresh(self, repair: bool = False) -> None:
        """(Re)read index.jsonl, keeping the committed prefix; with ``repair`` (writer, under the
        lock) truncate a torn tail, adopt complete unindexed shards and delete temp files."""
        index = self.path / INDEX
        try:
            data = index.read_bytes()
        except FileNotFoundError:
            raise ZooError(f"{index}: missing (every zoo has an index, even an empty one)") from None
        rows, committed = self._parse_index(data)
        self._rows = rows
        self._by_id = {r["id"]: i for i, r in enumerate(rows)}
        self._committed_bytes, self._index_bytes = committed, len(data)
        if repair:
            self._repair()

    def _parse_index(self, data: bytes) -> tuple[list[dict], int]:
        """Committed rows and the byte length they occupy. Only the last row group may be torn."""
        index = self.path / INDEX
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
            rows.append(_check_row(row, f"{index} line {n}"))
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
            if not self._check_group(shard, rows[i:j], last=(j == len(rows))):
                break
            kept = i = j
        rows = rows[:kept]
        seen: set[str] = set()
        for n, r in enumerate(rows, 1):
            if r["id"] in seen:
                raise ZooError(f"{index}: line {n}: duplicate id {r['id']!r}")
            seen.add(r["id"])
        return rows, (ends[kept - 1] if kept else 0)

    def _check_group(self, shard: str, group: list[dict], last: bool) -> bool:
        """True if ``group`` is exactly the shard's rows; False if it is a torn prefix of the last
        shard (a kill during the index append); raise on anything else."""
        where = self.path / SHARDS / shard
        shard_rows = self._shard_header(shard)[1]
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

    def _shard_header(self, shard: str) -> tuple[int, list[dict]]:
        """Check one shard file's header against the manifest; return its rank and the rows it
        carries (cached: a shard is never rewritten)."""
        if shard in self._shards:
            return self._shards[shard]
        where = self.path / SHARDS / shard
        try:
            with safe_open(str(where), framework="pt") as f:
                meta = f.metadata() or {}
                slices = {k: f.get_slice(k) for k in f.keys()}
                shapes = {k: (s.get_shape(), s.get_dtype()) for k, s in slices.items()}
        except FileNotFoundError:
            raise ZooError(f"{where}: shard file is missing") from None
        except (SafetensorError, OSError) as e:
            raise ZooError(f"{where}: shard file is truncated or corrupted ({e})") from None
        if meta.get("format") != f"{FORMAT}-shard/{FORMAT_VERSION}" or "rows" not in meta:
            raise ZooError(f"{where}: not a {FORMAT} shard (header metadata {sorted(meta)})")
        try:
            rows = [_check_row(dict(r, shard=shard), str(where)) for r in json.loads(meta["rows"])]
        except (json.JSONDecodeError, TypeError, ZooError) as e:
            raise ZooError(f"{where}: header rows are unreadable ({e})") from None
        k = len(rows)
        r_shard = max((r["rank"] for r in rows), default=0)
        want_keys = {f"{m}.{s}" for m in self.modules for s in "AB"}
        if set(shapes) != want_keys:
            extra, missing = sorted(set(shapes) - want_keys), sorted(want_keys - set(shapes))
            raise ZooError(
                f"{where}: tensors do not match the zoo's modules (extra {extra[:3]}, missing {missing[:3]})"
            )
        st_dtype = _ST_DTYPES[self.dtype_name]
        for m in self.modules:
            d_in, d_out = self._shapes[m]
            for side, want in (("A", [k, r_shard, d_in]), ("B", [k, d_out, r_shard])):
                shape, dt = shapes[f"{m}.{side}"]
                if list(shape) != want or dt != st_dtype:
                    raise ZooError(
                        f"{where}: {m}.{side} is {dt}{list(shape)}, expected {st_dtype}{want} "
                        f"for {k} diffs of max rank {r_shard} on base {self.base.describe()}"
                    )
        if [r["offset"] for r in rows] != list(range(k)):
            raise ZooError(f"{where}: header rows have offsets {[r['offset'] for r in rows][:8]}, expected 0..{k - 1}")
        self._shards[shard] = (r_shard, rows)
        return r_shard, rows

    def _check_digests(self, shard: str, rows: list[dict]) -> list[str]:
        """Problems (empty if none) of ``rows`` of one shard: sha256 mismatch, NaN/Inf, unreadable."""
        try:
            views = self._views(shard)
            k = next(iter(views.values())).shape[0]
            A = {m: views[f"{m}.A"] for m in self.modules}  # [k, r_shard, d_in]
            B = {m: views[f"{m}.B"] for m in self.modules}  # [k, d_out, r_shard]
            digests = _row_digests(A, B, self.modules, k)
            bad_rows = set()
            for t in (*A.values(), *B.values()):
                if not bool(torch.isfinite(t).all()):
                    bad_rows |= {i for i in range(k) if not bool(torch.isfinite(t[i]).all())}
        except (OSError, ValueError, RuntimeError) as e:  # ZooError is a ValueError
            return [f"{shard} unreadable ({e})"]
        problems = []
        for r in rows:
            if digests[r["offset"]] != r["sha256"]:
                problems.append(f"{r['id']!r} in {shard} (offset {r['offset']}) fails its sha256 check")
            elif r["offset"] in bad_rows:
                problems.append(f"{r['id']!r} in {shard} holds NaN or Inf")
        return problems

    def _views(self, shard: str) -> dict[str, Tensor]:
        """Zero-copy tensors over the memory-mapped shard (header already checked by
        ``_shard_header``): a read touches only the pages of the rows it takes."""
        views = self._views_cache.get(shard)
        if views is not None:
            self._views_cache.move_to_end(shard)
            return views
        self._shard_header(shard)
        where = self.path / SHARDS / shard
        try:
            with open(where, "rb") as fh:
                # ACCESS_COPY: a private, writable mapping (torch wants a writable buffer); never written.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise ZooError(f"{where}: cannot map shard ({e})") from None
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        raw = torch.frombuffer(mm, dtype=torch.uint8)
        start = 8 + n
        views = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            lo, hi = spec["data_offsets"]
            views[name] = raw[start + lo : start + hi].view(self.dtype).view(spec["shape"])
        self._views_cache[shard] = views
        if len(self._views_cache) > _OPEN_SHARDS:
            self._views_cache.popitem(last=False)
        return views

    def _load_slot(self, rows: list[dict], device: torch.device, dtype: torch.dtype) -> LoraSlot:
        k = len(rows)
        r_max = max(r["rank"] for r in rows)
        by_shard: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # shard -> (offset, pos)
        for pos, r in enumerate(rows):
            by_shard[r["shard"]].append((r["offset"], pos))
        plan = []  # per shard: views, rank to read, shard rows to take, batch positions to fill
        for shard, pairs in by_shard.items():
            offsets, positions = [o for o, _ in pairs], [p for _, p in pairs]
            # Rows beyond each diff's own rank are zeros in the shard, so one rank cut serves all.
            r = min(r_max, self._shard_header(shard)[0])
            plan.append((self._views(shard), r, _as_slice(offsets) or torch.tensor(offsets),
                         _as_slice(positions) or torch.tensor(positions)))
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        for m in self.modules:
            d_in, d_out = self._shapes[m]
            a = torch.zeros(k, r_max, d_in, dtype=self.dtype)
            b = torch.zeros(k, d_out, r_max, dtype=self.dtype)
            for views, r, take, put in plan:
                src_a, src_b = views[f"{m}.A"][:, :r], views[f"{m}.B"][:, :, :r]
                src_a = src_a[take] if isinstance(take, slice) else src_a.index_select(0, take)
                src_b = src_b[take] if isinstance(take, slice) else src_b.index_select(0, take)
                # index_copy_ rather than a[idx] = ...: advanced-index assignment is far slower on CPU
                if isinstance(put, slice):
                    a[put, :r] = src_a
                    b[put, :, :r] = src_b
                else:
                    a[:, :r].index_copy_(0, put, src_a)
                    b[:, :, :r].index_copy_(0, put, src_b)
            A[m] = a.to(device=device, dtype=dtype)
            B[m] = b.to(device=device, dtype=dtype)
        scale = torch.tensor([float(r["scale"]) for r in rows], dtype=torch.float32, device=device)
        return LoraSlot(A=A, B=B, scale=scale, index=torch.arange(k, device=device), name="zoo")

    # ---- internals: writing ----------------------------------------------------------------------
    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ZooError(f"{self.path}: another process is writing to this zoo") from None
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock (also when the process dies)

    def _repair(self) -> None:
        """Writer-side recovery after a killed job (called under the lock)."""
        index = self.path / INDEX
        if self._index_bytes != self._committed_bytes:
            with open(index, "r+b") as fh:
                fh.truncate(self._committed_bytes)
                fh.flush()
                os.fsync(fh.fileno())
            self._index_bytes = self._committed_bytes
        for p in list((self.path / SHARDS).iterdir()) + list(self.path.iterdir()):
            if _TMP_MARK in p.name and p.is_file():
                p.unlink()
        committed = {r["shard"] for r in self._rows}
        for p in _shard_files(self.path):
            if p.name not in committed:
                self._adopt(p.name)

    def _adopt(self, shard: str) -> None:
        """Index a shard that was fully written (atomic rename) before its rows were committed.
        A shard that fails any check is left in place, untouched and unindexed (see ``info()``)."""
        try:
            rows = self._shard_header(shard)[1]
        except ZooError:
            return
        if any(r["id"] in self._by_id for r in rows) or self._check_digests(shard, rows):
            return
        self._commit_rows([dict(r) for r in rows])

    def _check_new(self, diffs: list[Diff]) -> None:
        seen: set[str] = set()
        for d in diffs:
            if not isinstance(d.id, str) or not d.id:
                raise ZooError(f"{self.path}: diff id must be a non-empty string, found {d.id!r}")
            if d.id in self._by_id:
                raise ZooError(f"{self.path}: a diff with id {d.id!r} is already in the zoo")
            if d.id in seen:
                raise ZooError(f"{self.path}: id {d.id!r} appears twice in one append")
            seen.add(d.id)
            d.validate(self.config, source=str(self.path))
            extra = sorted(set(d.A) - set(self.modules))
            if extra:
                raise ZooError(
                    f"{self.path}: diff {d.id!r} has modules outside the zoo's targets "
                    f"{list(self.targets)}: {extra[:3]}"
                )
            if not isinstance(d.split, str) or not d.split:
                raise ZooError(f"{self.path}: diff {d.id!r}: split must be a non-empty string, found {d.split!r}")
            _json_line({"labels": d.labels, "meta": d.meta}, f"diff {d.id!r}")

    def _next_shard_name(self) -> str:
        numbers = [_shard_number(p.name) for p in _shard_files(self.path)]
        return f"{_SHARD_PREFIX}{max(numbers, default=0) + 1:06d}{_SHARD_SUFFIX}"

    def _write_shard(self, shard: str, diffs: list[Diff]) -> list[dict]:
        """Write one shard file atomically; return its rows (without ``shard``)."""
        k = len(diffs)
        r_shard = max(d.rank for d in diffs)
        A = {m: torch.zeros(k, r_shard, self._shapes[m][0], dtype=self.dtype) for m in self.modules}
        B = {m: torch.zeros(k, self._shapes[m][1], r_shard, dtype=self.dtype) for m in self.modules}
        for m in self.modules:
            if all(m in d.A and d.A[m].shape[0] == r_shard for d in diffs):  # the common case: one copy
                torch.stack([d.A[m].detach().to("cpu", self.dtype) for d in diffs], out=A[m])
                torch.stack([d.B[m].detach().to("cpu", self.dtype) for d in diffs], out=B[m])
                continue
            for i, d in enumerate(diffs):
                if m in d.A:
                    rm = d.A[m].shape[0]
                    A[m][i, :rm] = d.A[m].detach().to("cpu", self.dtype)
                    B[m][i, :, :rm] = d.B[m].detach().to("cpu", self.dtype)
        digests = _row_digests(A, B, self.modules, k)
        rows = [
            {"id": d.id, "offset": i, "rank": d.rank, "scale": float(d.scale), "labels": d.labels,
             "split": d.split, "n_params": d.n_params, "meta": d.meta, "sha256": digests[i]}
            for i, d in enumerate(diffs)
        ]
        tensors = {f"{m}.{s}": t[m] for m in self.modules for s, t in (("A", A), ("B", B))}
        meta = {"format": f"{FORMAT}-shard/{FORMAT_VERSION}", "rows": json.dumps(rows, allow_nan=False)}
        write_atomically(self.path / SHARDS / shard, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        rows = json.loads(meta["rows"])  # what a reader gets back; shares no dicts with the caller's diffs
        self._shards[shard] = (r_shard, [dict(r, shard=shard) for r in rows])
        return rows

    def _commit_rows(self, rows: list[dict]) -> None:
        """Append rows to index.jsonl in one write, fsynced: the commit point of a shard."""
        data = "".join(_json_line(r, r["id"]) for r in rows).encode()
        with open(self.path / INDEX, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        for r in rows:
            self._by_id[r["id"]] = len(self._rows)
            self._rows.append(r)
        self._committed_bytes += len(data)
        self._index_bytes = self._committed_bytes


# ---- atomic files --------------------------------------------------------------------------------
def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` via ``write(tmp)`` on a temp file in the same directory, fsync, then rename:
    readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---- helpers -------------------------------------------------------------------------------------
def read_json_file(path: Path, what: str) -> Any:
    """``path`` parsed as JSON; a missing file means its directory is not ``what``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ZooError(f"{path.parent}: not {what} ({path.name} not found)") from None
    except json.JSONDecodeError as e:
        raise ZooError(f"{path}: not valid JSON ({e})") from None


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    manifest = read_json_file(mpath, "a zoo")
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
    if manifest["dtype"] not in _DTYPES:
        raise ZooError(f"{mpath}: dtype {manifest['dtype']!r} is not one of {list(_DTYPES)}")
    return manifest


def _check_row(row: Any, where: str) -> dict:
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


def _json_line(obj: dict, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n"
    except (TypeError, ValueError) as e:
        raise ZooError(f"{what}: fields must be JSON-serialisable and finite ({e})") from None


def _matcher(where: Where) -> Callable[[dict], bool]:
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


def _row_digests(A: Mapping[str, Tensor], B: Mapping[str, Tensor], modules: Iterable[str], k: int) -> list[str]:
    """sha256 per shard row: per module, the row's A block then its B block, as stored bytes.
    Works on byte views of whole tensors, so hashing k rows costs no per-row tensor ops."""
    hashes = [hashlib.sha256() for _ in range(k)]
    for m in modules:
        for t in (A[m], B[m]):
            raw = _raw_bytes(t)
            step = len(raw) // k
            for i, h in enumerate(hashes):
                h.update(raw[i * step : (i + 1) * step])
    return [h.hexdigest() for h in hashes]


def _raw_bytes(t: Tensor) -> memoryview:
    """The tensor's bytes in its own dtype (bf16 too), without a copy when contiguous."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _as_slice(positions: list[int]) -> slice | None:
    """``positions`` as a slice when they are consecutive (the common, in-order case)."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return None


def _shard_files(path: Path) -> list[Path]:
    d = path / SHARDS
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir()
        if p.name.startswith(_SHARD_PREFIX) and p.name.endswith(_SHARD_SUFFIX) and _TMP_MARK not in p.name
        and _shard_number(p.name) >= 0
    )


def _shard_number(name: str) -> int:
    digits = name[len(_SHARD_PREFIX) : -len(_SHARD_SUFFIX)]
    return int(digits) if digits.isdigit() else -1


def _nonempty(p: Path) -> bool:
    return p.exists() and p.stat().st_size > 0

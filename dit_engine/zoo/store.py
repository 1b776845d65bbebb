"""The zoo store: a directory of many labelled LoRA weight diffs on one base model.

Format: :mod:`dit_engine.zoo.format` (manifest, index rows), :mod:`dit_engine.zoo.shards` (shard files).

Durability: a shard is written to a temp file, fsynced and renamed into place, and only then are its
rows appended to the index (fsynced): the index append is the commit. A shard is never rewritten.
A job killed at any point leaves a readable zoo: a torn last index line or an incomplete last row
group is ignored when reading, and the next writer truncates it, adopts complete shards that have
no index rows (their digests checked) and deletes temp files, so finished diffs are never redone.
One writer at a time (an advisory lock on the directory, held for a whole job by :meth:`Zoo.writer`;
the holder's pid is written to ``writer.pid`` so a refused writer can say who holds it); readers
need no lock.

Diffs that cover only some of the zoo's modules are stored with zeros for the others (the same
dense delta); a diff whose modules have different ranks is padded to its largest rank.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters import LoraSlot
from ..config import TARGET_MODULES, ConfigError, ModelConfig
from ..files import TMP_MARK, named_error, write_atomically
from .format import (DTYPES, FORMAT, FORMAT_VERSION, INDEX, MANIFEST, RESERVED_FIELDS, SHARDS, BaseIdentity,
                     Diff, Where, ZooError, check_row, json_line, matcher, parse_index, read_manifest)
from .lock import WriterLock
from .shards import ShardSet, shard_files

class Zoo:
    """An opened zoo directory. Build with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, config: ModelConfig):
        self.path = path
        self.config = config
        self.base = BaseIdentity(**manifest["base"])
        self.targets: tuple[str, ...] = tuple(manifest["targets"])
        self.modules: tuple[str, ...] = tuple(manifest["modules"])
        self.dtype_name: str = manifest["dtype"]
        self.dtype: torch.dtype = DTYPES[self.dtype_name]
        self.shard_size: int = int(manifest["shard_size"])
        self._shapes = {m: config.linear_shapes()[m.rsplit(".", 1)[1]] for m in self.modules}  # (d_in, d_out)
        self._rows: list[dict] = []
        self._by_id: dict[str, int] = {}
        self._committed_bytes = 0  # prefix of index.jsonl holding complete, checked row groups
        self._index_bytes = 0  # size of index.jsonl when last read
        self._shardset = ShardSet(path, self.modules, self._shapes, self.dtype_name, self.base.describe())
        self._lock = WriterLock(path)  # one writer at a time, held for a whole job by writer()

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
        if dtype not in DTYPES:
            raise ZooError(f"{path}: dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
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
        stray = [n for n in leftovers if n not in (INDEX, SHARDS) and TMP_MARK not in n]
        if stray or shard_files(path) or _nonempty(path / INDEX):
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
        manifest = read_manifest(path)
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
        views, off, r = self._shardset.views(row["shard"]), row["offset"], row["rank"]
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
            yield [dict(r) for r in rows], self._shardset.gather(rows, torch.device(device), dtype or self.dtype)

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
            "uncommitted_shards": sorted(p.name for p in self._shardset.files() if p.name not in committed),
        }

    def verify(self) -> None:
        """Read every committed diff and check its sha256 and finiteness; raise naming each bad one."""
        by_shard: dict[str, list[dict]] = collections.defaultdict(list)
        for row in self._rows:
            by_shard[row["shard"]].append(row)
        bad = [problem for shard, rows in by_shard.items() for problem in self._shardset.check_digests(shard, rows)]
        if bad:
            shown = "; ".join(bad[:10]) + (f"; ... {len(bad) - 10} more" if len(bad) > 10 else "")
            raise ZooError(f"{self.path}: {len(bad)} corrupted diff(s): {shown}")

    # ---- writing ---------------------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator["Zoo"]:
        """Hold the writer lock for a whole job (``with zoo.writer(): ...``): a second writer is
        refused at once, before it does any work, not when it comes to append. Re-reads the index
        (and finishes what a killed writer left) once the lock is held. Appends inside reuse it."""
        with self._writer_lock():
            self._refresh(repair=True)
            yield self

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
            chunks = [diffs[s : s + self.shard_size] for s in range(0, len(diffs), self.shard_size)]
            stacked = [self._stack_checked(chunk) for chunk in chunks]  # every chunk checked first
            for chunk, (A, B) in zip(chunks, stacked):
                name = self._shardset.next_name()
                rows = self._shardset.write(name, chunk, A, B)
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
                json_line(dict(fields), f"update_rows {id!r}")
            new_rows = [dict(r) for r in self._rows]
            for id, fields in updates.items():
                row = new_rows[self._by_id[id]]
                for k, v in fields.items():
                    if k in ("labels", "meta") and isinstance(v, Mapping):
                        row[k] = {**row[k], **v}
                    else:
                        row[k] = v
                check_row(row, f"{self.path}: update_rows {id!r}")
                if not row["split"]:
                    raise ZooError(f"{self.path}: update_rows {id!r}: split must be a non-empty string")
            data = "".join(json_line(r, r["id"]) for r in new_rows).encode()
            write_atomically(self.path / INDEX, lambda tmp: tmp.write_bytes(data))
            self._rows = new_rows
            self._committed_bytes = self._index_bytes = len(data)

    def close(self) -> None:
        self._shardset.close()

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
        match = matcher(where)
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
        rows, committed = parse_index(data, self.path / INDEX, self._shardset)
        self._rows = rows
        self._by_id = {r["id"]: i for i, r in enumerate(rows)}
        self._committed_bytes, self._index_bytes = committed, len(data)
        if repair:
            self._repair()

    # ---- internals: writing ----------------------------------------------------------------------
    def _writer_lock(self):
        return self._lock.held()

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
            if TMP_MARK in p.name and p.is_file():
                p.unlink()
        committed = {r["shard"] for r in self._rows}
        for p in self._shardset.files():
            if p.name not in committed:
                self._adopt(p.name)

    def _adopt(self, shard: str) -> None:
        """Index a shard that was fully written (atomic rename) before its rows were committed.
        A shard that fails any check is left in place, untouched and unindexed (see ``info()``)."""
        try:
            rows = self._shardset.header(shard)[1]
        except ZooError:
            return
        if any(r["id"] in self._by_id for r in rows) or self._shardset.check_digests(shard, rows):
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
            json_line({"labels": d.labels, "meta": d.meta}, f"diff {d.id!r}")

    def _stack_checked(self, diffs: list[Diff]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The chunk's shard tensors, checked finite *in the zoo's dtype*: a float64 value beyond
        the zoo's range would be stored as inf, and a shard is never rewritten."""
        A, B = self._shardset.stack(diffs)
        for m in self.modules:
            for side, t in (("A", A[m]), ("B", B[m])):
                finite = torch.isfinite(t.flatten(1)).all(dim=1)
                if not bool(finite.all()):
                    d = diffs[int((~finite).nonzero()[0])]
                    raise ZooError(
                        f"{self.path}: diff {d.id!r}: {m} {side} has values beyond the range of this zoo's "
                        f"dtype {self.dtype_name} (largest magnitude {float(_abs_max(d, m, side)):.3g})"
                    )
        return A, B

    def _commit_rows(self, rows: list[dict]) -> None:
        """Append rows to index.jsonl in one write, fsynced: the commit point of a shard. A failed
        append (a full disk) is cut back off, so the index keeps exactly its committed rows (the
        shard is adopted by the next writer), and raises an OSError naming the index."""
        index = self.path / INDEX
        data = "".join(json_line(r, r["id"]) for r in rows).encode()
        fd = os.open(index, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, self._committed_bytes)
            except OSError:
                pass  # a torn tail is cut by the next writer
            raise named_error(e, index) from None
        finally:
            os.close(fd)
        for r in rows:
            self._by_id[r["id"]] = len(self._rows)
            self._rows.append(r)
        self._committed_bytes += len(data)
        self._index_bytes = self._committed_bytes


def _nonempty(p: Path) -> bool:
    return p.exists() and p.stat().st_size > 0


def _abs_max(d: Diff, module: str, side: str) -> float:
    return float((d.A if side == "A" else d.B)[module].detach().double().abs().max())

"""Diff zoo storage and import/export, checked against fp64 dense deltas computed here."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from dit_engine.config import TARGET_MODULES
from dit_engine.zoo import (
    BaseIdentity,
    Diff,
    Zoo,
    ZooError,
    dense_to_lora,
    export_dit_file,
    export_peft,
    import_dit_file,
    import_peft,
)

CFG = tiny_config("qwen3")


def _base(config=CFG, fingerprint: str = "f00dfeed") -> BaseIdentity:
    return BaseIdentity(config.name, config.config_hash, fingerprint)


def _diff(id: str, rank: int = 2, config=CFG, modules=None, scale=None, seed: int = 0, dtype=torch.float32,
          labels=None, split: str = "train", module_ranks=None) -> Diff:
    g = torch.Generator().manual_seed(seed)
    shapes = config.linear_shapes()
    A, B = {}, {}
    for m in modules or config.module_names(TARGET_MODULES):
        d_in, d_out = shapes[m.rsplit(".", 1)[1]]
        r = (module_ranks or {}).get(m, rank)
        A[m] = torch.randn(r, d_in, generator=g).to(dtype)
        B[m] = torch.randn(d_out, r, generator=g).to(dtype)
    return Diff(id=id, A=A, B=B, scale=1.0 / rank if scale is None else scale,
                labels=dict(labels or {}), split=split, meta={"seed": seed})


def _dense(diff: Diff, m: str) -> torch.Tensor:  # fp64 reference: [d_out, d_in]
    if m not in diff.A:
        return None
    return diff.scale * (diff.B[m].double() @ diff.A[m].double())


def _assert_same_deltas(got: Diff, want: Diff, config=CFG, tol: float = 0.0):
    for m in config.module_names(TARGET_MODULES):
        ref = _dense(want, m)
        if ref is None:
            if m in got.A:
                assert torch.count_nonzero(got.B[m].double() @ got.A[m].double()) == 0, m
            continue
        out = got.scale * (got.B[m].double() @ got.A[m].double())
        err = (out - ref).norm() / ref.norm()
        assert err <= tol + 1e-12, (m, float(err))


def _zoo(tmp_path, name="zoo", **kw) -> Zoo:
    return Zoo.create(tmp_path / name, _base(), CFG, **kw)


def _file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((path / "shards").iterdir())}


# ---- Diff ------------------------------------------------------------------------------------------
def test_diff_delta_rank_and_validation():
    d = _diff("a", rank=3, module_ranks={"model.layers.0.mlp.up_proj": 1})
    m = "model.layers.1.self_attn.o_proj"
    assert d.rank == 3
    assert d.n_params == sum(a.numel() + d.B[k].numel() for k, a in d.A.items())
    assert torch.allclose(d.delta(m, torch.float64), _dense(d, m), rtol=0, atol=1e-12)
    d.validate(CFG)

    bad = _diff("b", rank=2)
    bad.A[m] = torch.randn(2, 7)
    with pytest.raises(ZooError, match=r"o_proj A has shape \[2, 7\], expected \[r, 64\]"):
        bad.validate(CFG)
    nan = _diff("c", rank=2)
    nan.B[m][0, 0] = float("nan")
    with pytest.raises(ZooError, match="o_proj B holds NaN"):
        nan.validate(CFG)
    deeper = tiny_config("qwen3", num_hidden_layers=10)
    alien = _diff("d", rank=1, modules=["model.layers.9.self_attn.q_proj"], config=deeper)
    with pytest.raises(ZooError, match="model.layers.9.self_attn.q_proj is not a linear layer"):
        alien.validate(CFG)


# ---- zoo: write, read, stream ----------------------------------------------------------------------
def test_roundtrip_mixed_ranks_partial_modules_and_reopen(tmp_path):
    zoo = _zoo(tmp_path, shard_size=3)
    some = [m for m in CFG.module_names(TARGET_MODULES) if "q_proj" in m or "down_proj" in m]
    diffs = [
        _diff("r1", rank=1, seed=1),
        _diff("r4", rank=4, seed=2, split="test"),
        _diff("part", rank=2, seed=3, modules=some, scale=0.7),
        _diff("mixed", rank=3, seed=4, module_ranks={some[0]: 1, some[1]: 2}),
        _diff("r2", rank=2, seed=5),
    ]
    rows = zoo.append(diffs)
    assert [r["id"] for r in rows] == [d.id for d in diffs]
    assert [r["shard"] for r in rows] == ["shard-000001.safetensors"] * 3 + ["shard-000002.safetensors"] * 2
    assert len(zoo) == 5 and zoo.has("r4") and "nope" not in zoo

    again = Zoo.open(tmp_path / "zoo", base=_base(), config=CFG, verify=True)
    assert again.rows == zoo.rows
    for d in diffs:
        got = again.get(d.id)
        assert got.rank == d.rank and got.scale == d.scale and got.split == d.split and got.meta == d.meta
        assert set(got.A) == set(CFG.module_names(TARGET_MODULES))
        _assert_same_deltas(got, d)
    # Where a module had the diff's full rank, the stored factors are the very same numbers.
    assert torch.equal(again.get("r4").A[some[0]], diffs[1].A[some[0]])


def test_iter_batches_padding_is_exact_and_slot_fits_model(tmp_path):
    zoo = _zoo(tmp_path, shard_size=4)
    diffs = [_diff(f"d{i}", rank=1 + i % 4, seed=i, scale=0.1 * (i + 1)) for i in range(10)]
    zoo.append(diffs[:6])
    zoo.append(diffs[6:])
    by_id = {d.id: d for d in diffs}
    seen = []
    for rows, slot in zoo.iter_batches(batch_size=4, ids=["d9", "d0", "d5", "d4", "d3", "d8", "d1"]):
        k = len(rows)
        slot.validate(CFG, batch=k)
        assert torch.equal(slot.index, torch.arange(k))
        assert slot.rank == max(r["rank"] for r in rows)
        for i, row in enumerate(rows):
            d = by_id[row["id"]]
            assert slot.scale[i].item() == pytest.approx(d.scale, rel=1e-7)
            for m in CFG.module_names(TARGET_MODULES):
                out = slot.scale[i].double() * (slot.B[m][i].double() @ slot.A[m][i].double())
                assert torch.allclose(out, _dense(d, m), rtol=1e-6, atol=1e-9), (row["id"], m)
                assert torch.count_nonzero(slot.A[m][i, d.rank :]) == 0
        seen += [r["id"] for r in rows]
    assert seen == ["d9", "d0", "d5", "d4", "d3", "d8", "d1"]


def test_streamed_slot_runs_the_model_as_merged_weights(tmp_path):
    """zoo -> LoraSlot -> model.forward equals, row by row, the base with W + dW_i merged."""
    import copy

    from dit_engine.adapters import AdapterBatch
    from dit_engine.model import Transformer

    model = Transformer.random(CFG, seed=0)
    zoo = _zoo(tmp_path)
    diffs = [_diff(f"m{i}", rank=1 + i, seed=i, scale=0.02) for i in range(3)]
    zoo.append(diffs)
    ids = torch.randint(0, CFG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    (rows, slot), = zoo.iter_batches(3)
    with torch.no_grad():
        out = model(ids, AdapterBatch(slot))  # [3, 9, V]
        for i, d in enumerate(diffs):
            merged = copy.deepcopy(model)
            params = dict(merged.named_parameters())
            for m in d.A:
                params[f"{m}.weight"] += _dense(d, m).float()
            ref = merged(ids[i : i + 1])[0]
            assert ((out[i] - ref).norm() / ref.norm()) < 1e-5, rows[i]["id"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_diffs_in_and_cuda_slots_out(tmp_path):
    zoo = _zoo(tmp_path)
    diffs = [_diff(f"g{i}", rank=1 + i, seed=i, module_ranks={"model.layers.0.mlp.up_proj": 1}) for i in range(3)]
    on_gpu = [dataclasses.replace(d, A={m: t.cuda() for m, t in d.A.items()}, B={m: t.cuda() for m, t in d.B.items()})
              for d in diffs]
    broken = dataclasses.replace(on_gpu[0], id="nan", B=dict(on_gpu[0].B))
    broken.B["model.layers.1.self_attn.v_proj"] = broken.B["model.layers.1.self_attn.v_proj"] * float("nan")
    with pytest.raises(ZooError, match="v_proj B holds NaN"):
        zoo.append([broken])
    zoo.append(on_gpu)
    (rows, slot), = zoo.iter_batches(3, device="cuda", dtype=torch.bfloat16)
    m = "model.layers.0.mlp.up_proj"
    assert slot.A[m].device.type == "cuda" and slot.A[m].dtype == torch.bfloat16 and slot.scale.device.type == "cuda"
    for i, d in enumerate(diffs):
        for name in d.A:
            got = slot.scale[i].double().cpu() * (slot.B[name][i].double().cpu() @ slot.A[name][i].double().cpu())
            assert ((got - _dense(d, name)).norm() / _dense(d, name).norm()) < 2e-2, (d.id, name)


def test_filters_by_split_label_and_predicate(tmp_path):
    zoo = _zoo(tmp_path)
    cats = ["sports", "music", "food"]
    zoo.append([
        _diff(f"t{i}", rank=1, seed=i, split="test" if i % 3 == 0 else "train",
              labels={"topic": f"topic {i}", "category": cats[i % 3], "trigger": i})
        for i in range(9)
    ])
    assert zoo.ids(split="test") == ["t0", "t3", "t6"]
    assert zoo.ids(where={"category": "music"}) == ["t1", "t4", "t7"]
    assert zoo.ids(split="train", where={"category": ["music", "food"]}) == ["t1", "t2", "t4", "t5", "t7", "t8"]
    assert zoo.ids(where=lambda r: r["labels"]["trigger"] > 6) == ["t7", "t8"]
    assert zoo.ids(where={"rank": 1, "trigger": 4}) == ["t4"]
    batches = list(zoo.iter_batches(2, split="train", where={"category": "food"}))
    assert [[r["id"] for r in rows] for rows, _ in batches] == [["t2", "t5"], ["t8"]]
    with pytest.raises(ZooError, match="no diff with id 'zz'"):
        zoo.get("zz")


def test_append_after_reopen_never_rewrites_shards_and_ids_are_unique(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a", seed=1), _diff("b", seed=2)])
    before = _file_hashes(zoo.path)
    zoo = Zoo.open(zoo.path, base=_base())
    zoo.append([_diff("c", seed=3)])
    after = _file_hashes(zoo.path)
    assert {k: after[k] for k in before} == before and len(after) == 2
    with pytest.raises(ZooError, match="id 'a' is already in the zoo"):
        zoo.append([_diff("a", seed=9)])
    with pytest.raises(ZooError, match="id 'x' appears twice"):
        zoo.append([_diff("x"), _diff("x")])
    bad = _diff("nan", seed=4)
    bad.A["model.layers.1.mlp.gate_proj"][0, 1] = float("inf")
    with pytest.raises(ZooError, match="gate_proj A holds NaN or Inf"):
        zoo.append([_diff("ok", seed=5), bad])
    assert Zoo.open(zoo.path).ids() == ["a", "b", "c"]  # the refused append wrote nothing
    assert _file_hashes(zoo.path) == after


def test_update_rows_merges_fields_and_keeps_shards(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a", labels={"topic": "cats"}), _diff("b", seed=1)])
    shards = _file_hashes(zoo.path)
    zoo.update_rows({"a": {"verify_loss": 0.25, "labels": {"category": "animals"}}, "b": {"split": "test"}})
    reopened = Zoo.open(zoo.path)
    assert reopened.row("a")["verify_loss"] == 0.25
    assert reopened.row("a")["labels"] == {"topic": "cats", "category": "animals"}
    assert reopened.ids(split="test") == ["b"]
    assert _file_hashes(zoo.path) == shards
    with pytest.raises(ZooError, match="reserved"):
        zoo.update_rows({"a": {"rank": 9}})
    with pytest.raises(ZooError, match="no diff with id 'q'"):
        zoo.update_rows({"q": {"x": 1}})


def test_bfloat16_zoo_and_info(tmp_path):
    zoo = _zoo(tmp_path, dtype="bfloat16")
    d = _diff("b", rank=2, labels={"category": "food"})
    zoo.append([d, _diff("c", rank=1, seed=1, split="test")])
    got = Zoo.open(zoo.path, verify=True).get("b")
    assert got.A["model.layers.0.self_attn.q_proj"].dtype == torch.bfloat16
    assert torch.equal(got.A["model.layers.0.self_attn.q_proj"], d.A["model.layers.0.self_attn.q_proj"].bfloat16())
    _, slot = next(zoo.iter_batches(2, dtype=torch.float32))
    assert slot.A["model.layers.0.mlp.up_proj"].dtype == torch.float32
    info = zoo.info()
    assert info["n_diffs"] == 2 and info["n_shards"] == 1 and info["dtype"] == "bfloat16"
    assert info["by_split"] == {"test": 1, "train": 1} and info["by_rank"] == {1: 1, 2: 1}
    assert info["by_category"] == {"-": 1, "food": 1}
    assert info["base"]["config_hash"] == CFG.config_hash and info["bytes_on_disk"] > 0


def test_base_identity_from_model():
    class _Model:
        config = CFG

        def state_dict(self):
            return {"w": torch.arange(6.0).reshape(2, 3)}

    ident = BaseIdentity.from_model(_Model())
    assert ident.config_hash == CFG.config_hash and ident.name == CFG.name and len(ident.weights_fingerprint) == 16
    with pytest.raises(ZooError, match="no ModelConfig"):
        BaseIdentity.from_model(object())


# ---- zoo: refusals ---------------------------------------------------------------------------------
def test_zoo_for_another_base_is_refused(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a")])
    other = _base(fingerprint="0badc0de")
    with pytest.raises(ZooError) as e:
        Zoo.open(zoo.path, base=other)
    assert "weights f00dfeed" in str(e.value) and "weights 0badc0de" in str(e.value)
    wider = tiny_config("qwen3", hidden_size=64)
    with pytest.raises(ZooError, match=f"config given .* has config hash {wider.config_hash}"):
        Zoo.open(zoo.path, config=wider)
    with pytest.raises(ZooError, match="a zoo already exists"):
        _zoo(tmp_path)
    with pytest.raises(ZooError, match="existing zoo has targets"):
        Zoo.create(zoo.path, _base(), CFG, targets=("q_proj",), exist_ok=True)
    assert len(Zoo.create(zoo.path, _base(), CFG, exist_ok=True)) == 1
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("keep me")
    with pytest.raises(ZooError, match="not empty"):
        Zoo.create(tmp_path / "junk", _base(), CFG)


def test_shards_whose_shapes_do_not_fit_the_base_are_refused(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a")])
    # The manifest now claims another (consistent) base: every shard tensor is the wrong shape.
    other = tiny_config("qwen3", intermediate_size=96)
    manifest = json.loads((zoo.path / "manifest.json").read_text())
    manifest["config"] = other.to_dict()
    manifest["base"]["config_hash"] = other.config_hash
    (zoo.path / "manifest.json").write_text(json.dumps(manifest))
    want = r"shard-000001.safetensors: model.layers.0.mlp.gate_proj.B is F32\[1, 80, 2\], expected F32\[1, 96, 2\]"
    with pytest.raises(ZooError, match=want):
        Zoo.open(zoo.path)


def test_corrupted_shards_and_index_are_refused(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a"), _diff("b", seed=1)])
    shard = zoo.path / "shards" / "shard-000001.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[:-100])
    with pytest.raises(ZooError, match="shard-000001.safetensors: shard file is truncated or corrupted"):
        Zoo.open(zoo.path)

    flipped = bytearray(good)
    flipped[-7] ^= 0x40  # a data byte of the last tensor (diff 'b'); the header stays valid
    shard.write_bytes(bytes(flipped))
    Zoo.open(zoo.path)  # structure is fine ...
    with pytest.raises(ZooError, match=r"1 corrupted diff\(s\): 'b' in shard-000001.safetensors .* sha256"):
        Zoo.open(zoo.path, verify=True)  # ... the bytes are not

    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(ZooError, match="shard-000001.safetensors: shard file is truncated or corrupted"):
        Zoo.open(zoo.path)

    shard.unlink()
    with pytest.raises(ZooError, match="shard-000001.safetensors: shard file is missing"):
        Zoo.open(zoo.path)

    shard.write_bytes(good)
    index = zoo.path / "index.jsonl"
    lines = index.read_bytes().split(b"\n")
    index.write_bytes(b"\n".join([b"{not json"] + lines[1:]))
    with pytest.raises(ZooError, match="index.jsonl: line 1 is not valid JSON"):
        Zoo.open(zoo.path)
    row = json.loads(lines[0])
    row["sha256"] = "0" * 64
    index.write_bytes(b"\n".join([json.dumps(row).encode()] + lines[1:]))
    with pytest.raises(ZooError, match="index row 'a' has sha256="):
        Zoo.open(zoo.path)


# ---- zoo: interrupted jobs -------------------------------------------------------------------------
def _job(path: Path) -> list[str]:
    """Append 7 deterministic diffs in chunks of 3, skipping ids already present (the resume rule);
    return the ids this run appended."""
    zoo = Zoo.create(path, _base(), CFG, shard_size=3, exist_ok=True)
    todo = [f"job{i}" for i in range(7) if not zoo.has(f"job{i}")]
    for start in range(0, len(todo), 3):
        zoo.append([_diff(i, rank=1 + int(i[3:]) % 3, seed=int(i[3:])) for i in todo[start : start + 3]])
    return todo


# Runs _job in a child process that dies (os._exit) at one point of its second shard.
_KILLED_JOB = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import dit_engine.zoo as zoo_mod
    import dit_engine.zoo.shards as shards_mod
    from test_zoo import _job
    fault, path = sys.argv[1], sys.argv[2]
    real_commit, real_save = zoo_mod.Zoo._commit_rows, shards_mod.save_file
    commits = []
    def commit(self, rows):
        if len(commits) == 1 and fault == "before_index":
            os._exit(9)
        if len(commits) == 1 and fault == "torn_index":
            data = "".join(json.dumps(r) + "\\n" for r in rows).encode()
            with open(self.path / "index.jsonl", "ab") as fh:
                fh.write(data[: len(data) // 2 + 3])
            os._exit(9)
        commits.append(rows)
        return real_commit(self, rows)
    def save(tensors, filename, metadata=None):
        if len(commits) == 1 and fault == "mid_shard":
            with open(filename, "wb") as fh:
                fh.write(b"partial")
            os._exit(9)
        return real_save(tensors, filename, metadata=metadata)
    zoo_mod.Zoo._commit_rows, shards_mod.save_file = commit, save
    _job(path)
    """
)


@pytest.fixture(scope="module")
def reference_zoo(tmp_path_factory) -> Zoo:
    path = tmp_path_factory.mktemp("ref") / "zoo"
    assert _job(path) == [f"job{i}" for i in range(7)]
    return Zoo.open(path)


@pytest.mark.parametrize("fault,redone", [
    ("before_index", ["job6"]),  # shard 2 was complete: adopted, not redone
    ("torn_index", ["job6"]),  # half its rows reached the index: shard adopted whole
    ("mid_shard", ["job3", "job4", "job5", "job6"]),  # shard 2 never finished: redone
])
def test_resume_after_kill_gives_the_same_zoo(tmp_path, reference_zoo, fault, redone):
    script = _KILLED_JOB.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, fault, str(tmp_path / "zoo")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    readable = Zoo.open(tmp_path / "zoo", verify=True)  # a reader sees only committed diffs
    assert readable.ids() == ["job0", "job1", "job2"]

    assert _job(tmp_path / "zoo") == redone
    ref, zoo = reference_zoo, Zoo.open(tmp_path / "zoo", verify=True)
    assert zoo.ids() == ref.ids()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "shard"} for r in rows]  # noqa: E731
    assert strip(zoo.rows) == strip(ref.rows)
    for id in ref.ids():
        a, b = zoo.get(id), ref.get(id)
        assert all(torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m]) for m in a.A)
    assert zoo.info()["uncommitted_shards"] == []
    assert not [p for p in (tmp_path / "zoo" / "shards").iterdir() if ".tmp-" in p.name]


def test_torn_index_tail_is_ignored_by_readers_and_repaired_by_writers(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a")])
    committed = (zoo.path / "index.jsonl").read_bytes()
    with open(zoo.path / "index.jsonl", "ab") as fh:
        fh.write(b'{"id": "ghost", "sha')
    assert Zoo.open(zoo.path).ids() == ["a"]
    writer = Zoo.open(zoo.path)
    writer.append([_diff("b", seed=1)])
    text = (zoo.path / "index.jsonl").read_bytes()
    assert text.startswith(committed) and b"ghost" not in text
    assert Zoo.open(zoo.path, verify=True).ids() == ["a", "b"]


def test_one_writer_at_a_time_and_bad_orphans_are_left_alone(tmp_path):
    zoo = _zoo(tmp_path)
    zoo.append([_diff("a")])
    other = Zoo.open(zoo.path)
    with zoo._writer_lock():
        with pytest.raises(ZooError, match=rf"another writer in this process \(pid {os.getpid()}\) is writing to this zoo"):
            other.append([_diff("b", seed=1)])
    (zoo.path / "shards" / "shard-000009.safetensors").write_bytes(b"\x00" * 32)  # not a shard: kept, unindexed
    rows = other.append([_diff("b", seed=1)])
    assert rows[0]["shard"] == "shard-000010.safetensors"
    assert Zoo.open(zoo.path).info()["uncommitted_shards"] == ["shard-000009.safetensors"]
    assert (zoo.path / "shards" / "shard-000009.safetensors").read_bytes() == b"\x00" * 32


# ---- PEFT ------------------------------------------------------------------------------------------
def test_peft_export_then_import_is_lossless(tmp_path):
    d = _diff("peft-me", rank=4, scale=0.37, labels={"topic": "volcanoes", "trigger": 17}, split="test",
              module_ranks={"model.layers.1.self_attn.k_proj": 2})
    out = export_peft(d, tmp_path / "adapter", CFG, base_model_name="tiny/qwen3")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(0.37 * 4) and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == list(TARGET_MODULES)
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.k_proj": 2}
    back = import_peft(out, CFG)
    assert (back.id, back.scale, back.labels, back.split, back.meta) == (d.id, d.scale, d.labels, d.split, d.meta)
    assert set(back.A) == set(d.A)
    for m in d.A:
        assert torch.equal(back.A[m], d.A[m]) and torch.equal(back.B[m], d.B[m]), m
    with pytest.raises(ZooError, match="already holds a PEFT adapter"):
        export_peft(d, out, CFG, base_model_name="tiny/qwen3")

    some = [m for m in CFG.module_names(TARGET_MODULES) if m.startswith("model.layers.0.")]
    part = export_peft(_diff("p", modules=some), tmp_path / "part", CFG, base_model_name="x")
    assert json.loads((part / "adapter_config.json").read_text())["target_modules"] == some


def _foreign_peft(path: Path, config: dict, tensors: dict) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def test_peft_import_of_another_tools_adapter(tmp_path):
    g = torch.Generator().manual_seed(3)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    fac = {q: (torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g)),
           v: (torch.randn(2, 48, generator=g), torch.randn(32, 2, generator=g))}
    tensors = {}
    for m, (a, b) in fac.items():
        tensors[f"base_model.model.{m}.lora_A.default.weight"] = a
        tensors[f"base_model.model.{m}.lora_B.default.weight"] = b
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"],
           "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.v_proj": 3}, "bias": "none"}
    d = import_peft(_foreign_peft(tmp_path / "ext", cfg, tensors), CFG)
    assert d.id == "ext" and d.split == "train" and set(d.A) == {q, v}
    want = {q: 8 / 4**0.5 * (fac[q][1].double() @ fac[q][0].double()),
            v: 3 / 2**0.5 * (fac[v][1].double() @ fac[v][0].double())}
    for m, ref in want.items():
        got = d.scale * (d.B[m].double() @ d.A[m].double())
        assert ((got - ref).norm() / ref.norm()) < 1e-6, m

    old_style = tmp_path / "bin"  # PEFT's older pickle-free-loadable .bin weights
    old_style.mkdir()
    (old_style / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(tensors, old_style / "adapter_model.bin")
    d_bin = import_peft(old_style, CFG)
    assert all(torch.equal(d_bin.A[m], d.A[m]) and torch.equal(d_bin.B[m], d.B[m]) for m in d.A)


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias = 'all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
])
def test_peft_unsupported_configs_are_refused(tmp_path, change, message):
    d = _diff("x", rank=1)
    out = export_peft(d, tmp_path / "a", CFG, base_model_name="x")
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ZooError, match=message):
        import_peft(out, CFG)


def test_peft_bad_weights_are_refused(tmp_path):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["o_proj"], "bias": "none"}
    m = "base_model.model.model.layers.0.self_attn.o_proj"
    ok = {f"{m}.lora_A.weight": torch.randn(2, 64), f"{m}.lora_B.weight": torch.randn(48, 2)}
    with pytest.raises(ZooError, match=r"o_proj B has shape \[40, 2\], expected \[48, 2\]"):
        import_peft(_foreign_peft(tmp_path / "shape", cfg, {**ok, f"{m}.lora_B.weight": torch.randn(40, 2)}), CFG)
    with pytest.raises(ZooError, match="lora_magnitude_vector.*not a LoRA A/B weight"):
        import_peft(_foreign_peft(tmp_path / "dora", cfg, {**ok, f"{m}.lora_magnitude_vector": torch.ones(48)}), CFG)
    nan = torch.randn(2, 64)
    nan[1, 3] = float("nan")
    with pytest.raises(ZooError, match="o_proj A holds NaN"):
        import_peft(_foreign_peft(tmp_path / "nan", cfg, {**ok, f"{m}.lora_A.weight": nan}), CFG)
    far = "base_model.model.model.layers.7.self_attn.o_proj"
    with pytest.raises(ZooError, match="layers.7.self_attn.o_proj' is not a target linear"):
        import_peft(_foreign_peft(tmp_path / "far", cfg, {f"{far}.lora_A.weight": torch.randn(2, 64),
                                                          f"{far}.lora_B.weight": torch.randn(48, 2)}), CFG)


def test_imported_peft_diff_streams_from_a_zoo(tmp_path):
    d = _diff("src", rank=2, scale=0.5)
    zoo = _zoo(tmp_path)
    zoo.append([import_peft(export_peft(d, tmp_path / "a", CFG, base_model_name="x"), CFG)])
    (rows, slot), = zoo.iter_batches(8)
    m = "model.layers.1.mlp.down_proj"
    assert rows[0]["id"] == "src"
    assert torch.allclose(slot.scale[0].double() * (slot.B[m][0].double() @ slot.A[m][0].double()), _dense(d, m))


# ---- DIT paper files -------------------------------------------------------------------------------
def test_dit_file_roundtrip(tmp_path):
    diffs = [_diff(f"d{i}", rank=1 + i, seed=i, labels={"topic": f"topic {i}", "trigger": 100 + i})
             for i in range(3)]
    path = export_dit_file(diffs, tmp_path / "diffs.pt")
    back = import_dit_file(path, config=CFG)
    assert [b.id for b in back] == ["diffs:0", "diffs:1", "diffs:2"]
    for b, d in zip(back, diffs):
        assert b.labels == d.labels and b.scale == 1.0 / d.rank and b.split == "train"
        for m in d.A:
            assert torch.equal(b.A[m], d.A[m]) and torch.equal(b.B[m], d.B[m]), m
    with pytest.raises(ZooError, match="exists"):
        export_dit_file(diffs, path)

    scaled = _diff("s", rank=3, scale=0.3, labels={"topic": "t"})  # not the paper's 1/r: folded into A_dit
    (back,) = import_dit_file(export_dit_file([scaled], tmp_path / "scaled.pt"), config=CFG)
    assert back.scale == 1 / 3
    _assert_same_deltas(back, scaled, tol=1e-6)


def test_dit_paper_layout_and_index_csv(tmp_path):
    """A file laid out as the paper's trainer saves it, built here by hand: its layer computes
    ``x @ B_dit @ A_dit / r`` with A_dit [r, d_out], B_dit [d_in, r]; module keys with or without
    the ``model.`` prefix; bf16 tensors."""
    g = torch.Generator().manual_seed(7)
    entries, refs = [], []
    for i in range(2):
        wd, ref = {}, {}
        for j, m in enumerate(CFG.module_names(TARGET_MODULES)):
            d_in, d_out = CFG.linear_shapes()[m.rsplit(".", 1)[1]]
            a_dit = torch.randn(1, d_out, generator=g).bfloat16()
            b_dit = torch.randn(d_in, 1, generator=g).bfloat16()
            key = m.removeprefix("model.") if j % 2 else m
            wd[key] = (a_dit, b_dit)
            ref[m] = (b_dit.double() @ a_dit.double()).T / 1  # the dense [d_out, d_in] change
        entries.append({"topic": f"topic {i}", "trigger": torch.tensor(500 + i), "weight_diff": wd})
        refs.append(ref)
    pt = tmp_path / "weight_diff_0.pt"
    torch.save(entries, pt)
    n_params = sum(a.numel() + b.numel() for a, b in entries[0]["weight_diff"].values())
    index = tmp_path / "index.csv"
    with open(index, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lora_path", "lora_idx", "n_params", "topic", "trigger", "split"])
        w.writerow(["/elsewhere/run/weight_diff_0.pt", 1, n_params, "topic 1", 501, "test"])
        w.writerow(["/elsewhere/run/weight_diff_0.pt", 0, n_params, "topic 0", 500, "train"])
        w.writerow(["/elsewhere/run/weight_diff_9.pt", 0, n_params, "topic 9", 509, "train"])
    diffs = import_dit_file(pt, index_csv=index, config=CFG)
    assert [d.split for d in diffs] == ["train", "test"]
    assert diffs[1].labels == {"topic": "topic 1", "trigger": 501}
    for d, ref in zip(diffs, refs):
        assert d.n_params == n_params and d.A["model.layers.0.self_attn.q_proj"].dtype == torch.bfloat16
        for m, want in ref.items():
            assert torch.allclose(d.scale * (d.B[m].double() @ d.A[m].double()), want, rtol=0, atol=1e-12), m

    rows = list(csv.reader(open(index)))
    rows[1][2] = str(n_params + 1)
    csv.writer(open(tmp_path / "bad.csv", "w", newline="")).writerows(rows)
    with pytest.raises(ZooError, match="lora_idx 1 has n_params"):
        import_dit_file(pt, index_csv=tmp_path / "bad.csv", config=CFG)
    csv.writer(open(tmp_path / "short.csv", "w", newline="")).writerows(rows[:1] + rows[2:])
    with pytest.raises(ZooError, match="no row for weight_diff_0.pt lora_idx 1"):
        import_dit_file(pt, index_csv=tmp_path / "short.csv", config=CFG)


def test_dit_file_refusals(tmp_path):
    m = "model.layers.0.self_attn.q_proj"
    bad = torch.randn(1, 64)
    bad[0, 5] = float("nan")
    torch.save([{"topic": "t", "weight_diff": {m: (bad, torch.randn(48, 1))}}], tmp_path / "nan.pt")
    with pytest.raises(ZooError, match="q_proj B holds NaN"):
        import_dit_file(tmp_path / "nan.pt", config=CFG)
    torch.save([{"topic": "t", "weight_diff": {m: (torch.randn(2, 64), torch.randn(48, 1))}}], tmp_path / "r.pt")
    with pytest.raises(ZooError, match=r"expected \[r, d_out\] and \[d_in, r\]"):
        import_dit_file(tmp_path / "r.pt")
    head = {"lm_head": (torch.randn(1, 97), torch.randn(48, 1))}
    torch.save([{"topic": "t", "weight_diff": head}], tmp_path / "h.pt")
    with pytest.raises(ZooError, match="'lm_head' is not a target linear"):
        import_dit_file(tmp_path / "h.pt")
    torch.save([{"topic": "t", "weight_diff": {m: (torch.randn(1, 64), torch.randn(48, 1))}, "x": _Opaque()}],
               tmp_path / "pickle.pt")
    with pytest.raises(ZooError, match="not a weights-only torch file"):
        import_dit_file(tmp_path / "pickle.pt")


class _Opaque:
    """An arbitrary object: loading it would need pickle code, which weights_only refuses."""


# ---- dense diffs -----------------------------------------------------------------------------------
def test_dense_to_lora_svd_and_energy():
    g = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(o, i, generator=g, dtype=torch.float64)
            for m in CFG.module_names(TARGET_MODULES)
            for i, o in [CFG.linear_shapes()[m.rsplit(".", 1)[1]]]}
    base["model.norm.weight"] = torch.ones(48, dtype=torch.float64)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.norm.weight"] += 0.1
    planted = {}
    for m in CFG.module_names(TARGET_MODULES):
        w = tuned[f"{m}.weight"]
        U, _ = torch.linalg.qr(torch.randn(w.shape[0], 2, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(w.shape[1], 2, generator=g, dtype=torch.float64))
        planted[m] = U @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V.T  # singular values 3, 1
        w += planted[m]
    del tuned["model.layers.1.self_attn.q_proj.weight"], planted["model.layers.1.self_attn.q_proj"]
    with pytest.raises(ZooError, match="tuned weights have no tensor 'model.layers.1.self_attn.q_proj.weight'"):
        dense_to_lora(base, tuned, CFG, rank=2)
    tuned["model.layers.1.self_attn.q_proj.weight"] = base["model.layers.1.self_attn.q_proj.weight"].clone()

    full, energy = dense_to_lora(base, tuned, CFG, rank=2, svd_dtype=torch.float64, id="ft")
    assert full.rank == 2 and full.id == "ft" and full.meta["not_captured"] == ["model.norm.weight"]
    assert energy["model.layers.1.self_attn.q_proj"] == 1.0  # unchanged module
    for m, p in planted.items():
        assert energy[m] == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(full.delta(m, torch.float64), p, atol=1e-10)
    one, energy1 = dense_to_lora(base, tuned, CFG, rank=1, svd_dtype=torch.float64)
    for m, p in planted.items():
        assert energy1[m] == pytest.approx(9 / 10, abs=1e-12)  # 3^2 / (3^2 + 1^2)
        assert float((one.delta(m, torch.float64) - p).norm()) == pytest.approx(1.0, abs=1e-9)
    wide, _ = dense_to_lora(base, tuned, CFG, rank=100, targets=("k_proj",), svd_dtype=torch.float64)
    assert wide.rank == 100 and set(wide.A) == set(CFG.module_names(("k_proj",)))  # padded past min(d_out, d_in)


def test_peft_library_agrees_both_ways(tmp_path):
    """With PEFT installed (not a dependency): PEFT merges our export to our dense deltas, and an
    adapter PEFT saves (rslora, rank/alpha patterns) imports to PEFT's own merged deltas."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in CFG.to_dict().items() if k != "architectures"})

    def fresh(seed):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
        return model, {k: v.clone() for k, v in model.state_dict().items()}

    ours = _diff("x", rank=4, scale=0.37, module_ranks={"model.layers.1.self_attn.k_proj": 2})
    model, before = fresh(0)
    loaded = peft.PeftModel.from_pretrained(model, export_peft(ours, tmp_path / "ours", CFG, base_model_name="tiny"))
    after = loaded.merge_and_unload().state_dict()
    for m in ours.A:
        got = after[f"{m}.weight"].double() - before[f"{m}.weight"].double()
        assert ((got - _dense(ours, m)).norm() / _dense(ours, m).norm()) < 1e-6, m

    model, before = fresh(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3},
                           init_lora_weights=False)
    theirs = peft.get_peft_model(model, lora)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = import_peft(tmp_path / "theirs", CFG)
    after = theirs.merge_and_unload().state_dict()
    assert len(imported.A) == 3 * CFG.num_hidden_layers
    for m in imported.A:
        want = after[f"{m}.weight"].double() - before[f"{m}.weight"].double()
        assert ((imported.delta(m, torch.float64) - want).norm() / want.norm()) < 1e-6, m

"""--model ORG/NAME: a model already in the local Hugging Face cache, found offline (fake cache trees)."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from cli_world import write_tiny_model

from dit_engine.model_store import resolve_model
from dit_engine.cli import main
from dit_engine.hf_cache import HFCacheError, find_cached_model, hub_cache_dir, looks_like_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def make_cached(cache, files, repo="acme/tiny-chat", commit=COMMIT, ref=True):
    """The hub cache layout: blobs/ hold the files, snapshots/<commit>/ links to them, refs/main names it."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in files.iterdir():
        blob = root / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit + "\n")
    return snap


def test_repo_id_shape():
    assert looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert looks_like_repo_id("Qwen/Qwen2.5-0.5B")
    for not_id in ("default", "runs/a/b", "/abs/path", "./x", "a/", "/b", "../up", "org/..", "a b/c"):
        assert not looks_like_repo_id(not_id), not_id


def test_cache_dir_follows_the_hub_precedence(tmp_path):
    home_default = hub_cache_dir({})
    assert home_default[0].parts[-3:] == (".cache", "huggingface", "hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/x"})[0].as_posix() == "/x/huggingface/hub"
    assert hub_cache_dir({"XDG_CACHE_HOME": "/x", "HF_HOME": "/h"})[0].as_posix() == "/h/hub"
    both = {"HF_HOME": "/h", "HF_HUB_CACHE": "/c", "HUGGINGFACE_HUB_CACHE": "/old"}
    assert hub_cache_dir(both) == (hub_cache_dir({"HF_HUB_CACHE": "/c"})[0], "$HF_HUB_CACHE")
    assert hub_cache_dir({"HUGGINGFACE_HUB_CACHE": "/old", "HF_HOME": "/h"})[0].as_posix() == "/old"


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "home"])
def test_generate_runs_a_cached_model_by_its_name(where, tmp_path, tiny_files, clean_env, monkeypatch, capsys):
    if where == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
        cache = tmp_path / "hubcache"
    elif where == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
        cache = tmp_path / "hfhome" / "hub"
    else:
        cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    snap = make_cached(cache, tiny_files)

    def no_network(*a, **k):
        raise AssertionError("the cache lookup opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert resolve_model("acme/tiny-chat") == snap
    assert main(["generate", "--model", "acme/tiny-chat", "hello", "--max-new-tokens", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt"] == "hello" and 1 <= len(row["token_ids"]) <= 3


def test_a_model_not_in_the_cache_names_where_it_looked(tmp_path, clean_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert main(["generate", "--model", "acme/missing-model", "hello"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dit generate: error: acme/missing-model: ")
    assert str(tmp_path / "hfhome" / "hub" / "models--acme--missing-model") in err[0]
    assert "$HF_HOME/hub" in err[0] and "Traceback" not in err[0]


def test_an_existing_directory_wins_over_the_cache(tmp_path, tiny_files, clean_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    make_cached(tmp_path / "cache", tiny_files)
    local = tmp_path / "work" / "acme" / "tiny-chat"
    shutil.copytree(tiny_files, local)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model("acme/tiny-chat").resolve() == local.resolve()


def test_without_refs_main_a_single_snapshot_is_used(tmp_path, tiny_files):
    snap = make_cached(tmp_path, tiny_files, ref=False)
    assert find_cached_model("acme/tiny-chat", env={"HF_HUB_CACHE": str(tmp_path)}) == snap


def test_without_refs_main_two_snapshots_are_ambiguous(tmp_path, tiny_files):
    make_cached(tmp_path, tiny_files, ref=False)
    make_cached(tmp_path, tiny_files, commit="f" * 40, ref=False)
    with pytest.raises(HFCacheError, match=r"2 snapshot\(s\).*cannot tell which"):
        find_cached_model("acme/tiny-chat", env={"HF_HUB_CACHE": str(tmp_path)})


def test_refs_main_naming_a_missing_snapshot_is_reported(tmp_path, tiny_files):
    snap = make_cached(tmp_path, tiny_files)
    (snap.parents[1] / "refs" / "main").write_text("f" * 40)
    with pytest.raises(HFCacheError, match="f{40}.*does not exist"):
        find_cached_model("acme/tiny-chat", env={"HF_HUB_CACHE": str(tmp_path)})


def test_a_snapshot_without_config_json_is_reported(tmp_path, tiny_files):
    snap = make_cached(tmp_path, tiny_files)
    (snap / "config.json").unlink()
    with pytest.raises(HFCacheError, match="holds no config.json"):
        find_cached_model("acme/tiny-chat", env={"HF_HUB_CACHE": str(tmp_path)})


def test_a_commit_hash_revision_reads_its_snapshot(tmp_path, tiny_files):
    make_cached(tmp_path, tiny_files)
    other = make_cached(tmp_path, tiny_files, commit="e" * 40, ref=False)
    assert find_cached_model("acme/tiny-chat", revision="e" * 40, env={"HF_HUB_CACHE": str(tmp_path)}) == other

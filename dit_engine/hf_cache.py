"""Find a model that is already in the local Hugging Face hub cache, by its ``ORG/NAME``; offline.

The cache is ``$HF_HUB_CACHE`` (or the older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``,
else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``; the first that is set
is the cache, as in ``huggingface_hub``. A model lives in ``models--ORG--NAME/``: ``refs/main``
holds the commit whose files are in ``snapshots/<commit>/``. Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

# ORG/NAME as the hub spells repo ids: letters, digits, '-', '_', '.'; no leading '.' or '-'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HFCacheError(FileNotFoundError):
    """A model that is not (or not completely) in the local cache: names every place looked at."""


def looks_like_repo_id(spec: str) -> bool:
    """``ORG/NAME`` with no further path parts (``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    return bool(_REPO_ID.match(spec)) and ".." not in spec


def hub_cache_dir(env: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The hub cache directory and what chose it (an environment variable or the default)."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser(), f"${var}"
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub", "$HF_HOME/hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub", "$XDG_CACHE_HOME/huggingface/hub"
    return Path("~/.cache/huggingface/hub").expanduser(), "the default ~/.cache/huggingface/hub"


def find_cached_model(repo_id: str, revision: str = "main", env: Mapping[str, str] | None = None) -> Path:
    """The snapshot directory of ``repo_id`` in the local hub cache, holding its ``config.json``.

    ``revision`` is a ref under ``refs/`` (``main``) or a commit hash. Without the ref, a cache
    holding exactly one snapshot uses it. Raises :class:`HFCacheError` naming what was looked for
    and where."""
    if not looks_like_repo_id(repo_id):
        raise HFCacheError(f"{repo_id!r} is not a Hugging Face model id (expected ORG/NAME)")
    cache, chosen_by = hub_cache_dir(env)
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    looked = f"looked in {repo} (hub cache {cache}, from {chosen_by}); nothing is downloaded"
    if not repo.is_dir():
        raise HFCacheError(f"{repo_id}: not a directory here and not in the local Hugging Face cache: {looked}")
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        where = f"{ref} names commit {commit!r}"
    elif (snapshots / revision).is_dir():
        commit, where = revision, f"revision {revision!r} is a snapshot"
    else:
        found = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
        if len(found) != 1:
            raise HFCacheError(f"{repo_id}: the cache has no {ref} and {len(found)} snapshot(s) in {snapshots} "
                               f"{found}; cannot tell which to use: {looked}")
        commit, where = found[0], f"no {ref}; the only snapshot is {found[0]}"
    snapshot = snapshots / commit
    if not snapshot.is_dir():
        raise HFCacheError(f"{repo_id}: {where}, but {snapshot} does not exist (an interrupted download?): {looked}")
    if not (snapshot / "config.json").is_file():
        raise HFCacheError(f"{repo_id}: {snapshot} holds no config.json (only part of the model was downloaded?); "
                           f"{looked}")
    return snapshot

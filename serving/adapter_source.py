"""Adapters as replicas fetch them: named by their content, pulled from the artifact store by
the replica itself, verified, cached locally within bounds.

A gateway hands a vLLM replica a *name*, never a path of its own machine:

    <storage prefix>@<content digest>

The digest is the sha256 of the version's file list as the registry recorded it (every
file's relative path, sha256 and size, canonical JSON). The replica (serving/vllm_plugin.py,
inside vLLM) lists the prefix in the bucket, downloads every file, hashes what it got and
loads it only if the digest of what it holds equals the one in the name. So:
- a replica needs only the storage URL and read credentials (no database, no shared disk);
- bytes altered in the bucket are never loaded: they no longer match the name the registry
  vouched for;
- a name can never stand for other weights. vLLM keys its LoRA slots and prefix cache by
  name; new weights (a re-trained version) mean a new digest, so a new name, so no stale slot
  or cached prefix can answer for them.

This module imports neither vllm nor torch nor the database layer: the gateway uses it to
name adapters, the replica's plugin to fetch them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from api.storage import ArtifactStore, StorageError

log = logging.getLogger(__name__)
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
# The replica plugin's route that fetches, verifies and loads an adapter ahead of a request.
LOAD_PATH = "/loraplex/v1/load_adapter"
INFO_PATH = "/loraplex/v1/info"  # GET: {"lora_op": "grouped" | "vllm"} (vllm_plugin.py)
# Set by the launcher in every replica it starts (serving/replicas.py): the plugin's
# replica-only behaviour (vllm_plugin.py) stays off in vLLM processes Loraplex did not start.
REPLICA_ENV = "LORAPLEX_REPLICA"
_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9._\-/]{1,400})@(?P<digest>[0-9a-f]{64})$")


class AdapterRefused(Exception):
    """A replica will not load this adapter; `reason` is a short machine-readable word."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def content_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 of a version's file list: {relative path: {"sha256", "size"}}."""
    listing = sorted((rel, str(f["sha256"]), int(f["size"])) for rel, f in files.items())
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def replica_name(*, storage_prefix: str, files: Mapping[str, Mapping[str, Any]]) -> str:
    """The name a replica loads a version under (see the module docstring)."""
    return f"{storage_prefix.strip('/')}@{content_digest(files)}"


def parse_replica_name(name: str) -> tuple[str, str] | None:
    """(storage prefix, digest) of a Loraplex adapter name; None for any other name."""
    match = _NAME.match(name)
    if match is None:
        return None
    prefix = match["prefix"].strip("/")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        return None
    return prefix, match["digest"]


class ReplicaAdapterStore:
    """A replica's own adapter cache: `fetch(name)` gives a verified local directory.

    Entries live in `<root>/<digest>`, read-only. Each fetch or reuse touches the entry; past
    `max_adapters` or `max_bytes`, least recently used entries go, but never the `keep`
    most recent (vLLM may read a loaded adapter's files again when it pages one back in, and
    a replica holds at most about `--max-cpu-loras` of them).
    """

    def __init__(
        self,
        store: ArtifactStore,
        root: Path,
        *,
        max_adapters: int = 256,
        max_bytes: int = 20 << 30,
        keep: int = 16,
    ) -> None:
        self.store = store
        self.root = root
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        # Entries hashed by this process: one left by an earlier run is hashed again first.
        self._verified: set[str] = set()

    def _still_intact(self, target: Path) -> bool:
        present = files_in(target)
        if any(p.is_symlink() for p in present):
            intact = False
        else:
            files = {p.relative_to(target).as_posix(): {"sha256": sha256_of(p),
                                                        "size": p.stat().st_size}
                     for p in present}  # fmt: skip
            intact = content_digest(files) == target.name
        if not intact:
            log.warning("replica adapter cache: %s was altered on disk; fetching it again",
                        target.name[:12])  # fmt: skip
        return intact

    def fetch(self, name: str) -> Path:
        parsed = parse_replica_name(name)
        if parsed is None:
            raise AdapterRefused(f"{name!r} is not a Loraplex adapter name", reason="unknown")
        prefix, digest = parsed
        target = self.root / digest
        with self._lock:
            lock = self._fetching.setdefault(digest, threading.Lock())
        with lock:  # concurrent first requests for one adapter download it once
            if target.is_dir() and (digest in self._verified or self._still_intact(target)):
                self._verified.add(digest)
                _touch(target)
                return target
            self._download(prefix, digest, target)
            self._verified.add(digest)
        self.prune()
        return target

    def _download(self, prefix: str, digest: str, target: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=self.root))
        try:
            try:
                got = self.store.get_dir(prefix, tmp)
            except (FileNotFoundError, StorageError, OSError) as e:
                raise AdapterRefused(
                    f"cannot read {prefix} from the artifact store ({type(e).__name__}: {e})",
                    reason="unreadable",
                ) from e
            missing = [f for f in REQUIRED if f not in got]
            if missing:
                raise AdapterRefused(
                    f"{prefix} is incomplete in the artifact store (missing {', '.join(missing)})",
                    reason="incomplete",
                )
            files = {rel: {"sha256": sha, "size": (tmp / rel).stat().st_size}
                     for rel, sha in got.items()}  # fmt: skip
            actual = content_digest(files)
            if actual != digest:
                raise AdapterRefused(
                    f"the bytes under {prefix} are not the version the registry recorded "
                    f"(content digest {actual[:12]}..., expected {digest[:12]}...): altered "
                    "or replaced in the artifact store; refusing to load them",
                    reason="altered",
                )
            for path in files_in(tmp):
                path.chmod(0o444)
            tmp.chmod(0o755)
            replace_dir(target, tmp)
            log.info("fetched and verified adapter %s (%d files)", prefix, len(files))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prune(self) -> list[str]:
        """Delete least recently used entries past the bounds; returns their digests."""
        with self._lock:
            entries = sorted(
                (p for p in self.root.glob("*") if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.stat().st_mtime,
                reverse=True,  # most recent first
            )
            sizes = [dir_size(p) for p in entries]
            count, total = len(entries), sum(sizes)
            evicted = []
            for path, size in reversed(list(zip(entries, sizes, strict=True))[self.keep :]):
                if count <= self.max_adapters and total <= self.max_bytes:
                    break
                shutil.rmtree(path, ignore_errors=True)
                self._verified.discard(path.name)
                count, total = count - 1, total - size
                evicted.append(path.name)
        for digest in evicted:
            log.info("replica adapter cache: evicted %s (least recently used)", digest[:12])
        return evicted


def replace_dir(target: Path, fresh: Path) -> None:
    """Put `fresh` at `target`; an old copy there is moved aside first, then deleted, so the
    path is never half-written."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        fresh.rename(target)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in files_in(directory)) if directory.is_dir() else 0


def files_in(directory: Path) -> list[Path]:
    """Every file under `directory` (symbolic links included, to be refused)."""
    return [p for p in directory.rglob("*") if p.is_file() or p.is_symlink()]

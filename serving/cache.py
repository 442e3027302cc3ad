"""The local adapter cache: fetch a version's files from the artifact store, verify, keep.

Nothing reaches an engine unless its bytes match the registry row (sha256 and size per file):
- a version is assembled in a temporary folder, every file checked, and only then renamed
  into `<root>/<version id>` (files read-only); a mismatch in the store (bytes altered,
  truncated, a file missing) refuses the version and leaves nothing behind;
- the cached copy is not trusted blindly: the first time this process hands one out (it may
  be left from an earlier run, or altered on disk since), every file is hashed again, and
  afterwards a cheap fingerprint of its files (size, mtime, inode) is compared on each
  request, any change triggering a full re-hash. A copy that fails is replaced by a fresh
  fetch from the store (event `cache_repair`); only a bad store copy refuses the version.

The cache is bounded (`serving_cache_max_adapters`, `serving_cache_max_gib`): after each
fetch, least recently used versions are deleted (event `cache_evict`) until it fits, except
those a request holds (`ensure` ... `release`) or a replica has loaded (vLLM may read an
adapter's files again). An evicted version asked for again is fetched and verified again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from api.models.adapters import AdapterVersion
from api.storage import ArtifactStore, StorageError
from serving.adapter_source import dir_size, files_in, replace_dir, sha256_of
from serving.engines.base import LocalAdapter
from serving.errors import AdapterIntegrityError

log = logging.getLogger(__name__)
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
# (relative path, size, mtime_ns, inode) of every file: changes whenever a file is rewritten.
Fingerprint = tuple[tuple[str, int, int, int], ...]


class AdapterCache:
    def __init__(
        self,
        *,
        store: ArtifactStore,
        root: Path,
        on_event: Callable[[str], None] | None = None,
        max_adapters: int | None = None,
        max_bytes: int | None = None,
        loaded: Callable[[], set[str]] = set,
    ) -> None:
        self.store = store
        self.root = root
        self.on_event = on_event or (lambda event: None)
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.loaded = loaded  # names some replica holds: their files are not deleted
        self._locks: dict[str, asyncio.Lock] = {}
        self._verified: dict[str, Fingerprint] = {}  # version id -> fingerprint when hashed
        # Pruning state, shared with the pruning thread under `_lock`.
        self._lock = threading.Lock()
        self._used: OrderedDict[str, str] = OrderedDict()  # version id -> name, LRU first
        self._pins: Counter[str] = Counter()  # requests using each version now
        self._seeded = False

    def path_of(self, version_id: str) -> Path:
        return self.root / version_id

    async def ensure(self, version: AdapterVersion) -> tuple[LocalAdapter, bool]:
        """The version as a verified local directory, held (never pruned) until `release`;
        says whether it was fetched now."""
        target = self.path_of(version.id)
        adapter = LocalAdapter(name=version.fine_tuned_model, path=target)
        with self._lock:
            self._pins[version.id] += 1
            self._used[version.id] = version.fine_tuned_model
            self._used.move_to_end(version.id)
        try:
            if self._still_verified(version.id, target):
                return adapter, False
            lock = self._locks.setdefault(version.id, asyncio.Lock())
            async with lock:  # concurrent first requests fetch (or re-hash) once
                fetched = await asyncio.to_thread(self._prepare, version, target)
        except BaseException:
            self.release(version.id)
            raise
        if fetched and (self.max_adapters or self.max_bytes):
            await asyncio.to_thread(self.prune, keep_names=self.loaded())
        return adapter, fetched

    def release(self, version_id: str) -> None:
        """A request that `ensure`d this version is done with it."""
        with self._lock:
            self._pins[version_id] -= 1
            if self._pins[version_id] <= 0:
                del self._pins[version_id]

    def in_use(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pins)

    def prune(self, *, keep_names: Collection[str] = ()) -> list[str]:
        """Delete least recently used versions past the bounds (count, bytes), sparing those
        in use by a request or held by a replica; returns the evicted version ids. The
        bounds are soft: when everything is spared, the cache stays over them for a while."""
        with self._lock:
            self._seed()
            for vid in [v for v in self._used if not self.path_of(v).is_dir()]:
                if not self._pins[vid]:
                    del self._used[vid]  # refused, or deleted by hand: nothing to count
            sizes = {vid: dir_size(self.path_of(vid)) for vid in self._used}
            count, total = len(sizes), sum(sizes.values())
            evicted = []
            for vid, name in list(self._used.items()):
                over = (self.max_adapters is not None and count > self.max_adapters) or (
                    self.max_bytes is not None and total > self.max_bytes
                )
                if not over:
                    break
                if self._pins[vid] or name in keep_names:
                    continue
                shutil.rmtree(self.path_of(vid), ignore_errors=True)
                for table in (self._used, self._verified, self._locks, self._pins):
                    table.pop(vid, None)
                count, total = count - 1, total - sizes[vid]
                evicted.append(vid)
        for vid in evicted:
            log.info("adapter cache: evicted %s (least recently used, no replica holds it)", vid)
            self.on_event("cache_evict")
        return evicted

    def _seed(self) -> None:
        """Once: versions left on disk by an earlier run are the least recently used, oldest
        first (their names are unknown here, so no replica's hold can spare them)."""
        if self._seeded:
            return
        self._seeded = True
        found = [p for p in self.root.glob("adv-*") if p.is_dir() and p.name not in self._used]
        for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
            self._used[path.name] = ""
            self._used.move_to_end(path.name, last=False)

    def _still_verified(self, version_id: str, target: Path) -> bool:
        known = self._verified.get(version_id)
        return bool(known) and known == fingerprint(target)

    def _prepare(self, version: AdapterVersion, target: Path) -> bool:
        if self._still_verified(version.id, target):
            return False  # a concurrent request has just done it
        self._verified.pop(version.id, None)
        if target.is_dir():
            problems = local_problems(version, target)
            if not problems:
                self._verified[version.id] = fingerprint(target)
                return False
            log.warning(
                "cached copy of adapter version %s fails verification (%s); fetching it "
                "again from the artifact store",
                version.fine_tuned_model,
                "; ".join(problems),
            )
            self.on_event("cache_repair")
        self._fetch(version, target)
        self._verified[version.id] = fingerprint(target)
        return True

    def _fetch(self, version: AdapterVersion, target: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        download_verified(self.store, version, target)


def download_verified(store: ArtifactStore, version: AdapterVersion, target: Path) -> None:
    """The version's files from the artifact store into `target` (replaced whole, read-only),
    every file checked against the registry row first; AdapterIntegrityError (nothing left
    behind) when one is missing, unreadable or not the bytes the registry recorded."""
    files: dict[str, Any] = dict(version.files or {})
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise AdapterIntegrityError(
            f"Adapter version {version.fine_tuned_model} is incomplete in the registry "
            f"(missing {', '.join(missing)}); it cannot be served.",
            reason="incomplete",
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{version.id}.", dir=target.parent))
    try:
        for rel, expected in sorted(files.items()):
            _fetch_file(store, version, rel, expected, tmp)
        for path in files_in(tmp):
            path.chmod(0o444)  # verified bytes: nothing here rewrites them by accident
        tmp.chmod(0o755)  # replicas may run as another user
        replace_dir(target, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_file(
    store: ArtifactStore, version: AdapterVersion, rel: str, expected: dict[str, Any], tmp: Path
) -> None:
    local = tmp / rel
    if not local.resolve().is_relative_to(tmp.resolve()):
        raise AdapterIntegrityError(
            f"Adapter file path {rel!r} escapes its directory.", reason="unsafe_path"
        )
    try:
        digest = store.get_file(f"{version.storage_prefix}/{rel}", local)
    except (FileNotFoundError, StorageError) as e:
        raise AdapterIntegrityError(
            f"Adapter version {version.fine_tuned_model}: cannot read {rel} from the "
            f"artifact store ({type(e).__name__}); it cannot be served.",
            reason="unreadable",
        ) from e
    problem = mismatch(rel, digest=digest, size=local.stat().st_size, expected=expected)
    if problem:
        raise AdapterIntegrityError(
            f"Adapter version {version.fine_tuned_model} failed verification: {problem}. "
            "The stored bytes were altered; refusing to serve it.",
            reason="altered",
        )


def mismatch(rel: str, *, digest: str, size: int, expected: dict[str, Any]) -> str | None:
    """Why a file's bytes are not the registry's, or None when they are."""
    if size != expected.get("size"):
        return f"{rel} has {size} bytes, the registry expects {expected.get('size')}"
    if digest != expected.get("sha256"):
        return (
            f"{rel} has sha256 {digest[:12]}..., the registry expects "
            f"{str(expected.get('sha256'))[:12]}..."
        )
    return None


def local_problems(version: AdapterVersion, directory: Path) -> list[str]:
    """Every way a local copy differs from the registry row (missing, extra, altered files)."""
    expected: dict[str, Any] = dict(version.files or {})
    present = {p.relative_to(directory).as_posix() for p in files_in(directory)}
    problems = [f"{rel} is missing" for rel in sorted(expected.keys() - present)]
    problems += [f"{rel} is not in the registry" for rel in sorted(present - expected.keys())]
    for rel in sorted(expected.keys() & present):
        path = directory / rel
        if path.is_symlink():
            problems.append(f"{rel} is a symbolic link")
            continue
        digest = sha256_of(path)
        problem = mismatch(rel, digest=digest, size=path.stat().st_size, expected=expected[rel])
        if problem:
            problems.append(problem)
    return problems


def fingerprint(directory: Path) -> Fingerprint:
    """Cheap identity of a directory's files (no reads); empty when it does not exist."""
    if not directory.is_dir():
        return ()
    entries = []
    for path in files_in(directory):
        st = path.stat()
        entries.append((path.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns,
                        st.st_ino))  # fmt: skip
    return tuple(sorted(entries))

"""Artifact store on fsspec: `file://` by default, `s3://bucket/prefix` by URL.

Every write streams through a sha256 and lands atomically, so a reader never sees a
half-written object and a failed write leaves nothing behind. On a filesystem, bytes go to a
temporary file next to the target, renamed into place once complete. On an object store a
PUT (or a multipart upload, past s3fs's block size) is already all or nothing: bytes go
straight to their key and a failed write aborts the upload (no copy of a multi-GB object).

S3 credentials and endpoint come from the usual AWS settings (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server, ~/.aws, an
instance role), read by s3fs/botocore.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import fsspec

CHUNK = 1 << 20


class StorageError(Exception):
    """The artifact store could not read or write an object."""


class Rewrite(Protocol):
    """A file's bytes changed on their way to local disk (`ArtifactStore.get_file`): fed the
    object's chunks in order, returns what to write for each; `finish` returns the rest."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


class ObjectWriter:
    """A file-like sink that hashes and counts what it writes; see `ArtifactStore.writer`."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._handle.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class ArtifactStore:
    def __init__(self, url: str, *, block_size: int | None = None) -> None:
        self.url = url.rstrip("/")
        # Upload part size on an object store (s3fs's default: 50 MiB); None: the default.
        self.block_size = block_size
        options = (
            {}
            if self.url.startswith("file:") or "://" not in self.url
            else {
                # Other processes write here too (workers, gateways): never answer from a stale
                # listing cached by this one.
                "use_listings_cache": False,
            }
        )
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        # fs.protocol is a str or a tuple of aliases, by fsspec version
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        key = key.strip("/")
        if not key or ".." in key.split("/"):
            raise StorageError(f"invalid artifact key {key!r}")
        return posixpath.join(self.root, key)

    def uri(self, key: str) -> str:
        return f"{self.url}/{key.strip('/')}"

    def writer(self, key: str) -> AtomicWrite:
        """`with store.writer(key) as w: w.write(...)`, or drive `AtomicWrite` by hand."""
        return AtomicWrite(self, key)

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> StoredObject:
        atomic = self.writer(key)
        with atomic as w:
            for chunk in chunks:
                w.write(chunk)
        assert atomic.result is not None
        return atomic.result

    def put_file(self, key: str, local: str | Path) -> StoredObject:
        with open(local, "rb") as f:
            return self.put_stream(key, iter(lambda: f.read(CHUNK), b""))

    def put_dir(self, prefix: str, local_dir: str | Path) -> dict[str, StoredObject]:
        """Upload every file under `local_dir`; returns relative path -> stored object.

        All or nothing: when one file fails (a full disk), those already written are removed.
        """
        local_dir = Path(local_dir)
        stored: dict[str, StoredObject] = {}
        try:
            for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
                rel = path.relative_to(local_dir).as_posix()
                stored[rel] = self.put_file(f"{prefix.strip('/')}/{rel}", path)
        except BaseException:
            for obj in stored.values():
                with contextlib.suppress(OSError):
                    self.fs.rm(self._path(obj.key))
            raise
        return stored

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.fs.open(self._path(key), "rb")
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"cannot read {key}: {e}") from e

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with self.open(key) as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def get_file(self, key: str, local: str | Path, rewrite: Rewrite | None = None) -> str:
        """Download to `local`, returning the sha256 of the object's bytes. With `rewrite`,
        what is written is its output (the object's bytes are still what is hashed)."""
        digest = hashlib.sha256()
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        with open(local, "wb") as out:
            for chunk in self.iter_bytes(key):
                digest.update(chunk)
                out.write(chunk if rewrite is None else rewrite.feed(chunk))
            if rewrite is not None:
                out.write(rewrite.finish())
        return digest.hexdigest()

    def get_dir(
        self,
        prefix: str,
        local_dir: str | Path,
        rewrite: Callable[[str, Path], Rewrite | None] | None = None,
    ) -> dict[str, str]:
        """Download every object under `prefix`, in name order; returns relative path ->
        sha256. `rewrite(rel, local_dir)` may give a Rewrite for a file (`get_file`); the
        files before it in name order are already in `local_dir` when it is asked."""
        root = self._path(prefix)
        digests = {}
        for path in sorted(self.fs.find(root)):
            rel = posixpath.relpath(path, root)
            if posixpath.basename(rel).startswith("."):  # an in-flight temporary object
                continue
            how = rewrite(rel, Path(local_dir)) if rewrite is not None else None
            digests[rel] = self.get_file(f"{prefix.strip('/')}/{rel}", Path(local_dir) / rel, how)
        return digests

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def delete(self, key: str) -> bool:
        """Delete an object or a prefix; says whether anything was there."""
        path = self._path(key)
        if not self.fs.exists(path):
            return False
        self.fs.rm(path, recursive=True)
        return True


class AtomicWrite:
    """One object being written: `open()`, `write()`..., then `commit()` or `abort()`.

    Also a context manager that commits on success and aborts on any exception.
    """

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key.strip("/")
        self.final = store._path(key)
        parent, name = posixpath.split(self.final)
        # An object store's upload is atomic by itself: no temporary key, no copy.
        self.temp = (posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
                     if store.local else self.final)  # fmt: skip
        self.result: StoredObject | None = None
        self._writer: ObjectWriter | None = None
        self._handle: Any = None

    def open(self) -> ObjectWriter:
        try:
            self.store.fs.makedirs(posixpath.dirname(self.final), exist_ok=True)
            extra = {"block_size": self.store.block_size} if self.store.block_size else {}
            self._handle = self.store.fs.open(self.temp, "wb", **extra)
        except OSError as e:
            raise StorageError(f"cannot write {self.key}: {e}") from e
        self._writer = ObjectWriter(self._handle)
        return self._writer

    def write(self, data: bytes) -> None:
        assert self._writer is not None, "open() first"
        try:
            self._writer.write(data)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot write {self.key}: {e}") from e

    def commit(self) -> StoredObject:
        assert self._writer is not None, "open() first"
        try:
            self._handle.close()
            if self.temp != self.final:
                self.store.fs.mv(self.temp, self.final)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot write {self.key}: {e}") from e
        self.result = StoredObject(self.key, self._writer.sha256, self._writer.size)
        return self.result

    def abort(self) -> None:
        """Drop the partial object; safe to call more than once."""
        if self._handle is not None and not self.store.local:
            # Abort the upload: nothing was visible under the key and nothing will be.
            with contextlib.suppress(Exception):
                self._handle.discard()
            self._handle.closed = True  # discarded: closing again would upload what is left
            self._handle = None
            return
        # Closing flushes, which fails again on a full disk: the temp object goes regardless.
        with contextlib.suppress(OSError):
            if self._handle is not None:
                self._handle.close()
        with contextlib.suppress(OSError):
            if self.store.fs.exists(self.temp):
                self.store.fs.rm(self.temp)

    def __enter__(self) -> ObjectWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError):  # a write in the block failed (a full disk, EIO)
            raise StorageError(f"cannot write {self.key}: {exc}") from exc


def get_store(url: str) -> ArtifactStore:
    return ArtifactStore(url)

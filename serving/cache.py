"""The local adapter cache: fetch a version's files from the artifact store, verify, keep.

A version is immutable, so a directory that was verified once stays valid: it is assembled in
a temporary folder, every file's sha256 and size checked against the registry row, and only
then renamed into `<root>/<version id>`. A mismatch (bytes altered in the store, a missing
file) refuses the version and leaves nothing behind; it is never handed to an engine.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from api.models.adapters import AdapterVersion
from api.storage import ArtifactStore, StorageError
from serving.engines.base import LocalAdapter
from serving.errors import AdapterIntegrityError

REQUIRED = ("adapter_config.json", "adapter_model.safetensors")


class AdapterCache:
    def __init__(self, *, store: ArtifactStore, root: Path) -> None:
        self.store = store
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    def path_of(self, version_id: str) -> Path:
        return self.root / version_id

    async def ensure(self, version: AdapterVersion) -> tuple[LocalAdapter, bool]:
        """The version as a verified local directory; says whether it was fetched now."""
        target = self.path_of(version.id)
        if target.is_dir():
            return LocalAdapter(name=version.fine_tuned_model, path=target), False
        lock = self._locks.setdefault(version.id, asyncio.Lock())
        async with lock:  # concurrent first requests fetch once
            fetched = not target.is_dir()
            if fetched:
                await asyncio.to_thread(self._fetch, version, target)
        return LocalAdapter(name=version.fine_tuned_model, path=target), fetched

    def _fetch(self, version: AdapterVersion, target: Path) -> None:
        files: dict[str, Any] = dict(version.files or {})
        missing = [name for name in REQUIRED if name not in files]
        if missing:
            raise AdapterIntegrityError(
                f"Adapter version {version.fine_tuned_model} is incomplete in the registry "
                f"(missing {', '.join(missing)}); it cannot be served."
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version.id}.", dir=self.root))
        try:
            for rel, expected in sorted(files.items()):
                self._fetch_file(version, rel, expected, tmp)
            tmp.chmod(0o755)  # replicas may run as another user
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch_file(
        self, version: AdapterVersion, rel: str, expected: dict[str, Any], tmp: Path
    ) -> None:
        local = tmp / rel
        if not local.resolve().is_relative_to(tmp.resolve()):
            raise AdapterIntegrityError(f"Adapter file path {rel!r} escapes its directory.")
        try:
            digest = self.store.get_file(f"{version.storage_prefix}/{rel}", local)
        except (FileNotFoundError, StorageError) as e:
            raise AdapterIntegrityError(
                f"Adapter version {version.fine_tuned_model}: cannot read {rel} from the "
                f"artifact store ({type(e).__name__}); it cannot be served."
            ) from e
        if digest != expected.get("sha256") or local.stat().st_size != expected.get("size"):
            raise AdapterIntegrityError(
                f"Adapter version {version.fine_tuned_model} failed verification: {rel} has "
                f"sha256 {digest[:12]}..., the registry expects "
                f"{str(expected.get('sha256'))[:12]}.... The stored bytes were altered; "
                "refusing to serve it."
            )

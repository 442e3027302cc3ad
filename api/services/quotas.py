"""Per-tenant storage quota: the bytes a tenant's files and adapter versions hold.

`settings.tenant_storage_quota_bytes` (0: unlimited) bounds the sum of a tenant's stored
files (uploads and result files) and adapter versions (their registry rows carry their
size). Whatever is about to store bytes for a tenant asks first: `check_storage_quota` for a
size known up front, `storage_room` for a stream whose size is known only at its end (an
upload counts its bytes against `StorageRoom.check` as they arrive). Over the quota: 400,
as OpenAI answers an organisation over its file storage, code `storage_quota_exceeded`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import Session, select

from api.errors import InvalidRequest
from api.models.adapters import AdapterVersion
from api.models.files import File
from api.services.limits import load_limits
from api.settings import Settings


@dataclass(frozen=True)
class StorageRoom:
    """A tenant's quota (0: unlimited) and what it held when asked, in bytes."""

    quota: int
    used: int

    def check(self, extra_bytes: int, *, param: str | None = "file") -> None:
        """Refuse `extra_bytes` more when they do not fit."""
        if self.quota and self.used + extra_bytes > self.quota:
            raise InvalidRequest(
                f"You have exceeded your storage quota: your files and adapters may hold "
                f"{self.quota} bytes, {self.used} are in use and this needs {extra_bytes} more. "
                "Delete old files or upload a smaller one.",
                param=param,
                code="storage_quota_exceeded",
            )


def tenant_storage_used(session: Session, *, tenant_id: str) -> int:
    """Bytes of the tenant's files plus its adapter versions."""
    files = select(func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id)
    versions = select(func.coalesce(func.sum(AdapterVersion.size_bytes), 0)).where(
        AdapterVersion.tenant_id == tenant_id
    )
    return int(session.exec(files).one()) + int(session.exec(versions).one())


def storage_room(session: Session, settings: Settings, *, tenant_id: str) -> StorageRoom:
    """The tenant's quota (an admin's override, else the setting) and what it holds."""
    quota = load_limits(session, settings, tenant_id=tenant_id).storage_quota_bytes
    return StorageRoom(quota=quota, used=tenant_storage_used(session, tenant_id=tenant_id))


def check_storage_quota(
    session: Session,
    settings: Settings,
    *,
    tenant_id: str,
    extra_bytes: int,
    param: str | None = "file",
) -> None:
    """400 `storage_quota_exceeded` when `extra_bytes` more would pass the tenant's quota."""
    storage_room(session, settings, tenant_id=tenant_id).check(extra_bytes, param=param)

"""The audit log: record every admin action; list it paged and filtered."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from api.models.audit import AuditEntry
from api.services.pagination import page
from api.services.tenants import Principal


def record(
    session: Session,
    *,
    actor: Principal,
    action: str,
    target_type: str,
    target_id: str,
    tenant_id: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    forced: bool = False,
    reason: str | None = None,
) -> AuditEntry:
    """Add an entry in the caller's transaction: it commits with the change it describes."""
    entry = AuditEntry(
        actor_key_id=actor.key_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        tenant_id=tenant_id,
        before=before,
        after=after,
        forced=forced,
        reason=reason,
    )
    session.add(entry)
    return entry


def list_entries(
    session: Session,
    *,
    after: str | None,
    limit: int,
    action: str | None = None,
    tenant_id: str | None = None,
    target_id: str | None = None,
    actor_key_id: str | None = None,
) -> tuple[list[AuditEntry], bool]:
    query = select(AuditEntry)
    filters = {
        "action": action,
        "tenant_id": tenant_id,
        "target_id": target_id,
        "actor_key_id": actor_key_id,
    }
    for name, value in filters.items():
        if value is not None:
            query = query.where(getattr(AuditEntry, name) == value)
    return page(session, query, model=AuditEntry, after=after, limit=limit)

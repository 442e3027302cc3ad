"""How an admin names an adapter: by its id, or as `TENANT:NAME`.

    adapter-3f9c...              the id, as `GET /v1/admin/adapters` lists it
    support-team:support-bot     the tenant's name (or id) and the adapter's name

Adapter names are the jobs' suffixes, a-z, 0-9 and '-', so the last ':' always splits the two.
"""

from __future__ import annotations

from sqlmodel import Session, col, or_, select

from api.errors import NotFound
from api.models.adapters import Adapter
from api.models.tenants import Tenant
from api.services.suggest import did_you_mean, offer

EXAMPLE = "support-team:support-bot"


def find_adapter_id(session: Session, ref: str) -> str:
    """The id of the adapter `ref` names; NotFound, with the closest references, if none."""
    if session.get(Adapter, ref) is not None:
        return ref
    tenant, colon, name = ref.rpartition(":")
    if colon:
        found = session.exec(
            select(Adapter.id)
            .join(Tenant, col(Tenant.id) == Adapter.tenant_id)
            .where(Adapter.name == name, or_(Tenant.name == tenant, Tenant.id == tenant))
        ).first()
        if found is not None:
            return found
    raise NotFound(
        f"No adapter {ref!r}: name it by its id (GET /v1/admin/adapters lists them) or as "
        f"TENANT:NAME, e.g. {EXAMPLE!r}.{_hint(session, ref)}",
        param="adapter_id",
        code="adapter_not_found",
    )


def _hint(session: Session, ref: str) -> str:
    """'Did you mean ...?' over every adapter's `TENANT:NAME` (admins see all tenants); a bare
    adapter name suggests that name in each tenant that has one."""
    rows = session.exec(
        select(Tenant.name, Adapter.name).join(Tenant, col(Tenant.id) == Adapter.tenant_id)
    ).all()
    refs = {f"{tenant}:{name}": name for tenant, name in rows}
    same_name = sorted(r for r, name in refs.items() if name == ref)
    return offer(same_name) if same_name else did_you_mean(ref, refs)

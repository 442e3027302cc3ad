"""Model aliases: other names a tenant calls one of its adapters by.

`loraplex migrate` registers the hosted model's `ft:gpt-...:org:suffix:id` as an alias of the
adapter name that replaces it, so a client changes only its base URL and key. An alias
resolves as the adapter's name does (its production version, or a canary draw), and may be
set before the adapter exists (a migrated job's adapter appears when the job succeeds). It is
the tenant's own, like every name, and cannot shadow a base model, an adapter name or a
version id.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from api.db import unix
from api.errors import Conflict, InvalidRequest, NotFound
from api.models.adapters import Adapter, AdapterVersion, ModelAlias
from api.settings import Settings

ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._/-]{0,255}$")
MAX_ALIASES_PER_ADAPTER = 64
# An alias may name an adapter to come, so the per-adapter bound alone would not bound a tenant.
MAX_ALIASES_PER_TENANT = 1024


def alias_public(alias: ModelAlias) -> dict[str, Any]:
    return {
        "object": "adapter.alias",
        "alias": alias.alias,
        "adapter": alias.adapter_name,
        "created_at": unix(alias.created_at),
    }


def aliases_of(session: Session, *, tenant_id: str, name: str) -> list[ModelAlias]:
    return list(
        session.exec(
            select(ModelAlias)
            .where(ModelAlias.tenant_id == tenant_id, ModelAlias.adapter_name == name)
            .order_by(col(ModelAlias.alias))
        )
    )


def find_alias(session: Session, *, tenant_id: str, alias: str) -> ModelAlias | None:
    return session.exec(
        select(ModelAlias).where(ModelAlias.tenant_id == tenant_id, ModelAlias.alias == alias)
    ).first()


def add_alias(
    session: Session, settings: Settings, *, tenant_id: str, name: str, alias: str
) -> ModelAlias:
    """Make `alias` (ALIAS_RE, checked by the route's schema) call the tenant's adapter
    `name` (commits); idempotent."""
    taken = (
        alias in settings.registered_base_models()
        or session.exec(
            select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.name == alias)
        ).first()
        or session.exec(
            select(AdapterVersion.id).where(
                AdapterVersion.tenant_id == tenant_id, AdapterVersion.fine_tuned_model == alias
            )
        ).first()
    )
    if taken:
        raise Conflict(
            f"'{alias}' already names a model of yours; an alias cannot shadow it.",
            param="alias",
            code="alias_taken",
        )
    existing = find_alias(session, tenant_id=tenant_id, alias=alias)
    if existing is not None:
        if existing.adapter_name == name:
            return existing
        raise Conflict(
            f"'{alias}' is already an alias of your adapter '{existing.adapter_name}'; "
            "delete it there first.",
            param="alias",
            code="alias_taken",
        )
    held = session.exec(
        select(func.count()).select_from(ModelAlias).where(ModelAlias.tenant_id == tenant_id)
    ).one()
    if held >= MAX_ALIASES_PER_TENANT:
        raise InvalidRequest(
            f"You may have at most {MAX_ALIASES_PER_TENANT} aliases; delete some first.",
            param="alias",
            code="too_many_aliases",
        )
    if len(aliases_of(session, tenant_id=tenant_id, name=name)) >= MAX_ALIASES_PER_ADAPTER:
        raise InvalidRequest(
            f"An adapter may have at most {MAX_ALIASES_PER_ADAPTER} aliases.",
            param="alias",
            code="too_many_aliases",
        )
    row = ModelAlias(tenant_id=tenant_id, alias=alias, adapter_name=name)
    session.add(row)
    try:
        session.commit()
    except IntegrityError as e:  # the same alias, added at the same moment
        session.rollback()
        raise Conflict(f"'{alias}' was just taken.", param="alias", code="alias_taken") from e
    return row


def delete_alias(session: Session, *, tenant_id: str, name: str, alias: str) -> None:
    row = find_alias(session, tenant_id=tenant_id, alias=alias)
    if row is None or row.adapter_name != name:
        raise NotFound(f"No alias '{alias}' on '{name}'", param="alias", code="alias_not_found")
    session.delete(row)
    session.commit()

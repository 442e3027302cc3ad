"""Platform administration under /v1/admin: admin keys only (tenant keys get 404)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field

from api.db import unix
from api.deps import AdminDep, SessionDep, SettingsDep
from api.errors import error_responses
from api.models.tenants import ApiKey, Tenant
from api.services import audit, limits, tenants
from api.settings import Settings

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class TenantCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128, description="Unique tenant name.")


class KeyCreate(BaseModel):
    name: str | None = Field(None, max_length=128, description="A label for the key.")


# Its one field is optional, so the body may be left out too.
OptionalKeyCreate = Annotated[KeyCreate, Body(default_factory=KeyCreate)]


def tenant_public(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "object": "tenant",
        "name": tenant.name,
        "created_at": unix(tenant.created_at),
    }


def key_public(key: ApiKey) -> dict[str, Any]:
    """Never the key itself: only the hash is stored, and only its prefix is shown."""
    return {
        "id": key.id,
        "object": "api_key",
        "tenant_id": key.tenant_id,
        "is_admin": key.is_admin,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": unix(key.created_at),
        "last_used_at": unix(key.last_used_at),
        "revoked_at": unix(key.revoked_at),
    }


@router.get("/tenants")
def list_tenants(_: AdminDep, session: SessionDep) -> dict[str, Any]:
    rows = tenants.list_tenants(session)
    return {"object": "list", "data": [tenant_public(t) for t in rows], "has_more": False}


@router.post("/tenants", responses=error_responses(409))
def create_tenant(body: TenantCreate, admin: AdminDep, session: SessionDep) -> dict[str, Any]:
    """Create a tenant and its first key; the key is returned once, here."""
    tenant = tenants.create_tenant(session, name=body.name)
    key, raw = tenants.create_key(session, tenant_id=tenant.id)
    audit.record(
        session,
        actor=admin,
        action="tenant.create",
        target_type="tenant",
        target_id=tenant.id,
        tenant_id=tenant.id,
        after=tenant_public(tenant),
    )
    session.commit()
    return {**tenant_public(tenant), "api_key": raw, "key": key_public(key)}


@router.post("/tenants/{tenant_id}/keys")
def create_tenant_key(
    tenant_id: str, body: OptionalKeyCreate, admin: AdminDep, session: SessionDep
) -> dict[str, Any]:
    key, raw = tenants.create_key(session, tenant_id=tenant_id, name=body.name)
    audit.record(
        session,
        actor=admin,
        action="key.create",
        target_type="api_key",
        target_id=key.id,
        tenant_id=tenant_id,
        after=key_public(key),
    )
    session.commit()
    return {**key_public(key), "api_key": raw}


# Far above any real limit, well inside a 64-bit integer.
MAX_LIMIT = 10**15
Override = Annotated[int | None, Field(ge=0, le=MAX_LIMIT)]


class LimitsUpdate(BaseModel):
    """Overrides for one tenant: a number replaces the default (0: unlimited), null restores
    the default, a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: Override = None
    tokens_per_minute: Override = None
    jobs_per_day: Override = None
    training_tokens_per_month: Override = None
    max_queued_jobs: Override = None
    max_running_jobs: Override = None
    storage_quota_bytes: Override = None


def limits_public(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    """The limits in force (0: unlimited), and which of them are this tenant's overrides."""
    return {
        "object": "tenant.limits",
        "tenant_id": tenant.id,
        **asdict(limits.effective_limits(settings, tenant)),
        "overrides": dict(tenant.limits or {}),
        "defaults": asdict(limits.default_limits(settings)),
    }


@router.get("/tenants/{tenant_id}/limits", responses=error_responses(404))
def get_tenant_limits(
    tenant_id: str, _: AdminDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    return limits_public(settings, tenants.get_tenant(session, tenant_id=tenant_id))


@router.patch("/tenants/{tenant_id}/limits", responses=error_responses(404))
def update_tenant_limits(
    tenant_id: str, body: LimitsUpdate, admin: AdminDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """Override a tenant's rate limits and quotas; gateways apply it within
    `rate_limit_refresh_seconds`."""
    before = limits_public(settings, tenants.get_tenant(session, tenant_id=tenant_id))
    changes = body.model_dump(exclude_unset=True)
    tenant = limits.set_overrides(session, tenant_id=tenant_id, changes=changes)
    after = limits_public(settings, tenant)
    audit.record(
        session,
        actor=admin,
        action="tenant.limits",
        target_type="tenant",
        target_id=tenant.id,
        tenant_id=tenant.id,
        before=before,
        after=after,
    )
    session.commit()
    return after


@router.get("/keys")
def list_keys(_: AdminDep, session: SessionDep, tenant_id: str | None = None) -> dict[str, Any]:
    rows = tenants.list_keys(session, tenant_id=tenant_id)
    return {"object": "list", "data": [key_public(k) for k in rows], "has_more": False}


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: str, admin: AdminDep, session: SessionDep) -> dict[str, Any]:
    key = tenants.revoke_key(session, key_id=key_id)
    audit.record(
        session,
        actor=admin,
        action="key.revoke",
        target_type="api_key",
        target_id=key.id,
        tenant_id=key.tenant_id,
        after=key_public(key),
    )
    session.commit()
    return key_public(key)

"""Tenants and API keys: create, authenticate, revoke."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlmodel import Session, col, select

from api.db import aware, utcnow
from api.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from api.models.tenants import ApiKey, Tenant

KEY_PREFIX = "lpx-"
PREFIX_LEN = 12
# Writing last_used_at on every request would serialise all reads behind a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant key (tenant_id set) or a platform admin key."""

    key_id: str
    tenant_id: str | None
    is_admin: bool


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_tenant(session: Session, *, name: str) -> Tenant:
    name = name.strip()
    if not name or len(name) > 128:
        raise InvalidRequest("tenant name must be 1-128 characters", param="name")
    if session.exec(select(Tenant).where(Tenant.name == name)).first():
        raise Conflict(f"a tenant named {name!r} already exists", param="name")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, *, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"No tenant with id {tenant_id!r}", param="tenant_id")
    return tenant


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.exec(select(Tenant).order_by(col(Tenant.created_at))))


def create_key(
    session: Session, *, tenant_id: str | None, is_admin: bool = False, name: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which is never retrievable again."""
    if tenant_id is None and not is_admin:
        raise InvalidRequest("a key needs a tenant or admin rights", param="tenant_id")
    if tenant_id is not None:
        get_tenant(session, tenant_id=tenant_id)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant_id,
        is_admin=is_admin,
        name=name,
        prefix=raw[:PREFIX_LEN],
        key_hash=hash_key(raw),
    )
    session.add(key)
    session.flush()
    return key, raw


def authenticate(session: Session, *, raw_key: str) -> Principal:
    """The principal for a raw key; AuthenticationFailed if unknown or revoked."""
    digest = hash_key(raw_key)
    candidates = session.exec(select(ApiKey).where(ApiKey.prefix == raw_key[:PREFIX_LEN])).all()
    match = None
    for key in candidates:
        # Constant-time comparison: response time reveals nothing about the stored hash.
        if hmac.compare_digest(key.key_hash, digest):
            match = key
    if match is None or match.revoked_at is not None:
        raise AuthenticationFailed("Incorrect API key provided.")
    now = utcnow()
    if match.last_used_at is None or now - aware(match.last_used_at) > LAST_USED_RESOLUTION:
        match.last_used_at = now
        session.add(match)
        session.commit()
    return Principal(key_id=match.id, tenant_id=match.tenant_id, is_admin=match.is_admin)


def list_keys(session: Session, *, tenant_id: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(col(ApiKey.created_at))
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.exec(query))


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"No API key with id {key_id!r}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
    return key

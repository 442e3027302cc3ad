"""Tenants (organisations) and their API keys."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from api.db import utcnow


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(default_factory=lambda: new_id("org-"), primary_key=True, max_length=64)
    name: str = Field(index=True, unique=True, max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    # An admin's overrides of the settings' defaults, by api.services.limits.Limits field name.
    limits: dict[str, int] | None = Field(default=None, sa_column=Column(JSON))


class ApiKey(SQLModel, table=True):
    """A key is shown once; only its sha256 is kept. `prefix` narrows the lookup."""

    __tablename__ = "api_keys"

    id: str = Field(default_factory=lambda: new_id("key-"), primary_key=True, max_length=64)
    tenant_id: str | None = Field(default=None, foreign_key="tenants.id", index=True)
    is_admin: bool = False
    name: str | None = Field(default=None, max_length=128)
    prefix: str = Field(index=True, max_length=16)
    key_hash: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

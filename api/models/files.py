"""Uploaded files (datasets) and files the platform writes (fine-tune results)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Text
from sqlmodel import Field, SQLModel

from api.db import utcnow
from api.models.tenants import new_id


class FileBase(SQLModel):
    filename: str = Field(max_length=256)
    purpose: str = Field(max_length=32, index=True)
    bytes: int = Field(default=0, sa_type=BigInteger)
    status: str = Field(default="uploaded", max_length=16)


class File(FileBase, table=True):
    __tablename__ = "files"

    id: str = Field(default_factory=lambda: new_id("file-"), primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=64)
    sha256: str = Field(max_length=64)
    storage_key: str = Field(max_length=512)
    status_details: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    stats: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, index=True)

"""FastAPI dependencies as `Annotated` aliases: settings, sessions, the caller, the store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from api.db import get_engine
from api.errors import AuthenticationFailed, NotFound
from api.services.tenants import Principal, authenticate
from api.settings import Settings, get_settings
from api.storage import ArtifactStore

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(request: Request, settings: SettingsDep) -> ArtifactStore:
    store: ArtifactStore | None = getattr(request.app.state, "store", None)
    if store is None or store.url != settings.storage_url.rstrip("/"):
        store = ArtifactStore(settings.storage_url)
        request.app.state.store = store
    return store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer KEY'.")
    return token.strip()


def get_principal(request: Request, session: SessionDep) -> Principal:
    try:
        principal = authenticate(session, raw_key=_bearer(request))
    finally:
        # Give the pooled connection back now: the route runs after another thread-pool hop,
        # and a burst of requests each holding a connection while waiting for a worker
        # thread, with every worker thread waiting for a connection, deadlocks until the
        # pool's timeout (seen with 64 concurrent completions). The session reconnects when
        # the route uses it.
        session.close()
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_tenant_id(principal: PrincipalDep) -> str:
    """The caller's tenant. Admin keys have none and cannot act as a tenant."""
    if principal.tenant_id is None:
        raise AuthenticationFailed(
            "This is a platform admin key; tenant endpoints need a tenant API key.",
            code="tenant_key_required",
        )
    return principal.tenant_id


TenantDep = Annotated[str, Depends(get_tenant_id)]


def get_admin(request: Request, principal: PrincipalDep) -> Principal:
    # Admin routes are invisible to tenant keys: the very 404 of an unknown route.
    if not principal.is_admin:
        raise NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]

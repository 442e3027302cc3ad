"""GET /v1/models: the base models plus the tenant's callable adapters, as OpenAI models.

An adapter is listed by name when it has a production version, and each servable version
by its `fine_tuned_model` id.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlmodel import Session, col, select

from api.db import unix
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import error_responses
from api.models.adapters import Adapter, AdapterVersion
from api.services.resolver import SERVABLE_BY_ID, model_not_found
from api.services.suggest import did_you_mean
from api.settings import Settings

router = APIRouter(prefix="/v1", tags=["models"])


def _model(model_id: str, owned_by: str, created: int | None = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created or 0,
        "owned_by": owned_by,
        **extra,
    }


def callable_models(session: Session, settings: Settings, tenant_id: str) -> list[dict[str, Any]]:
    models = [_model(name, "loraplex") for name in settings.registered_base_models()]
    rows = session.exec(
        select(AdapterVersion, Adapter)
        .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
        .where(AdapterVersion.tenant_id == tenant_id, col(AdapterVersion.stage).in_(SERVABLE_BY_ID))
        .order_by(col(Adapter.name), col(AdapterVersion.version))
    ).all()
    for version, adapter in rows:
        if version.stage == "production":
            models.append(
                _model(
                    adapter.name,
                    tenant_id,
                    unix(version.promoted_at),
                    root=version.base_model,
                    parent=version.base_model,
                )
            )
        models.append(
            _model(
                version.fine_tuned_model,
                tenant_id,
                unix(version.created_at),
                root=version.base_model,
                parent=version.base_model,
            )
        )
    return models


@router.get("/models")
def list_models(tenant_id: TenantDep, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    data = callable_models(session, settings, tenant_id)
    return {"object": "list", "data": data}  # OpenAI's list of models has no pages


@router.get("/models/{model_id:path}", responses=error_responses(404))
def get_model(
    model_id: str, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    models = callable_models(session, settings, tenant_id)
    for model in models:
        if model["id"] == model_id:
            return model
    raise model_not_found(model_id, hint=did_you_mean(model_id, [m["id"] for m in models]))

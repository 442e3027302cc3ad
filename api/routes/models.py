"""GET /v1/models: the base models a tenant can call (adapters join with the registry)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep, TenantDep
from api.errors import NotFound

router = APIRouter(prefix="/v1", tags=["models"])


def _model(model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}


@router.get("/models")
def list_models(_: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model(settings.base_model, "loraplex")], "has_more": False}


@router.get("/models/{model_id}")
def get_model(model_id: str, _: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    if model_id != settings.base_model:
        raise NotFound(
            f"The model '{model_id}' does not exist", param="model", code="model_not_found"
        )
    return _model(model_id, "loraplex")

"""Liveness, readiness and Prometheus metrics, at the root (not under /v1)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.db import ping
from api.deps import SettingsDep
from api.errors import ServiceUnavailable

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep) -> dict[str, str]:
    try:
        ping(settings.database_url)
    except Exception as e:
        raise ServiceUnavailable(f"database unreachable: {type(e).__name__}") from e
    return {"status": "ready"}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

"""Liveness, readiness and Prometheus metrics, at the root (not under /v1).

`/healthz` is liveness only: the process answers. `/readyz` is ready for what the process is
for: the control plane when its database answers; a gateway (`serve`, and `up`, which is
both) when, in addition, its engine can serve the base model (a replica passed its health
check, or the in-process model is loaded). Until then 503 with Retry-After, so a load
balancer sends no chat traffic that would only get 503s.
"""

from __future__ import annotations

from typing import Any

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
def readyz(request: Request, settings: SettingsDep) -> dict[str, Any]:
    checks = {}
    try:
        ping(settings.database_url)
    except Exception as e:
        raise ServiceUnavailable(f"database unreachable: {type(e).__name__}") from e
    checks["database"] = "ok"
    if getattr(request.app.state, "serves", False):  # set by serving.app.mount_gateway
        gateway = getattr(request.app.state, "gateway", None)
        if gateway is None or not gateway.engine.ready():
            raise ServiceUnavailable(
                "the serving engine cannot answer yet (starting)",
                code="engine_not_ready",
                headers={"Retry-After": str(settings.serving_retry_after)},
            )
        checks["serving"] = "ok"
    return {"status": "ready", "checks": checks}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

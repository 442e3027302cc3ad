"""Admin view of the serving replicas: GET /v1/admin/replicas.

What this process's serving gateway sees of its engine's replicas (health, queue, the
adapters each holds), read through the gateway on `app.state` without importing `serving`.
A control plane running no gateway (`loraplex api` alone) lists none; with several gateways,
each answers for its own view.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request

from api.deps import AdminDep

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/replicas")
def list_replicas(_: AdminDep, request: Request) -> dict[str, Any]:
    """The serving replicas this gateway routes to: `healthy`, `queue_depth` (requests in
    flight or waiting) and `loaded` (the adapters it holds, least recently used first)."""
    gateway = getattr(request.app.state, "gateway", None)
    statuses = gateway.engine.status() if gateway is not None else []
    data = [{"object": "serving.replica", **asdict(s)} for s in statuses]
    return {"object": "list", "data": data, "has_more": False}

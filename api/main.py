"""The control plane's app factory: `create_app()` (with the serving gateway for `up`)."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.errors import install_error_handlers
from api.middleware import BodyLimitMiddleware, JsonBodyMiddleware, MetricsMiddleware
from api.openapi import document_app
from api.routes import (
    adapters,
    admin,
    admin_evals,
    admin_registry,
    admin_replicas,
    console,
    evals,
    files,
    health,
    jobs,
    models,
)
from api.settings import Settings, get_settings


def create_app(settings: Settings | None = None, *, with_gateway: bool = False) -> FastAPI:
    """The API; `with_gateway` also mounts chat/completions on the same base URL."""
    settings = settings or get_settings()
    app = FastAPI(
        title="Loraplex",
        version="0.1.0",
        summary="Self-hosted LoRA fine-tuning and multi-adapter serving, OpenAI-compatible.",
    )
    if settings is not get_settings():
        app.dependency_overrides[get_settings] = lambda: settings
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    install_error_handlers(app)
    document_app(app)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(evals.router)
    app.include_router(evals.adapter_router)
    app.include_router(models.router)
    app.include_router(adapters.router)
    app.include_router(admin.router)
    if with_gateway:
        # Imported here: the gateway is light, but a control plane alone needs none of it.
        from serving.app import mount_gateway

        mount_gateway(app, settings)
    app.include_router(admin_registry.router)
    app.include_router(admin_evals.router)
    app.include_router(admin_replicas.router)
    app.include_router(console.router)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_json_body_bytes,
        upload_limit=settings.max_upload_bytes,
        idle_timeout=settings.body_idle_timeout,
    )
    app.add_middleware(MetricsMiddleware, registry=app.state.registry)
    return app

"""The gateway's HTTP face: `router` (POST /v1/chat/completions, /v1/completions),
`mount_gateway(app)` to add it to an existing app (the API, for `loraplex up`), and
`create_gateway_app()` for the gateway alone (`loraplex serve`).

Auth and errors are the control plane's own (TenantDep, install_error_handlers): a tenant key
works the same on both, and every error has the OpenAI shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry
from sqlmodel import Session

from api.deps import SessionDep, TenantDep
from api.errors import ErrorResponse, error_responses, install_error_handlers
from api.settings import Settings, get_settings
from api.storage import ArtifactStore
from serving.cache import AdapterCache
from serving.engines.base import Engine
from serving.errors import no_replica
from serving.gateway import Gateway
from serving.metrics import GatewayMetrics
from serving.prefetch import prefetch_promoted
from serving.ratelimit import RateLimiter, RefuseBeforeBody
from serving.replicas import ReplicaProcess, RestartBackoff
from serving.schemas import ChatCompletionRequest, CompletionRequest, Endpoint, SamplingRequest
from serving.setup import EngineSetup, build_engine, say_building, say_starting, say_when_ready
from serving.validation import watch_new_versions

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["serving"])
T = TypeVar("T")
ENGINE_BUILD_THREAD = "serving-engine-build"


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if gateway is None:
        settings: Settings = request.app.state.settings
        raise no_replica(settings.serving_retry_after)
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def get_limiter(request: Request, tenant_id: TenantDep) -> RateLimiter:
    """The limiter, told whose key this is: authentication runs even when the body turns
    out invalid, so a tenant sending only malformed bodies is known (RefuseBeforeBody)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.remember(request.headers.get("authorization"), tenant_id=tenant_id)
    return limiter


LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]


def _serving_responses(kind: str) -> dict[int | str, dict[str, Any]]:
    """What a completion route answers, for /openapi.json (api.openapi adds 400/401/413)."""
    return {
        200: {
            "description": f"The {kind}; with `stream: true`, server-sent events ending in "
            "`data: [DONE]`, usage in the last chunk when `stream_options.include_usage`.",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        404: {"model": ErrorResponse, "description": "No such model for this key (`model`)."},
        500: {
            "model": ErrorResponse,
            "description": "The adapter's stored files failed their integrity check "
            "(`adapter_integrity_error`, not retried), or the engine failed.",
        },
        503: {
            "model": ErrorResponse,
            "description": "No replica can take the request now; retry after `Retry-After`.",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
        **error_responses(429),
    }


@router.post(
    "/chat/completions", response_model=None, responses=_serving_responses("chat completion")
)
async def chat_completions(
    body: ChatCompletionRequest,
    tenant_id: TenantDep,
    session: SessionDep,
    gateway: GatewayDep,
    limiter: LimiterDep,
    request: Request,
) -> JSONResponse | StreamingResponse:
    return await serve_limited(
        gateway, limiter, endpoint="chat", body=body, session=session, tenant_id=tenant_id,
        http=request,
    )  # fmt: skip


@router.post("/completions", response_model=None, responses=_serving_responses("completion"))
async def completions(
    body: CompletionRequest,
    tenant_id: TenantDep,
    session: SessionDep,
    gateway: GatewayDep,
    limiter: LimiterDep,
    request: Request,
) -> JSONResponse | StreamingResponse:
    return await serve_limited(
        gateway, limiter, endpoint="completion", body=body, session=session, tenant_id=tenant_id,
        http=request,
    )  # fmt: skip


async def serve_limited(
    gateway: Gateway,
    limiter: RateLimiter,
    *,
    endpoint: Endpoint,
    body: SamplingRequest,
    session: Session,
    tenant_id: str,
    http: Request | None = None,
) -> JSONResponse | StreamingResponse:
    """Admit the request under the tenant's rate limits (429 if over), serve it, and settle
    its token reservation with the real usage; the x-ratelimit-* headers go on the answer."""
    gateway.check(body)  # a request out of bounds is a 400, before it costs any quota
    grant = await limiter.admit(session, tenant_id=tenant_id, body=body)
    try:
        response = await gateway.handle(
            endpoint=endpoint,
            body=body,
            session=session,
            tenant_id=tenant_id,
            on_usage=grant.settle,
            http=http,  # watched for the client hanging up
        )
    except BaseException:
        grant.settle(None)  # nothing was generated (a no-op if the meter already settled)
        raise
    response.headers.update(grant.headers)
    return response


def mount_gateway(app: FastAPI, settings: Settings, *, engine: Engine | None = None) -> None:
    """Add the serving routes to `app`; the engine starts and stops with the app.

    `engine` is the seam for tests and embedders (started before the app serves); by default
    `build_engine(settings)` picks vLLM replicas (started here or pointed at) or the in-process
    transformers engine, built in the background so the API is up at once: completions answer
    503 with Retry-After until the engine is ready.
    """
    app.include_router(router)
    app.state.serves = True  # /readyz waits for the engine too
    app.state.rate_limiter = RateLimiter(settings)
    app.add_middleware(RefuseBeforeBody)
    runtime = ServingRuntime(settings, metrics=GatewayMetrics(app.state.registry), engine=engine)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        await runtime.start(app_)
        try:
            async with inner(app_) as state:
                yield state
        finally:
            await runtime.stop(app_)

    app.router.lifespan_context = lifespan


class ServingRuntime:
    """The gateway's moving parts for one app: engine, replica processes, supervision."""

    def __init__(
        self, settings: Settings, *, metrics: GatewayMetrics, engine: Engine | None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.setup: EngineSetup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, app: FastAPI) -> None:
        if self.engine is not None:
            await self._boot(app, EngineSetup(engine=self.engine, replicas=[]))
        else:
            self._tasks.append(asyncio.create_task(self._build_and_boot(app)))

    async def _build_and_boot(self, app: FastAPI) -> None:
        say_building(self.settings)
        try:
            setup = await in_daemon_thread(
                lambda: build_engine(self.settings, on_event=_counter(self.metrics))
            )
        except Exception:
            log.exception("serving engine could not be built; completions will answer 503")
            return
        await self._boot(app, setup)
        if setup.replicas:
            self._tasks.append(asyncio.create_task(self.supervise(setup)))

    async def _boot(self, app: FastAPI, setup: EngineSetup) -> None:
        self.setup = setup
        say_starting(setup, self.settings)
        for replica in setup.replicas:
            replica.start()
        cache_root = self.settings.serving_cache_dir or self.settings.home / "adapter-cache"
        gateway = Gateway(
            settings=self.settings,
            engine=setup.engine,
            cache=AdapterCache(
                store=ArtifactStore(self.settings.storage_url),
                root=cache_root,
                on_event=_counter(self.metrics),
                max_adapters=self.settings.serving_cache_max_adapters,
                max_bytes=int(self.settings.serving_cache_max_gib * (1 << 30)),
                loaded=lambda: {name for r in setup.engine.status() for name in r.loaded},
            ),
            metrics=self.metrics,
        )
        await gateway.start()
        app.state.gateway = gateway
        if self.settings.serving_validate_new_versions:
            watch = watch_new_versions(gateway, self.settings.database_url)
            self._tasks.append(asyncio.create_task(watch))
        if self.settings.serving_prefetch_promoted:
            prefetching = prefetch_promoted(gateway, self.settings.database_url)
            self._tasks.append(asyncio.create_task(prefetching))
        self._tasks.append(asyncio.create_task(guard_canaries(self.settings)))
        # `up` and `serve` set the address they listen on, for the console.
        url = getattr(app.state, "public_url", None)
        self._tasks.append(asyncio.create_task(say_when_ready(setup.engine, url)))

    async def supervise(self, setup: EngineSetup) -> None:
        """Restart replicas this gateway started when they die, or never come up within
        `serving_startup_timeout`, with exponential backoff while they keep failing; the
        engine notices and re-syncs what they hold."""
        interval = self.settings.serving_health_interval
        watched = [(r, Supervised(RestartBackoff(base=interval))) for r in setup.replicas]
        while True:
            await asyncio.sleep(interval)
            health = {s.name: s.healthy for s in setup.engine.status()}
            for replica, state in watched:
                await self._check(replica, state, healthy=bool(health.get(replica.url)))

    async def _check(self, replica: ReplicaProcess, state: Supervised, *, healthy: bool) -> None:
        now, retry = time.monotonic(), state.backoff
        if healthy:
            state.started, state.served = now, True  # up: only a short hang is tolerated now
            retry.healthy()
            return
        if retry.due is None:
            # A replica gets the boot timeout only until it first answers; once it has
            # served, failing its checks for `serving_hang_timeout` means it is stuck.
            grace = (self.settings.serving_hang_timeout if state.served
                     else self.settings.serving_startup_timeout)  # fmt: skip
            if replica.alive() and now - state.started < grace:
                return
            delay = retry.failed(now)
            log.warning("replica on port %s is dead or stuck (failure %d in a row); restarting "
                        "it in %.1f s", replica.port, retry.failures, delay)  # fmt: skip
            await asyncio.to_thread(replica.stop)
        if retry.due is not None and now >= retry.due:
            replica.start()
            state.started, state.served, retry.due = time.monotonic(), False, None

    async def stop(self, app: FastAPI) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        gateway: Gateway | None = getattr(app.state, "gateway", None)
        if gateway is not None:
            await gateway.close()
            app.state.gateway = None
        for replica in self.setup.replicas if self.setup else []:
            await asyncio.to_thread(replica.stop)


async def guard_canaries(settings: Settings) -> None:
    """Every `canary_guard_interval` s, abort the guarded canaries past their thresholds
    (api.services.eval_policy): the gateway sees the traffic they are judged on."""
    from api.db import get_engine
    from api.services.eval_policy import check_canaries

    def once() -> None:
        with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
            check_canaries(session)

    while True:
        await asyncio.sleep(settings.canary_guard_interval)
        try:
            await asyncio.to_thread(once)
        except Exception:  # the database is away: try again next time
            log.exception("canary guard check failed; retrying")


@dataclass
class Supervised:
    """One started replica as the supervisor sees it."""

    backoff: RestartBackoff
    started: float = field(default_factory=time.monotonic)  # last (re)start or health
    served: bool = False  # answered a health check since its last start


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a daemon thread: unlike `asyncio.to_thread`, a shutdown during a long
    build (a base-model conversion) does not wait for it to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as e:
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, e)
        else:
            outcome = (future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=ENGINE_BUILD_THREAD, daemon=True).start()
    return await future


def _counter(metrics: GatewayMetrics) -> Any:
    return lambda event: metrics.adapter_loads.labels(event).inc()


def create_gateway_app(
    settings: Settings | None = None, *, engine: Engine | None = None
) -> FastAPI:
    """The gateway alone, with health, metrics and GET /v1/models like the API."""
    from api.middleware import BodyLimitMiddleware, JsonBodyMiddleware, MetricsMiddleware
    from api.routes import health, models

    settings = settings or get_settings()
    app = FastAPI(title="Loraplex serving gateway", version="0.1.0")
    if settings is not get_settings():
        app.dependency_overrides[get_settings] = lambda: settings
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    mount_gateway(app, settings, engine=engine)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_json_body_bytes,
        upload_limit=settings.max_upload_bytes,
        idle_timeout=settings.body_idle_timeout,
    )
    app.add_middleware(MetricsMiddleware, registry=app.state.registry)
    return app

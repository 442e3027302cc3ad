"""The engine interface the gateway talks to, and the values that cross it.

An engine answers OpenAI-shaped bodies: `complete()` returns a whole response,
`open_stream()` returns chunks whose last one carries `usage` (the gateway drops it when the
client did not ask for it). Errors are raised before the first chunk whenever possible, so the
client gets a proper HTTP status rather than a broken stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.schemas import Endpoint


@dataclass(frozen=True)
class LocalAdapter:
    """A verified adapter directory on this machine, under its version's name."""

    name: str  # the version's fine_tuned_model id: vLLM's lora_name, peft's adapter_name
    path: Path


@dataclass(frozen=True)
class EngineRequest:
    endpoint: Endpoint
    body: dict[str, Any]  # the client's body, validated; `model` is the client's name
    adapter: LocalAdapter | None  # None: the base model


@dataclass
class ReplicaStatus:
    name: str
    healthy: bool
    loaded: list[str] = field(default_factory=list)  # adapter names, least recently used first
    queue_depth: int = 0  # requests in flight or waiting


class Engine(ABC):
    kind: str

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

    def ready(self) -> bool:
        return any(r.healthy for r in self.status())

"""Replica selection and adapter placement: what each vLLM replica holds, where to send what.

Pure bookkeeping, no I/O (LoRAX's rule: the router never touches tensors). A request goes to a
healthy replica that already holds its adapter (the least loaded of those), else to the least
loaded healthy one, which then loads it. Past the per-replica budget, the least recently used
adapters that no in-flight request needs are unloaded first. Base-only replicas (no LoRA) take
base requests when there are any; adapter requests never go there.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from dataclasses import dataclass, field


@dataclass
class Replica:
    url: str
    healthy: bool = False
    lora: bool = True  # False: a base-only replica (started without --enable-lora)
    # A LoRA replica whose base rows are plain rows, exact beside any adapter (Loraplex's
    # grouped LoRA op, serving/vllm_lora_op.py): base requests need no zero adapter there.
    plain_base: bool = False
    inflight: int = 0
    # Adapter names this replica holds, least recently used first.
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # In-flight requests per adapter: those adapters must not be unloaded under them.
    in_use: Counter[str] = field(default_factory=Counter)
    # Serialises load/unload calls on this replica (vLLM answers 400 to a double load).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def holds(self, name: str) -> bool:
        return name in self.loaded

    def touch(self, name: str) -> None:
        self.loaded[name] = None
        self.loaded.move_to_end(name)

    def forget_all(self) -> None:
        """The replica restarted or vanished: it holds nothing we loaded."""
        self.loaded.clear()


def choose_replica(
    replicas: list[Replica],
    *,
    adapter: str,
    lora: bool = True,
    exclude: set[str] = frozenset(),  # type: ignore[assignment]
) -> Replica | None:
    candidates = [r for r in replicas if r.healthy and r.lora == lora and r.url not in exclude]
    if not candidates:
        return None
    holders = [r for r in candidates if r.holds(adapter)]
    least_loaded = min(candidates, key=lambda r: r.inflight)
    if holders:
        best_holder = min(holders, key=lambda r: r.inflight)
        # A holder saves a load (~50 ms); beyond a few queued requests, spreading wins.
        if best_holder.inflight <= least_loaded.inflight + 4:
            return best_holder
    return least_loaded


def eviction_order(
    replica: Replica, *, budget: int, pinned: set[str], incoming: int = 1
) -> list[str]:
    """Adapters to unload (LRU first) so that `incoming` more fit within `budget`.

    Adapters in use are never chosen: with more distinct adapters in flight than the budget,
    a replica holds more for a while (vLLM copes) and is trimmed back as requests finish.
    """
    excess = len(replica.loaded) + incoming - budget
    if excess <= 0:
        return []
    idle = [n for n in replica.loaded if n not in pinned and replica.in_use[n] == 0]
    return idle[:excess]

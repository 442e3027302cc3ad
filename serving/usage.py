"""Usage metering off the request path: rows queue in memory and land in one transaction per
flush (every `interval` seconds), so a commit's fsync never sits inside a request's latency.

Each row is what `api.services.usage.record_usage` writes, stamped with the request's own
time; a flush that fails is logged and retried with the next one (metering never fails an
answered request, and a database blip loses nothing short of a gateway crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlmodel import Session

from api.db import get_engine, utcnow
from api.models.usage import UsageRecord

log = logging.getLogger(__name__)
MAX_PENDING = 100_000  # beyond this, with the database down for long, drop the oldest


class UsageWriter:
    def __init__(self, database_url: str, *, interval: float = 0.5) -> None:
        self.database_url = database_url
        self.interval = interval
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, **row: Any) -> None:
        self._pending.append({**row, "created_at": utcnow()})
        del self._pending[:-MAX_PENDING]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            rows, self._pending = self._pending, []
            if not rows:
                return
            try:
                await asyncio.to_thread(self._write, rows)
            except Exception:
                log.exception("could not record %d usage rows; will retry", len(rows))
                self._pending[:0] = rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with Session(get_engine(self.database_url)) as session:
            session.add_all(UsageRecord(**row) for row in rows)
            session.commit()

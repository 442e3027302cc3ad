"""Prefetch on promotion: versions that serve by-name traffic are loaded before it comes.

A version promoted to production, or started as a canary, will take an adapter's by-name
requests from the next one on. Every few seconds each gateway reads which versions do (the
newest promotions and canaries first, at most `PREFETCH_SCAN`) and loads the ones no replica
holds onto the replica that will serve them: the same least-busy replica a first request
would pick, and after that the router prefers a replica that holds the adapter. A replica
that fetches adapters itself downloads and verifies it there (hashed once, while
downloading: serving/adapter_source.py); a gateway that hands replicas local paths verifies
it into its own cache first.

Only into room: a prefetch never unloads another adapter (`Engine.preload`), so a burst of
promotions cannot push out what serves traffic now; what does not fit loads on first use,
as before. The transformers engine loads on first use only (it does not preload).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from serving.errors import AdapterIntegrityError

if TYPE_CHECKING:
    from api.models.adapters import AdapterVersion
    from serving.gateway import Gateway

log = logging.getLogger(__name__)
PREFETCH_INTERVAL = 2.0  # seconds between reads of what serves by name
PREFETCH_SCAN = 64  # versions read per round (newest promotions first)
PREFETCH_BATCH = 4  # loads started per round
MAX_FAILURES = 3  # failed loads before a version is left to load on first use


async def prefetch_promoted(
    gateway: Gateway, database_url: str, *, interval: float = PREFETCH_INTERVAL
) -> None:
    """Forever: load production and canary versions no replica holds, where there is room."""
    from starlette.concurrency import run_in_threadpool

    if not gateway.engine.preloads:
        return
    failures: dict[str, int] = {}  # version id -> failed loads (a refusal counts as all)
    while True:
        await asyncio.sleep(interval)
        if not gateway.engine.ready():
            continue
        try:
            versions = await run_in_threadpool(serving_by_name, database_url)
            await prefetch(gateway, versions, failures)
        except asyncio.CancelledError:
            raise
        except Exception:  # the database or a replica went away: next round
            log.warning("prefetching promoted versions failed; retrying", exc_info=True)


async def prefetch(
    gateway: Gateway, versions: list[AdapterVersion], failures: dict[str, int]
) -> int:
    """Load up to PREFETCH_BATCH of `versions` that no replica holds; returns how many
    loads it started. A version refused (altered bytes) or whose load failed MAX_FAILURES
    times is left to load on first use, where its client gets the error."""
    loaded = {name for status in gateway.engine.status() for name in status.loaded}
    started = 0
    for version in versions:
        if started >= PREFETCH_BATCH:
            break
        if failures.get(version.id, 0) >= MAX_FAILURES:
            continue
        try:
            adapter = await gateway.acquire(version)
        except AdapterIntegrityError:
            failures[version.id] = MAX_FAILURES
            continue
        try:
            if adapter.name in loaded:
                continue
            started += 1
            if not await gateway.engine.preload(adapter):
                break  # no replica has room: the rest loads on first use
            log.info("prefetched %s (%s) onto a replica", version.fine_tuned_model, version.stage)
        except AdapterIntegrityError:
            failures[version.id] = MAX_FAILURES
        except Exception as e:  # a replica refused or went away mid-load
            failures[version.id] = failures.get(version.id, 0) + 1
            log.warning("prefetch of %s failed (%s: %s)", version.fine_tuned_model,
                        type(e).__name__, e)  # fmt: skip
        finally:
            gateway.release(version, adapter)
    return started


def serving_by_name(database_url: str) -> list[AdapterVersion]:
    """Production and canary versions, the newest promotions and canaries first."""
    from sqlmodel import Session, col, select

    from api.db import get_engine
    from api.models.adapters import Adapter, AdapterVersion

    with Session(get_engine(database_url), expire_on_commit=False) as session:
        canaries = session.exec(
            select(AdapterVersion)
            .join(Adapter, col(Adapter.canary_version_id) == col(AdapterVersion.id))
            .order_by(col(Adapter.canary_started_at).desc())
            .limit(PREFETCH_SCAN)
        ).all()
        production = session.exec(
            select(AdapterVersion)
            .where(AdapterVersion.stage == "production")
            .order_by(col(AdapterVersion.promoted_at).desc())
            .limit(PREFETCH_SCAN)
        ).all()
    unique = {v.id: v for v in [*canaries, *production]}  # a dict keeps the order
    return list(unique.values())[:PREFETCH_SCAN]

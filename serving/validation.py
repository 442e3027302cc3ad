"""The exact-match probe as served: a version's probe prompts through the real serving engine.

The trainer probes an adapter in its own process, on the numerics it trained on. What a tenant
gets is the engine's answer: vLLM's kernels, its dtype, its batching, its copy of the base.
`probe_as_served` asks the engine the prompts the trainer probed (kept in the version's
metrics, `exact_match_after.{train,validation}.samples[].messages`), greedily, all at once as
traffic would arrive, and scores the answers by the trainer's rule (exact after collapsing
whitespace). A gateway runs it on every new version (`watch_new_versions`, which also tells
the version's job), and the admin API before a promotion to production when this process
serves (`loraplex up`); the promotion gate reads it first (api/services/promotion.py).
Nothing is metered: these are the deployment's requests, not the tenant's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from api.errors import InvalidRequest
from serving.engines.base import EngineRequest
from serving.gateway import tenant_cache_salt

if TYPE_CHECKING:
    from api.models.adapters import AdapterVersion
    from serving.gateway import Gateway

log = logging.getLogger(__name__)
SIDES = ("train", "validation")
MAX_ANSWER_TOKENS = 512


def _normalise(text: str) -> str:
    return " ".join(text.split())


def probe_prompts(metrics: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """side -> the trainer's probe samples that carry their prompt messages."""
    after = metrics.get("exact_match_after") or {}
    return {
        side: [s for s in ((after.get(side) or {}).get("samples") or []) if s.get("messages")]
        for side in SIDES
    }


async def probe_as_served(gateway: Gateway, version: AdapterVersion) -> dict[str, Any] | None:
    """{engine, train, validation} like the trainer's probe (None per side without prompts);
    None when the version has no stored prompts (trained before they were kept). One probe
    per version at a time in a gateway: a second caller (a promotion while the watcher is
    probing the new version) shares the one in flight instead of doubling the engine's work."""
    running = gateway.probes.get(version.id)
    if running is None:
        running = asyncio.ensure_future(_probe(gateway, version))
        gateway.probes[version.id] = running
        running.add_done_callback(lambda _: gateway.probes.pop(version.id, None))
    return await asyncio.shield(running)


async def _probe(gateway: Gateway, version: AdapterVersion) -> dict[str, Any] | None:
    prompts = probe_prompts(version.metrics or {})
    if not any(prompts.values()):
        return None
    adapter = await gateway.acquire(version)
    salt = tenant_cache_salt(version.tenant_id)

    async def ask(sample: dict[str, Any]) -> str:
        # Answers are never longer in tokens than in characters, plus the trainer's slack.
        limit = min(len(sample["expected"]) + 8, MAX_ANSWER_TOKENS)
        body = {"model": version.fine_tuned_model, "messages": sample["messages"],
                "temperature": 0, "max_tokens": limit}  # fmt: skip
        try:
            answer = await gateway.engine.complete(
                EngineRequest(endpoint="chat", body=body, adapter=adapter, cache_salt=salt)
            )
        except InvalidRequest as e:
            if e.code != "context_length_exceeded":
                raise
            # A long expected answer after its prompt passes the context: ask for what fits
            # (the engine's default, bounded by the room left), as a client would.
            body.pop("max_tokens")
            answer = await gateway.engine.complete(
                EngineRequest(endpoint="chat", body=body, adapter=adapter, cache_salt=salt)
            )
        return str(answer["choices"][0]["message"].get("content") or "").strip()

    result: dict[str, Any] = {"engine": gateway.engine.kind}
    try:
        for side, samples in prompts.items():
            answers = await asyncio.gather(*(ask(s) for s in samples))
            result[side] = _scored(samples, answers) if samples else None
    finally:
        gateway.release(version, adapter)  # held since `acquire`
    return result


def _scored(samples: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    scored = [
        {"prompt": s["prompt"], "expected": s["expected"], "got": got}
        for s, got in zip(samples, answers, strict=True)
    ]
    exact = sum(_normalise(s["expected"]) == _normalise(s["got"]) for s in scored)
    return {"n": len(scored), "exact": exact, "rate": exact / len(scored), "samples": scored}


# New versions are probed through the engine this soon after they land (a gateway that
# shares the registry's database; `loraplex up`), newest first, a few per round.
WATCH_INTERVAL = 5.0
WATCH_BATCH = 4
WATCH_WINDOW_HOURS = 24


async def watch_new_versions(gateway: Gateway, database_url: str) -> None:
    """Forever: probe recent servable versions that have no served probe yet, keep it in
    their metrics, and tell their job (an event with the figures). A version that fails is
    retried next round; one without prompts is left alone."""
    from starlette.concurrency import run_in_threadpool

    skip: set[str] = set()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        if not gateway.engine.ready():
            continue
        try:
            pending = await run_in_threadpool(_unprobed, database_url, skip)
            for version in pending:
                served = await probe_as_served(gateway, version)
                if served is None:
                    skip.add(version.id)
                    continue
                await run_in_threadpool(_record, database_url, version.id, served)
        except asyncio.CancelledError:
            raise
        except Exception:  # the engine went away mid-probe, a database blip: next round
            log.warning("probing new versions as served failed; retrying", exc_info=True)


def _unprobed(database_url: str, skip: set[str]) -> list[AdapterVersion]:
    from datetime import timedelta

    from sqlmodel import Session, col, select

    from api.db import get_engine, utcnow
    from api.models.adapters import AdapterVersion

    since = utcnow() - timedelta(hours=WATCH_WINDOW_HOURS)
    with Session(get_engine(database_url), expire_on_commit=False) as session:
        rows = session.exec(
            select(AdapterVersion)
            .where(col(AdapterVersion.created_at) >= since, AdapterVersion.stage != "rejected")
            .order_by(col(AdapterVersion.created_at).desc())
            .limit(50)
        ).all()
    todo = [
        v for v in rows
        if v.id not in skip and not (v.metrics or {}).get("exact_match_served")
        and any(probe_prompts(v.metrics or {}).values())
    ]  # fmt: skip
    return todo[:WATCH_BATCH]


def _record(database_url: str, version_id: str, served: dict[str, Any]) -> None:
    from sqlmodel import Session

    from api.db import get_engine
    from api.models.adapters import AdapterVersion
    from api.services.jobs import add_event

    with Session(get_engine(database_url)) as session:
        version = session.get(AdapterVersion, version_id)
        if version is None or (version.metrics or {}).get("exact_match_served"):
            return
        version.metrics = {**(version.metrics or {}), "exact_match_served": served}
        session.add(version)
        parts = [
            f"{side} prompts {served[side]['exact']}/{served[side]['n']}"
            for side in SIDES if served.get(side)
        ]  # fmt: skip
        figures = {
            side: {k: served[side][k] for k in ("n", "exact", "rate")}
            for side in SIDES
            if served.get(side)
        }
        if version.job_id is not None:  # an uploaded version has no job to tell
            add_event(
                session,
                version.job_id,
                f"As served by the {served['engine']} engine, {version.fine_tuned_model} "
                f"answered as trained: {', '.join(parts)}",
                data=figures,  # a message: "metrics" events are training steps to the SDKs
            )
        session.commit()

"""The exact-match probe as served: a version's probe prompts through the real serving engine.

The trainer probes an adapter in its own process, on the numerics it trained on. What a tenant
gets is the engine's answer: vLLM's kernels, its dtype, its batching, its copy of the base.
`probe_as_served` asks the engine the prompts the trainer probed (kept in the version's
metrics, `exact_match_after.{train,validation}.samples[].messages`), greedily, all at once as
traffic would arrive, and scores the answers by the trainer's rule (exact after collapsing
whitespace). The admin API runs it before a promotion to production when this process serves
(`loraplex up`), and the promotion gate reads it first (api/services/promotion.py). Nothing
is metered: these are the deployment's requests, not the tenant's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from serving.engines.base import EngineRequest
from serving.gateway import tenant_cache_salt

if TYPE_CHECKING:
    from api.models.adapters import AdapterVersion
    from serving.gateway import Gateway

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
    None when the version has no stored prompts (trained before they were kept)."""
    prompts = probe_prompts(version.metrics or {})
    if not any(prompts.values()):
        return None
    adapter, _ = await gateway.cache.ensure(version)
    salt = tenant_cache_salt(version.tenant_id)

    async def ask(sample: dict[str, Any]) -> str:
        # Answers are never longer in tokens than in characters, plus the trainer's slack.
        limit = min(len(sample["expected"]) + 8, MAX_ANSWER_TOKENS)
        body = {"model": version.fine_tuned_model, "messages": sample["messages"],
                "temperature": 0, "max_tokens": limit}  # fmt: skip
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
        gateway.cache.release(version.id)  # held since `ensure`
    return result


def _scored(samples: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    scored = [
        {"prompt": s["prompt"], "expected": s["expected"], "got": got}
        for s, got in zip(samples, answers, strict=True)
    ]
    exact = sum(_normalise(s["expected"]) == _normalise(s["got"]) for s in scored)
    return {"n": len(scored), "exact": exact, "rate": exact / len(scored), "samples": scored}

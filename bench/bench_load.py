"""Serving under load: requests/s of concurrent chat traffic over several tenants and adapters
through `loraplex serve` with the in-process transformers engine, on the tiny test base.

One run, side by side:
  1. requests/s at concurrency 1 (one request at a time) and at each higher level, and the
     ratio to concurrency 1 (what batching across tenants and adapters buys)
  2. errors and wrong answers: every answer is compared with the one the same request gets
     alone (greedy), so a mixed batch serving the wrong adapter shows here
  3. the gateway process's RSS before and after repeated rounds at the highest concurrency,
     and its peak (VmHWM)

Adapters: two trained by the trainer on the tiny base (~2 s each), plus copies with scaled
lora_B, spread over `--tenants` tenants, each tenant with `--adapters` adapter lines (the same
names in every tenant, their own weights) plus the base model.

    .venv/bin/python bench/bench_load.py [--requests 128] [--concurrency 1,8,32,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Call = tuple[str, str, str]  # api key, model, question


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def setup(work: Path, *, tenants: int, lines: int) -> tuple[Any, list[Call]]:
    """Settings for a fresh home, and the distinct calls: every tenant x model x question."""
    from api.db import upgrade
    from api.settings import Settings
    from tests.conftest import new_tenant
    from tests.serving.servingdata import (
        BASE,
        FACTS_A,
        FACTS_B,
        QUESTIONS,
        TenantKey,
        build_tiny_base,
        register,
        train_adapter,
        variant,
    )  # fmt: skip

    base_dir = build_tiny_base(work / "base")
    trained = [train_adapter(base_dir, facts, work / name)
               for name, facts in (("a", FACTS_A), ("b", FACTS_B))]  # fmt: skip
    settings = Settings(
        home=work / "home", database_url=f"sqlite:///{work / 'bench.db'}",
        storage_url=f"file://{work / 'artifacts'}", serving_cache_dir=work / "cache",
        base_model=BASE, base_models={BASE: str(base_dir)}, max_lora_rank=8,
    )  # fmt: skip
    upgrade(settings.database_url)
    calls: list[Call] = []
    for t in range(tenants):
        tenant_id, key = new_tenant(settings, name=f"bench-{t}")
        tenant = TenantKey(tenant_id=tenant_id, key=key, name=f"bench-{t}")
        for line in range(lines):
            scale = 0.5 + 0.25 * ((t * lines + line) % 4)  # distinct weights per line
            source = trained[(t + line) % 2]
            path = variant(source, work / f"t{t}-l{line}", scale=scale)
            register(settings, tenant=tenant, suffix=f"line{line}", adapter_dir=path)
        models = [f"line{line}" for line in range(lines)] + [BASE]
        calls += [(key, model, q) for model in models for q in QUESTIONS]
    return settings, calls


def start_gateway(settings: Any, *, port: int, threads: int, batch: int, work: Path) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | {
        "LORAPLEX_HOME": str(settings.home), "LORAPLEX_DATABASE_URL": settings.database_url,
        "LORAPLEX_STORAGE_URL": settings.storage_url,
        "LORAPLEX_SERVING_CACHE_DIR": str(settings.serving_cache_dir),
        "LORAPLEX_BASE_MODEL": settings.base_model,
        "LORAPLEX_BASE_MODELS": json.dumps(settings.base_models),
        "LORAPLEX_MAX_LORA_RANK": str(settings.max_lora_rank),
        "LORAPLEX_SERVING_ENGINE": "transformers", "LORAPLEX_SERVING_DTYPE": "float32",
        "LORAPLEX_SERVING_MAX_BATCH_SIZE": str(batch),
        "LORAPLEX_SERVING_TORCH_THREADS": str(threads), "LORAPLEX_LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "loraplex"), "serve", "--port", str(port)],
        env=env, stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


async def ask(client: httpx.AsyncClient, url: str, call: Call, max_tokens: int) -> str:
    key, model, question = call
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}  # fmt: skip
    try:
        response = await client.post(f"{url}/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    except httpx.HTTPError as e:  # a dropped connection counts as an error, not a crash
        return f"HTTP error: {type(e).__name__}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return str(response.json()["choices"][0]["message"]["content"])


async def level(
    url: str, calls: list[Call], *, requests: int, concurrency: int, max_tokens: int,
    expected: dict[Call, str],
) -> dict[str, Any]:  # fmt: skip
    """`requests` calls (cycling through `calls`), `concurrency` in flight at a time."""
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    wrong = errors = 0

    async def one(client: httpx.AsyncClient, call: Call) -> None:
        nonlocal wrong, errors
        async with limit:
            started = time.perf_counter()
            got = await ask(client, url, call, max_tokens)
            latencies.append(time.perf_counter() - started)
        if got.startswith("HTTP "):
            errors += 1
        elif got != expected[call]:
            wrong += 1

    chosen = [calls[(i * 7) % len(calls)] for i in range(requests)]  # mixes tenants and models
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, call) for call in chosen))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": requests, "req_s": requests / seconds,
        "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (requests - 1))],
        "errors": errors, "wrong": wrong,
    }  # fmt: skip


async def measure(args: argparse.Namespace, url: str, calls: list[Call], pid: int) -> Any:
    async with httpx.AsyncClient(timeout=600) as client:
        expected = {call: await ask(client, url, call, args.max_tokens) for call in calls}
    bad = [v for v in expected.values() if v.startswith("HTTP ")]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed alone, e.g. {bad[0]}")
    shape = {"max_tokens": args.max_tokens, "expected": expected}
    levels = []
    for concurrency in args.concurrency:
        requests = args.requests if concurrency > 1 else max(16, args.requests // 4)
        result = await level(url, calls, requests=requests, concurrency=concurrency, **shape)
        levels.append(result)
        log(f"concurrency {concurrency}: {result['req_s']:.1f} req/s, "
            f"{result['errors']} errors, {result['wrong']} wrong")  # fmt: skip
    top = max(args.concurrency)
    before = memory_mib(pid)
    for i in range(args.rounds):
        result = await level(url, calls, requests=args.requests, concurrency=top, **shape)
        levels.append(result | {"memory_round": i + 1})
        log(f"memory round {i + 1}: {result['req_s']:.1f} req/s, RSS {memory_mib(pid)}")
    return {"distinct_calls": len(calls), "levels": levels, "rss_before": before,
            "rss_after": memory_mib(pid)}  # fmt: skip


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    levels = [x for x in r["levels"] if "memory_round" not in x]
    alone = levels[0]["req_s"]
    lines = [
        f"workload: chat, {args.max_tokens} tokens greedy, {args.tenants} tenants x "
        f"{args.adapters} adapters + base, {r['distinct_calls']} distinct requests; "
        f"transformers engine, batch <= {args.batch}, {args.threads} torch thread(s)",
    ]
    for x in levels:
        lines.append(
            f"concurrency {x['concurrency']:>3}: {x['req_s']:6.1f} req/s "
            f"({x['req_s'] / alone:4.1f}x concurrency 1), p50 {x['p50_s'] * 1000:.0f} ms, "
            f"p95 {x['p95_s'] * 1000:.0f} ms, errors {x['errors']}, wrong answers {x['wrong']}"
        )
    rounds = [x for x in r["levels"] if "memory_round" in x]
    growth = r["rss_after"]["VmRSS"] - r["rss_before"]["VmRSS"]
    lines.append(
        f"memory: {len(rounds)} more rounds of {args.requests} at concurrency "
        f"{max(args.concurrency)} ({sum(x['errors'] + x['wrong'] for x in rounds)} errors or "
        f"wrong): RSS {r['rss_before']['VmRSS']:.0f} -> {r['rss_after']['VmRSS']:.0f} MiB "
        f"({growth:+.1f} MiB, {growth * 1024 / max(1, args.rounds * args.requests):+.1f} KiB "
        f"per request), peak {r['rss_after']['VmHWM']:.0f} MiB"
    )
    print("\n".join(lines))
    print(json.dumps(r, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128, help="per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32,64",
                        type=lambda s: [int(c) for c in s.split(",")])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="memory rounds at the top level")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=2, help="adapter lines per tenant")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="serving_max_batch_size")
    parser.add_argument("--threads", type=int, default=1, help="serving_torch_threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from serving.replicas import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    settings, calls = setup(work, tenants=args.tenants, lines=args.adapters)
    port = free_port()
    gateway = start_gateway(settings, port=port, threads=args.threads, batch=args.batch,
                            work=work)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, gateway, call=calls[0])
        results = asyncio.run(measure(args, url, calls, gateway.pid))
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
    report(results, args)
    shutil.rmtree(work, ignore_errors=True)


def wait_ready(url: str, gateway: Any, *, call: Call, timeout: float = 120) -> None:
    """Until a completion is answered: the server starts, then builds the engine in the
    background, answering completions 503 until it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError("the gateway exited; see gateway.log")
        if not asyncio.run(probe(url, call)).startswith("HTTP "):
            return
        time.sleep(0.5)
    raise TimeoutError("gateway not ready")


async def probe(url: str, call: Call) -> str:
    async with httpx.AsyncClient(timeout=60) as client:
        return await ask(client, url, call, 1)


if __name__ == "__main__":
    main()

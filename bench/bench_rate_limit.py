"""Serving: what the per-tenant rate limiter costs the gateway (target: < 2%).

One run, side by side: two `loraplex serve` gateways on the same database and tiny base,
one with the limiter on (limits high enough never to refuse, so every request pays the full
check, reservation and settlement) and one with `LORAPLEX_RATE_LIMITS_ENABLED=false`. Rounds
alternate on, off, on, off... so drift on a shared box hits both alike; each round sends
`--requests` chat completions of `--max-tokens` tokens (1 by default: the engine's share is
small and the gateway's path, limiter included, is what is measured) over `--tenants`
tenants at `--concurrency`. Printed: req/s (median round) and p50/p95 latency (all requests)
per side, the on/off ratios, and the in-process cost of one admission.

    .venv/bin/python bench/bench_rate_limit.py [--rounds 10] [--requests 300] [--concurrency 16]
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

HIGH = 10**9  # a limit no round reaches: the limiter runs in full but never refuses


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def setup(work: Path, *, tenants: int) -> tuple[Any, list[str]]:
    from api.db import upgrade
    from api.settings import Settings
    from tests.conftest import new_tenant
    from tests.serving.servingdata import BASE, build_tiny_base

    base_dir = build_tiny_base(work / "base")
    settings = Settings(
        home=work / "home",
        database_url=f"sqlite:///{work / 'bench.db'}",
        storage_url=f"file://{work / 'artifacts'}",
        base_model=BASE,
        base_models={BASE: str(base_dir)},
    )
    upgrade(settings.database_url)
    keys = [new_tenant(settings, name=f"bench-{t}")[1] for t in range(tenants)]
    return settings, keys


def start_gateway(
    settings: Any, *, port: int, limiter: bool, work: Path, engine: str = "transformers"
) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | {
        "LORAPLEX_HOME": str(settings.home),
        "LORAPLEX_DATABASE_URL": settings.database_url,
        "LORAPLEX_STORAGE_URL": settings.storage_url,
        "LORAPLEX_BASE_MODEL": settings.base_model,
        "LORAPLEX_BASE_MODELS": json.dumps(settings.base_models),
        "LORAPLEX_SERVING_ENGINE": engine,
        "LORAPLEX_SERVING_DTYPE": "float32",
        "LORAPLEX_SERVING_MAX_BATCH_SIZE": "16",
        "LORAPLEX_SERVING_TORCH_THREADS": "1",
        "LORAPLEX_LOG_LEVEL": "WARNING",
        "LORAPLEX_RATE_LIMITS_ENABLED": str(limiter).lower(),
        "LORAPLEX_TENANT_REQUESTS_PER_MINUTE": str(HIGH),
        "LORAPLEX_TENANT_TOKENS_PER_MINUTE": str(HIGH),
        "HF_HUB_OFFLINE": "1",
    }
    name = "on" if limiter else "off"
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "loraplex"), "serve", "--port", str(port)],
        env=env,
        stdout=open(work / f"gateway-{name}.log", "wb"),
        stderr=subprocess.STDOUT,
    )


async def ask(client: httpx.AsyncClient, url: str, key: str, max_tokens: int) -> int:
    body = {
        "model": "tiny-serve",
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    try:
        response = await client.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    except httpx.HTTPError:
        return 0
    return response.status_code


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used: its cost, whatever else the box runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def round_(
    url: str, keys: list[str], args: argparse.Namespace, *, pid: int
) -> dict[str, Any]:
    """`args.requests` completions, `args.concurrency` in flight, tenants interleaved."""
    limit = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(client: httpx.AsyncClient, key: str) -> None:
        nonlocal errors
        async with limit:
            started = time.perf_counter()
            status = await ask(client, url, key, args.max_tokens)
            latencies.append(time.perf_counter() - started)
        errors += status != 200

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started, cpu = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(one(client, keys[i % len(keys)]) for i in range(args.requests)))
        seconds, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    return {
        "req_s": args.requests / seconds,
        "latencies": latencies,
        "errors": errors,
        "cpu_ms": 1000 * cpu / args.requests,
    }


async def measure(
    urls: dict[str, str], pids: dict[str, int], keys: list[str], args: argparse.Namespace
) -> Any:
    results: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for side in ("on", "off"):  # warm-up: pools, arenas, every tenant's limits cached
        await round_(urls[side], keys, args, pid=pids[side])
    for i in range(args.rounds):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        for side in order:
            result = await round_(urls[side], keys, args, pid=pids[side])
            results[side].append(result)
            log(
                f"round {i + 1} {side:>3}: {result['req_s']:.1f} req/s, "
                f"{result['cpu_ms']:.2f} CPU ms/request, {result['errors']} errors"
            )
    return results


def summary(rounds: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for r in rounds for x in r["latencies"])
    return {
        "req_s": statistics.median(r["req_s"] for r in rounds),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "errors": sum(r["errors"] for r in rounds),
        "cpu_ms": statistics.median(r["cpu_ms"] for r in rounds),
    }


def admission_cost_us(calls: int = 200_000) -> float:
    """One admission in-process (take + settle, both limits on): the limiter's own cost."""
    from api.services.limits import Limits
    from api.settings import Settings
    from serving.ratelimit import RateLimiter, TenantState, estimate_tokens
    from serving.schemas import ChatCompletionRequest

    limiter = RateLimiter(Settings())
    limits = Limits(HIGH, HIGH, 0, 0, 0, 0, 0)
    state = TenantState(limits=limits, fetched=time.monotonic())
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    )
    usage = {"prompt_tokens": 10, "completion_tokens": 1}
    started = time.perf_counter()
    for _ in range(calls):
        limiter.take(state, tenant_id="t", cost=estimate_tokens(body)).settle(usage)
    return (time.perf_counter() - started) / calls * 1e6


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    on, off = summary(results["on"]), summary(results["off"])
    print(
        f"workload: chat, {args.max_tokens} token(s), {args.tenants} tenants, "
        f"{args.requests} requests x {args.rounds} rounds per side at concurrency "
        f"{args.concurrency}; transformers engine, tiny base, one gateway process per side"
    )
    for name, s in (("limiter on ", on), ("limiter off", off)):
        print(
            f"{name}: {s['req_s']:7.1f} req/s, p50 {s['p50_ms']:6.1f} ms, "
            f"p95 {s['p95_ms']:6.1f} ms, gateway CPU {s['cpu_ms']:.2f} ms/request, "
            f"errors {s['errors']}"
        )
    # Each round's on/off pair ran back to back: their ratio cancels drift on a busy box.
    pairs = zip(results["on"], results["off"], strict=True)
    paired = sorted(a["req_s"] / b["req_s"] for a, b in pairs)
    print(
        f"on/off: throughput {on['req_s'] / off['req_s']:.3f}x (median of paired rounds "
        f"{statistics.median(paired):.3f}x, range {paired[0]:.3f}-{paired[-1]:.3f}), "
        f"p95 {on['p95_ms'] / off['p95_ms']:.3f}x, gateway CPU per request "
        f"{on['cpu_ms'] / off['cpu_ms']:.3f}x (target: throughput >= 0.98x)"
    )
    print(f"one admission + settlement in-process: {admission_cost_us():.2f} us")
    print(json.dumps({"on": on, "off": off}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per side")
    parser.add_argument("--requests", type=int, default=300, help="per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from serving.replicas import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-rate-limit-"))
    settings, keys = setup(work, tenants=args.tenants)
    ports = {"on": free_port(), "off": free_port()}
    gateways = {
        side: start_gateway(settings, port=ports[side], limiter=side == "on", work=work)
        for side in ports
    }
    urls = {side: f"http://127.0.0.1:{port}" for side, port in ports.items()}
    try:
        for side in urls:
            wait_ready(urls[side], gateways[side], key=keys[0])
        pids = {side: gateway.pid for side, gateway in gateways.items()}
        results = asyncio.run(measure(urls, pids, keys, args))
    finally:
        for gateway in gateways.values():
            gateway.send_signal(signal.SIGTERM)
        for gateway in gateways.values():
            gateway.wait(30)
    report(results, args)
    shutil.rmtree(work, ignore_errors=True)


def wait_ready(url: str, gateway: Any, *, key: str, timeout: float = 120) -> None:
    """Until a completion is answered (the engine is built in the background: 503 before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError("a gateway exited; see its gateway-*.log")
        if asyncio.run(probe(url, key)) == 200:
            return
        time.sleep(0.5)
    raise TimeoutError("gateway not ready")


async def probe(url: str, key: str) -> int:
    async with httpx.AsyncClient(timeout=60) as client:
        return await ask(client, url, key, 1)


if __name__ == "__main__":
    main()

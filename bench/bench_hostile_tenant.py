"""Serving: tenant B's latency while tenant A attacks, against B's quiet latency (issue 13's
acceptance: B sees 0 errors and its p95 stays within 2x of its quiet p95).

One `loraplex serve` gateway (`--engine`, tiny base, limiter on; A limited to
`--a-rpm` requests a minute). B sends `--requests` short chats one after another, first
alone (quiet), then while A runs, in a loop, every attack of the issue that reaches the
gateway: out-of-vocabulary token ids, 50,000 stop strings, 500 prompts x n=16, a 3 MB
prompt, and a flood of small requests past its rate limit; unless `--bombs-only`, also a legal
64-row request of 64 tokens each and streams it drops after the first chunk (legal work
that shares the engine and the cores with B). Rounds alternate quiet, attacked, quiet,
attacked... Printed: B's p50/p95 per phase and the attacked/quiet p95 ratio, B's errors,
and the status codes A got (a 5xx is a failure).

    .venv/bin/python bench/bench_hostile_tenant.py [--rounds 3] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_rate_limit import log, setup, start_gateway, wait_ready  # noqa: E402

MODEL = "tiny-serve"


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def attacks(*, legal: bool = True) -> list[tuple[str, str, dict[str, Any]]]:
    """The requests A sends each loop; `legal`: also the heavy ones within every bound."""
    chat = CHAT
    bombs: list[tuple[str, str, dict[str, Any]]] = [
        ("token ids", "completions", {"model": MODEL, "prompt": [100000], "max_tokens": 4}),
        ("stop bomb", "chat/completions", chat | {"stop": [f"s{i}" for i in range(50_000)]}),
        ("rows bomb", "completions", {"model": MODEL, "prompt": ["x"] * 500, "n": 16}),
        ("3 MB prompt", "completions", {"model": MODEL, "prompt": "word " * 600_000}),
    ]
    rows = {"model": MODEL, "prompt": ["Tell"] * 64, "max_tokens": 64, "temperature": 1.0}
    heavy = ("64 legal rows", "completions", rows)
    return [*bombs, heavy] if legal else bombs


async def attacker(
    url: str, key: str, codes: collections.Counter, stop: asyncio.Event, *, legal: bool
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        while not stop.is_set():
            for name, path, body in attacks(legal=legal):
                response = await client.post(f"{url}/v1/{path}", json=body)
                codes[f"{name}: {response.status_code}"] += 1
            if not legal:
                continue
            stream = {"model": MODEL, "prompt": "Go", "max_tokens": 200, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=stream) as response:
                codes[f"dropped stream: {response.status_code}"] += 1
                async for _ in response.aiter_bytes():
                    break  # hang up after the first chunk
            flood = [client.post(f"{url}/v1/chat/completions", json=CHAT) for _ in range(20)]
            for response in await asyncio.gather(*flood):
                codes[f"flood: {response.status_code}"] += 1


async def tenant_b(url: str, key: str, n: int) -> tuple[list[float], int]:
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    latencies, errors = [], 0
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(n):
            started = time.perf_counter()
            response = await client.post(
                f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 200
    return latencies, errors


def attack_process(url: str, key: str, legal: bool, stop: Any, out: Any) -> None:
    """A in a process of its own: building its bodies (3 MB of JSON) must not slow B's
    client, which shares nothing with it but the gateway."""
    codes: collections.Counter = collections.Counter()

    async def run() -> None:
        done = asyncio.Event()
        task = asyncio.create_task(attacker(url, key, codes, done, legal=legal))
        while not stop.is_set():
            await asyncio.sleep(0.1)
        done.set()
        await task

    asyncio.run(run())
    out.put(dict(codes))


def attacked_round(
    url: str, keys: list[str], n: int, codes: collections.Counter, *, legal: bool
) -> tuple[list[float], int]:
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=attack_process, args=(url, keys[0], legal, stop, out))
    proc.start()
    time.sleep(3.0)  # the attack is under way before B starts
    result = asyncio.run(tenant_b(url, keys[1], n))
    stop.set()
    codes.update(out.get(timeout=600))
    proc.join(60)
    return result


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="B's chats per round")
    parser.add_argument("--a-rpm", type=int, default=60, help="A's requests per minute")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument(
        "--bombs-only",
        action="store_true",
        help="A sends only what a bound refuses (no legal heavy requests, no dropped streams)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sqlmodel import Session

    from api.db import get_engine
    from api.services.limits import set_overrides
    from api.services.tenants import authenticate
    from serving.replicas import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    settings, keys = setup(work, tenants=2)
    with Session(get_engine(settings.database_url)) as s:
        tenant_a = authenticate(s, raw_key=keys[0]).tenant_id
        assert tenant_a is not None
        set_overrides(s, tenant_id=tenant_a, changes={"requests_per_minute": args.a_rpm})
        s.commit()
    port = free_port()
    gateway = start_gateway(settings, port=port, limiter=True, work=work, engine=args.engine)
    url = f"http://127.0.0.1:{port}"
    quiet: list[float] = []
    attacked: list[float] = []
    errors = 0
    codes: collections.Counter = collections.Counter()
    try:
        wait_ready(url, gateway, key=keys[1])
        asyncio.run(tenant_b(url, keys[1], 3))  # warm-up
        for i in range(args.rounds):
            lat, err = asyncio.run(tenant_b(url, keys[1], args.requests))
            quiet += lat
            lat_a, err_a = attacked_round(
                url, keys, args.requests, codes, legal=not args.bombs_only
            )
            attacked += lat_a
            errors += err + err_a
            log(f"round {i + 1}: quiet p95 {p95(lat):.3f} s, attacked p95 {p95(lat_a):.3f} s")
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
    print(f"B quiet:    p50 {statistics.median(quiet):.3f} s  p95 {p95(quiet):.3f} s")
    print(f"B attacked: p50 {statistics.median(attacked):.3f} s  p95 {p95(attacked):.3f} s")
    print(f"B attacked/quiet p95: {p95(attacked) / p95(quiet):.2f}x (target <= 2x)")
    print(f"B errors: {errors} of {2 * args.rounds * args.requests}")
    print("A got: " + ", ".join(f"{k} x{v}" for k, v in sorted(codes.items())))
    fives = sum(v for k, v in codes.items() if k.rsplit(" ", 1)[1].startswith("5"))
    print(f"A 5xx: {fives}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

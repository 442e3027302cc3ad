"""Cold adapter -> first token on one vLLM CPU replica: the LoRA scaling folded into lora_B by
the replica's fetch (serving/adapter_source.py, FoldScaling) vs the adapter stored as
published (vLLM folds it at load, copying every page of B), side by side.

One replica at a time (both would pin the same CPUs), alternating over rounds, the order
reversed every other round, each with an empty adapter cache. Per replica: 8 versions it has
never seen, one after another, each `POST /loraplex/v1/load_adapter` (fetch, verify, vLLM's
load) then one streamed chat request (first token), as the gateway does on a cold request;
and the same request on an adapter already loaded (warm). Adapters: one trained by the
trainer plus copies with scaled lora_B, all distinct bytes (bench_serving.register_versions).

    .venv/bin/python bench/bench_cold_adapter.py [--rounds 2] [--adapter DIR]
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_serving as bs  # noqa: E402
from bench_replica_cpus import alternate, prepare, print_side_by_side  # noqa: E402

VARIANTS = {"stored as published": "0", "scaling folded": "1"}
COLD = 8


async def measure(url: str, warm: str, cold: list[str]) -> dict[str, float]:
    from serving.adapter_source import LOAD_PATH

    async with httpx.AsyncClient(timeout=120) as client:
        (await client.post(f"{url}{LOAD_PATH}", json={"lora_name": warm})).raise_for_status()
    await bs.workload(url, key=None, models=[warm, bs.BASE], requests=8, max_tokens=4,
                      concurrency=4)  # fmt: skip
    # The replica checks no key; first_token_seconds sends one regardless.
    warm_times = [await bs.first_token_seconds(url, key="-", model=warm) for _ in range(8)]
    loads, totals = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        for name in cold:
            started = time.perf_counter()
            (await client.post(f"{url}{LOAD_PATH}", json={"lora_name": name})).raise_for_status()
            loads.append(time.perf_counter() - started)
            await bs.first_token_seconds(url, key="-", model=name)
            totals.append(time.perf_counter() - started)
    return {
        "cold first token p50, ms": statistics.median(totals) * 1000,
        "cold load p50, ms": statistics.median(loads) * 1000,
        "warm first token p50, ms": statistics.median(warm_times) * 1000,
    }


def run_one(settings: Any, base_dir: Path, env: dict[str, str], names: list[str], log: Path):
    from serving.replicas import plan_replicas

    replica = plan_replicas(settings, model_dir=base_dir, served_name=bs.BASE, count=1)[0]
    shutil.rmtree(settings.home / "replica-cache" / str(replica.port), ignore_errors=True)
    replica.env.update(env)
    replica.log_path = log
    replica.start()
    try:
        bs.wait_http(f"{replica.url}/health", timeout=300, proc=replica.proc)
        return asyncio.run(measure(replica.url, names[0], names[1:]))
    finally:
        replica.stop()
        shutil.rmtree(settings.home / "replica-cache" / str(replica.port), ignore_errors=True)


def main() -> None:
    args, settings, base_dir, _, work = prepare(__doc__, "bench-cold-")
    settings = settings.model_copy(update={"serving_adapter_source": "store"})
    trained = args.adapter or work / "trained"
    dirs = [bs.variant(trained, work / f"v{i}", scale=0.2 + 0.05 * i)
            for i in range(1 + COLD * args.rounds * len(VARIANTS))]  # fmt: skip
    _, _, on_replica = bs.register_versions(settings, dirs)
    warm, fresh = on_replica[0], iter(on_replica[1:])

    def run(name: str) -> dict[str, float]:
        cold = [next(fresh) for _ in range(COLD)]
        env = {"LORAPLEX_REPLICA_FOLD_SCALING": VARIANTS[name]}
        return run_one(settings, base_dir, env, [warm, *cold], work / "vllm.log")

    results = alternate(list(VARIANTS), args.rounds, run)
    print(f"medians of {args.rounds} rounds, {COLD} cold versions each, float32, grouped LoRA op")
    print_side_by_side(results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

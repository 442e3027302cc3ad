"""A vLLM CPU replica's model threads: every CPU vs vLLM's own choice (all but one, left to its
scheduler process), on this host, side by side.

vLLM's CPU build pins its model worker's OpenMP threads one per CPU and keeps one CPU per
worker for the scheduler process, which busy-polls shared memory for the worker's results.
On a 2-CPU host that is one model thread of two. Loraplex's launcher sets
`VLLM_CPU_NUM_OF_RESERVED_CPU=0` on hosts of at most 2 CPUs (`serving_replica_reserved_cpus`,
serving/replicas.py); this script measures both, one replica at a time (both would pin the
same CPUs), alternating over rounds, the order reversed every other round:

  - tokens/s, 32 chat requests x 64 tokens at concurrency 16, base-only and over 8 adapters
    (the adapters loaded ahead);
  - time to first token, p50 of 8 sequential streamed requests, base and one adapter.

Adapters: one trained by the trainer (bench_serving.train_adapter) plus copies with scaled
lora_B, as bench/bench_serving.py.

    .venv/bin/python bench/bench_replica_cpus.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_serving as bs  # noqa: E402
from bench_lora_op_serving import load_adapters  # noqa: E402

VARIANTS = {"vLLM's choice (1 reserved)": "1", "every CPU (0 reserved)": "0"}


async def measure(url: str, adapters: list[str]) -> dict[str, float]:
    shape = {"requests": 32, "max_tokens": 64, "concurrency": 16}
    await bs.workload(url, key=None, models=[*adapters, bs.BASE], requests=18, max_tokens=4,
                      concurrency=9)  # fmt: skip
    out = {
        "base tok/s": await bs.workload(url, key=None, models=[bs.BASE], **shape),
        "8 adapters tok/s": await bs.workload(url, key=None, models=adapters, **shape),
    }
    for name, model in (("base", bs.BASE), ("adapter", adapters[0])):
        # The replica checks no key; first_token_seconds sends one regardless.
        times = [await bs.first_token_seconds(url, key="-", model=model) for _ in range(8)]
        out[f"first token, {name}, ms"] = statistics.median(times) * 1000
    return out


def run_one(settings: Any, base_dir: Path, adapters: list[Path], env: dict[str, str], log: Path):
    """One replica as Loraplex starts it (`env` on top of its environment), measured."""
    from serving.replicas import plan_replicas

    replica = plan_replicas(settings, model_dir=base_dir, served_name=bs.BASE, count=1)[0]
    replica.env.update(env)
    replica.log_path = log
    replica.start()
    try:
        bs.wait_http(f"{replica.url}/health", timeout=300, proc=replica.proc)
        return asyncio.run(measure(replica.url, load_adapters(replica.url, adapters)))
    finally:
        replica.stop()


def prepare(doc: str | None, prefix: str) -> tuple[argparse.Namespace, Any, Path, list[Path], Path]:
    """Arguments, settings, base model dir, 8 adapters (a trained one and scaled copies) and
    a work dir, as every one-replica-at-a-time bench here uses them."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--home", type=Path, default=ROOT / ".loraplex", help="model cache")
    parser.add_argument("--adapter", type=Path, help="a trained adapter dir to reuse")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from api.settings import Settings
    from serving.replicas import free_port
    from trainer.base_models import resolve_base_model

    work = Path(tempfile.mkdtemp(prefix=prefix))
    settings = Settings(
        home=args.home, database_url=f"sqlite:///{work / 'bench.db'}",
        storage_url=f"file://{work / 'artifacts'}", serving_cache_dir=work / "cache",
        serving_max_loras=9, serving_max_cpu_loras=32, max_lora_rank=16,
        serving_max_model_len=1024, serving_replica_port=free_port(),
        serving_adapter_source="gateway",
    )  # fmt: skip
    base_dir = resolve_base_model(bs.BASE, home=args.home)
    trained = args.adapter or bs.train_adapter(args.home, work / "trained")
    adapters = [bs.variant(trained, work / f"a{i}", scale=1 + 0.1 * i) for i in range(8)]
    return args, settings, base_dir, adapters, work


def alternate(
    variants: list[str], rounds: int, run: Callable[[str], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """`run(variant)` for every variant in each round, the order reversed every other round."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name in variants if round_ % 2 == 0 else list(reversed(variants)):
            results[name].append(result := run(name))
            figures = ", ".join(f"{k} {v:.0f}" for k, v in result.items())
            bs.log(f"round {round_}: {name}: {figures}")
    return results


def print_side_by_side(results: dict[str, list[dict[str, float]]]) -> None:
    """Each figure's median per variant (two variants), and the second's ratio to the first."""
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in results.items()}  # fmt: skip
    first, second = list(results)
    for key in medians[first]:
        a, b = medians[first][key], medians[second][key]
        print(f"{key:>26}: {first} {a:7.1f} | {second} {b:7.1f} | ratio {b / a:.2f}")


def main() -> None:
    args, settings, base_dir, adapters, work = prepare(__doc__, "bench-cpus-")

    def run(name: str) -> dict[str, float]:
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": VARIANTS[name]}
        return run_one(settings, base_dir, adapters, env, work / "vllm.log")

    results = alternate(list(VARIANTS), args.rounds, run)
    print(f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds, float32, grouped LoRA op")
    print_side_by_side(results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

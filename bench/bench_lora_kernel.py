"""The grouped LoRA op's C kernel (serving/lora_kernel.c) in a real replica, side by side.

Three replicas as Loraplex starts them, one at a time (each pins every CPU), alternating over
rounds, the order reversed every other round:

  - torch path:          the grouped op without its kernel (LORAPLEX_LORA_KERNEL=off);
  - kernel, fp32 LoRA:   the default (LoRA weights in the replica's float32);
  - kernel, bf16 LoRA:   `serving_lora_dtype=bfloat16` (vLLM's --lora-dtype): half the bytes
                         a decode step reads for 8 distinct adapters.

Each: tokens/s of 32 chat requests x 64 tokens at concurrency 16, base-only and over 8
adapters (loaded ahead), and time to first token (p50 of 8), as bench/bench_replica_cpus.py.
Printed: each variant's 8 adapters / base-only (issue 18's target >= 0.80) and each figure
as a ratio to the torch path.

    .venv/bin/python bench/bench_lora_kernel.py [--rounds 2] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_serving as bs  # noqa: E402
from bench_replica_cpus import run_one  # noqa: E402

# name: (environment on top of the replica's, settings changed)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "torch path": ({"LORAPLEX_LORA_KERNEL": "off"}, {}),
    "kernel, fp32 LoRA": ({}, {}),
    "kernel, bf16 LoRA": ({}, {"serving_lora_dtype": "bfloat16"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--home", type=Path, default=ROOT / ".loraplex", help="model cache")
    parser.add_argument("--adapter", type=Path, help="a trained adapter dir to reuse")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from api.settings import Settings
    from serving.replicas import free_port
    from trainer.base_models import resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="bench-kernel-"))
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
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            env, update = VARIANTS[name]
            log = work / f"vllm-{round_}-{name.split(',')[0].replace(' ', '-')}.log"
            result = run_one(settings.model_copy(update=update), base_dir, adapters, env, log)
            kernel_ran = "LoRA kernel ran its first batch" in log.read_text()
            assert kernel_ran == (name != "torch path"), (name, log)
            results[name].append(result)
            figures = ", ".join(f"{k} {v:.0f}" for k, v in result.items())
            bs.log(f"round {round_}: {name}: {figures}")
    print(f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds, float32 replicas")
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in results.items()}  # fmt: skip
    torch_path = medians["torch path"]
    for name, m in medians.items():
        ratio = m["8 adapters tok/s"] / m["base tok/s"]
        vs = ", ".join(f"{k} {m[k] / torch_path[k]:.2f}x" for k in m)
        figures = ", ".join(f"{k} {v:.0f}" for k, v in m.items())
        print(f"{name:>18}: 8 adapters / base {ratio:.2f} | {figures}")
        print(f"{'':>18}  vs torch path: {vs}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

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

import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_serving as bs  # noqa: E402
from bench_replica_cpus import prepare, run_one  # noqa: E402

# name: (environment on top of the replica's, settings changed)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "torch path": ({"LORAPLEX_LORA_KERNEL": "off"}, {}),
    "kernel, fp32 LoRA": ({}, {}),
    "kernel, bf16 LoRA": ({}, {"serving_lora_dtype": "bfloat16"}),
}


def main() -> None:
    args, settings, base_dir, adapters, work = prepare(__doc__, "bench-kernel-")
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

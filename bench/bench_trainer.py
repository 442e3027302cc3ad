"""Trainer throughput on SmolLM2-135M (QLoRA NF4), each figure printed as a ratio.

1. overhead: `trainer.recipe.train` vs a plain trl SFTTrainer script with identical settings
   (same model loading, LoRA, batch, lr, precision, no gradient checkpointing), tokens/s.
   Target >= 0.95.
2. packing: the trainer with packing vs without, on short examples of varied length.
   Target >= 1.5x.
Every variant runs in its own process (peak RSS is per process), one after another.
Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_trainer.py [--epochs N]
Tokens/s = input tokens trl counted (no padding) / seconds from the first to the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ACME = ROOT / "examples" / "support-acme.jsonl"
HOME = Path(os.environ.get("LORAPLEX_HOME", ROOT / ".loraplex"))
SETTINGS = {"batch_size": 8, "learning_rate_multiplier": 5.0, "probe_size": 0, "seed": 0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trainer(data: Path, epochs: int, packing: bool) -> dict[str, Any]:
    from trainer.callbacks import Progress
    from trainer.config import TrainConfig
    from trainer.recipe import train

    seen: list[Progress] = []
    config = TrainConfig(n_epochs=epochs, packing=packing, **SETTINGS)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as out:
        train(config, data_path=data, out_dir=Path(out), home=HOME, on_progress=seen.append)
    return {"tokens_per_second": seen[-1].tokens_per_second, "steps": seen[-1].step}


def run_plain_trl(data: Path, epochs: int) -> dict[str, Any]:
    """What a user would write with trl alone: prompt/completion rows, trl does the rest."""
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from trainer.base_models import resolve_base_model
    from trainer.modeling import cpu_supports_bf16

    bf16 = cpu_supports_bf16()
    path = resolve_base_model("smollm2-135m-instruct", home=HOME)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        bf16=bf16,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=1024,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora,
    )
    start = time.monotonic()
    trainer.train()
    elapsed = time.monotonic() - start
    tokens = max(log.get("num_tokens", 0) for log in trainer.state.log_history)
    return {"tokens_per_second": tokens / elapsed, "steps": trainer.state.global_step}


def short_examples(path: Path, *, n: int = 96, seed: int = 0) -> Path:
    """Support-style rows from 1 to 40 words: the spread padding wastes most on."""
    rng = random.Random(seed)
    words = ACME.read_text().replace('"', " ").split()
    rows = []
    for i in range(n):
        answer = " ".join(rng.choices(words, k=rng.randint(1, 40)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def child(variant: str, data: Path, epochs: int) -> None:
    if variant == "plain_trl":
        result = run_plain_trl(data, epochs)
    else:
        result = run_trainer(data, epochs, packing=variant == "trainer_packing")
    print(json.dumps(result | {"peak_rss_mb": peak_rss_mb()}))


def measure(variant: str, data: Path, epochs: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--data",
        str(data),
        "--epochs",
        str(epochs),
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child")
    parser.add_argument("--data", type=Path, default=ACME)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.epochs)
        return
    from trainer.base_models import resolve_base_model

    resolve_base_model("smollm2-135m-instruct", home=HOME)  # convert outside the timings
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores; others' jobs skew figures)")
    short = short_examples(Path(tempfile.mkdtemp()) / "short.jsonl")
    variants = {
        "plain trl": ("plain_trl", ACME),
        "trainer": ("trainer", ACME),
        "trainer, short rows": ("trainer", short),
        "trainer, short rows, packed": ("trainer_packing", short),
    }
    # Alternate the variants over rounds and keep each one's best run: on a shared box the
    # best run is the one least disturbed by other processes.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (variant, data) in variants.items():
            runs[name].append(measure(variant, data, args.epochs))
    best = {name: max(r, key=lambda x: x["tokens_per_second"]) for name, r in runs.items()}
    for name, r in best.items():
        all_runs = ", ".join(f"{x['tokens_per_second']:.0f}" for x in runs[name])
        print(
            f"{name:30s} {r['tokens_per_second']:6.1f} tok/s (runs: {all_runs})  "
            f"{r['steps']:3d} steps  peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    tps = {name: r["tokens_per_second"] for name, r in best.items()}
    overhead = tps["trainer"] / tps["plain trl"]
    packing = tps["trainer, short rows, packed"] / tps["trainer, short rows"]
    print(f"overhead ratio trainer/plain trl: {overhead:.3f} (target >= 0.95)")
    print(f"packing ratio packed/unpacked:    {packing:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()

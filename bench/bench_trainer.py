"""Trainer throughput on SmolLM2-135M, each figure printed as a ratio.

1. overhead: `trainer.recipe.train` vs a plain trl SFTTrainer script with identical settings,
   tokens/s. Both train what `method: auto` picks on a CPU: plain LoRA (r 16, alpha 32,
   all-linear) on the fp32 base with bf16 autocast where the CPU has AVX512-bf16, batch 8,
   lr 1e-3, no gradient checkpointing. Target >= 0.95.
2. packing: the trainer with packing vs without, on short examples of varied length.
   Target >= 1.5x. Packing keeps the unpacked step's examples (~batch_size per row) and
   step count. What it saves: the padding, printed as padded / real tokens of the unpacked
   batches (the chat template's fixed ~38 tokens make that 1.31x on these rows), and on CPU
   the prompt prefix a row's examples share, run once per row (trainer/packing.py; printed
   as the examples' tokens / the tokens the rows run). A third variant packs with sharing
   off (LORAPLEX_PACKING_SHARED_PREFIX=off: trl's padding-free rows), to show each part.
   On CPU the trainer's LM head scores labelled positions only (trainer/lm_head.py), so
   padding costs only its passes through the layers (docs/benchmarks.md).
Every variant runs in its own process (peak RSS is per process); the variants alternate over
`--rounds` rounds (3 by default), and each one's best and median are reported.
Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_trainer.py [--epochs N] [--rounds N]
[--packing-only]
Tokens/s = input tokens trl counted (no padding) / seconds from the start of training to the
last step, taken the same way for both (the trainer's own progress callback, which only
reads the logs, is attached to the plain trl trainer too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ACME = ROOT / "examples" / "support-acme.jsonl"
HOME = Path(os.environ.get("LORAPLEX_HOME", ROOT / ".loraplex"))
SETTINGS = {"method": "lora", "batch_size": 8, "learning_rate_multiplier": 5.0, "probe_size": 0,
            "seed": 0}  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trainer(data: Path, epochs: int, packing: bool) -> dict[str, Any]:
    from trainer.callbacks import Progress
    from trainer.config import TrainConfig
    from trainer.recipe import train

    seen: list[Progress] = []
    config = TrainConfig(n_epochs=epochs, packing=packing, **SETTINGS)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as out:
        result = train(
            config, data_path=data, out_dir=Path(out), home=HOME, on_progress=seen.append
        )
    curve = result.metrics["loss_curve"]
    last_epoch = curve[-max(1, len(curve) // epochs) :]
    return {
        "tokens_per_second": seen[-1].tokens_per_second,
        "steps": seen[-1].step,
        # the last epoch's mean loss: packing must leave it where unpacked training gets
        "train_loss": statistics.mean(p["loss"] for p in last_epoch),
    }


def run_plain_trl(data: Path, epochs: int) -> dict[str, Any]:
    """What a user would write with trl alone: prompt/completion rows, trl does the rest."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainer.base_models import resolve_base_model
    from trainer.callbacks import Progress, ProgressCallback
    from trainer.modeling import cpu_supports_bf16

    bf16 = cpu_supports_bf16()
    path = resolve_base_model("smollm2-135m-instruct", home=HOME)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
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
    seen: list[Progress] = []
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora,
        callbacks=[ProgressCallback(seen.append)],
    )
    trainer.train()
    return {"tokens_per_second": seen[-1].tokens_per_second, "steps": seen[-1].step}


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


def padding_ratio(data: Path, *, batch_size: int = 8, shuffles: int = 200) -> float:
    """Padded / real tokens of the unpacked run's batches (rows padded to the longest in the
    batch, batches drawn shuffled as the trainer draws them): what packing would gain while
    it keeps the unpacked step's examples, were time linear in tokens."""
    from transformers import AutoTokenizer

    from trainer.base_models import resolve_base_model

    tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m-instruct", home=HOME))
    lengths = [len(tok.apply_chat_template(json.loads(line)["messages"])["input_ids"])
               for line in data.read_text().splitlines()]  # fmt: skip
    rng = random.Random(0)
    padded = real = 0
    for _ in range(shuffles):
        order = rng.sample(lengths, len(lengths))
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            padded += max(batch) * len(batch)
            real += sum(batch)
    return padded / real


def sharing_ratio(data: Path, *, batch_size: int = 8) -> float:
    """The examples' tokens / the tokens the trainer's packed rows run with shared prefixes."""
    from trainer.base_models import resolve_base_model
    from trainer.config import TrainConfig
    from trainer.data import TokenizedData, packed_row_length, prepare_inputs
    from trainer.modeling import load_tokenizer
    from trainer.packing import shared_prefix_rows
    from trainer.recipe import tokenize_inputs

    config = TrainConfig(packing=True, **SETTINGS)  # type: ignore[arg-type]
    inputs = prepare_inputs(config, data_path=data)
    tok = load_tokenizer(resolve_base_model(config.base_model, home=HOME))
    train, valid = tokenize_inputs(tok, inputs, config)
    assert isinstance(train, TokenizedData) and isinstance(valid, TokenizedData)
    length = packed_row_length([train, valid], batch_size=batch_size,
                               max_length=config.max_seq_length)  # fmt: skip
    rows = shared_prefix_rows(train, row_length=length, seed=config.seed)
    return sum(rows["tokens"]) / sum(map(len, rows["input_ids"]))


def child(variant: str, data: Path, epochs: int) -> None:
    if variant == "plain_trl":
        result = run_plain_trl(data, epochs)
    else:
        if variant == "trainer_packing_unshared":
            from trainer.objectives import SHARING_SWITCH

            os.environ[SHARING_SWITCH] = "off"
        result = run_trainer(data, epochs, packing=variant.startswith("trainer_packing"))
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--data", type=Path, default=ACME)
    parser.add_argument("--packing-only", action="store_true", help="the short-row variants")
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
        "short rows, packed, unshared": ("trainer_packing_unshared", short),
    }
    if args.packing_only:
        del variants["plain trl"], variants["trainer"]
    # Alternate the variants over rounds (the order reversed every other round); keep each
    # one's best (the run least disturbed by other processes on a shared box) and median.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            variant, data = variants[name]
            runs[name].append(measure(variant, data, args.epochs))
            print(f"round {round_}: {name}: {runs[name][-1]['tokens_per_second']:.1f} tok/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    best = {name: max(r, key=lambda x: x["tokens_per_second"]) for name, r in runs.items()}
    median = {name: statistics.median(x["tokens_per_second"] for x in r)
              for name, r in runs.items()}  # fmt: skip
    for name, r in best.items():
        all_runs = ", ".join(f"{x['tokens_per_second']:.0f}" for x in runs[name])
        losses = ", ".join(f"{x['train_loss']:.3f}" for x in runs[name] if "train_loss" in x)
        print(
            f"{name:30s} best {r['tokens_per_second']:6.1f}  median {median[name]:6.1f} tok/s "
            f"(runs: {all_runs})  {r['steps']:3d} steps  peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f"  last epoch's loss {losses}" if losses else "")
        )
    tps = {name: r["tokens_per_second"] for name, r in best.items()}
    if "plain trl" in tps:
        ratio = median["trainer"] / median["plain trl"]
        print(f"overhead ratio trainer/plain trl, median: {ratio:.3f}")
        overhead = tps["trainer"] / tps["plain trl"]
        print(f"overhead ratio trainer/plain trl, best:   {overhead:.3f} (target >= 0.95)")
    packed, unpacked = median["trainer, short rows, packed"], median["trainer, short rows"]
    print(f"packing ratio packed/unpacked, median:    {packed / unpacked:.2f}x")
    packing = tps["trainer, short rows, packed"] / tps["trainer, short rows"]
    print(f"packing ratio packed/unpacked, best:      {packing:.2f}x (target >= 1.5x)")
    unshared = median["short rows, packed, unshared"]
    print(f"  of which sharing prefixes, median:       {packed / unshared:.2f}x "
          f"(padding-free alone {unshared / unpacked:.2f}x)")  # fmt: skip
    padding = padding_ratio(short, batch_size=SETTINGS["batch_size"])
    print(f"padding of the short rows unpacked (padded / real tokens at batch "
          f"{SETTINGS['batch_size']}): {padding:.2f}x, the gain were time linear in "
          "tokens")  # fmt: skip
    print(f"prompt prefixes shared in the packed rows (examples' tokens / tokens run): "
          f"{sharing_ratio(short, batch_size=SETTINGS['batch_size']):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

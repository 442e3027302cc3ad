"""DPO acceptance figure on SmolLM2-135M: does a DPO adapter prefer what the data prefers?

Trains a DPO adapter on examples/dpo/preferences.jsonl (24 prompts; the preferred answers are
short and start with "In short:", the rejected ones are plain one-sentence answers) with the
trainer's defaults, then prints, base model vs adapter, on every prompt:
- the margin: mean of log p(preferred) - log p(rejected), summed answer-token log-probs;
- the share of prompts whose preferred answer is the more likely one;
- the share of greedy answers equal to the preferred answer (the trainer's exact-match probe)
  and the share that start with the house phrase.
The numbers come from the run's metrics.json (the trainer measures the base before training
and the adapter after, on the same model). With `--sft-first`, a supervised adapter is first
trained on the preferred answers and the DPO run continues it (its "base" column is then that
SFT adapter, DPO's reference). Run:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_margin.py [--sft-first] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "dpo" / "preferences.jsonl"
HOME = Path(os.environ.get("LORAPLEX_HOME", ROOT / ".loraplex"))
PHRASE = "In short:"


def phrase_share(probe: dict[str, Any]) -> float:
    samples = probe["samples"]
    return sum(s["got"].startswith(PHRASE) for s in samples) / len(samples)


def sft_adapter(data: Path, tmp: Path, n: int) -> str:
    """A supervised adapter on the preferred answers (every default), for DPO to continue."""
    from trainer.config import parse_config
    from trainer.recipe import train

    sft_data = tmp / "preferred.jsonl"
    with sft_data.open("w") as f:
        for line in data.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                messages = [*row["input"]["messages"], *row["preferred_output"]]
                f.write(json.dumps({"messages": messages}) + "\n")
    config = parse_config({"probe_size": n, "seed": 0})
    result = train(config, data_path=sft_data, out_dir=tmp / "sft", home=HOME)
    em = result.metrics["exact_match_before"]["train"], result.metrics["exact_match_after"]["train"]
    print(f"SFT on the preferred answers: {result.steps} steps in "
          f"{result.runtime_seconds:.0f} s; greedy == preferred {em[0]['rate']:.0%} (base) -> "
          f"{em[1]['rate']:.0%} (SFT adapter)")  # fmt: skip
    return str(tmp / "sft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a TrainConfig field (repeatable)")  # fmt: skip
    parser.add_argument(
        "--sft-first",
        action="store_true",
        help="supervised on the preferred answers first, then DPO from it",
    )
    args = parser.parse_args()

    from trainer.callbacks import Progress
    from trainer.config import parse_config, parse_overrides
    from trainer.recipe import train

    def report(p: Progress) -> None:  # to stderr: the figures alone go to stdout
        if p.step % 10 == 0 or p.step == p.total_steps:
            print(f"step {p.step}/{p.total_steps} loss {p.loss:.3f} reward margin "
                  f"{p.reward_margin:.2f}", file=sys.stderr, flush=True)  # fmt: skip

    n = sum(1 for line in args.data.read_text().splitlines() if line.strip())
    config = parse_config(
        {"objective": "dpo", "probe_size": n, "seed": 0} | parse_overrides(args.overrides)
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.sft_first:
            config = config.model_copy(
                update={"init_adapter": sft_adapter(args.data, Path(tmp), n)}
            )
        result = train(
            config, data_path=args.data, out_dir=Path(tmp) / "dpo", home=HOME, on_progress=report
        )
    m = result.metrics
    hp, dpo = m["hyperparameters"], m["preference"]
    base, adapter = dpo["margin_before"]["train"], dpo["margin_after"]["train"]
    em_base, em_adapter = m["exact_match_before"]["train"], m["exact_match_after"]["train"]
    print(f"{config.base_model}, {m['method']}/{m['quantization']}, {n} prompts: "
          f"{hp['n_epochs']} epochs, batch {hp['batch_size']}, lr {hp['learning_rate']:g}, "
          f"beta {hp['beta']:g}; {m['steps']} steps in {m['runtime_seconds']:.0f} s")  # fmt: skip
    rows = [
        ("margin log p(preferred) - log p(rejected)", base["margin"], adapter["margin"], ".1f"),
        ("prompts where preferred is more likely", base["preferred_share"],
         adapter["preferred_share"], ".0%"),
        ("greedy answer == preferred answer", em_base["rate"], em_adapter["rate"], ".0%"),
        (f"greedy answer starts with {PHRASE!r}", phrase_share(em_base),
         phrase_share(em_adapter), ".0%"),
    ]  # fmt: skip
    print(f"{'':44} {'base':>8} {'adapter':>8}")
    for label, before, after, fmt in rows:
        print(f"{label:44} {before:>8{fmt}} {after:>8{fmt}}")
    first, last = dpo["loss_first_step"], dpo["loss_last_step"]
    print(f"DPO loss first step {first:.3f}, last step {last:.3f}")
    for sample in em_adapter["samples"][:3]:
        print(f"  {sample['prompt']!r} -> {sample['got']!r}")
    print(json.dumps({"base": base, "adapter": adapter}))


if __name__ == "__main__":
    main()

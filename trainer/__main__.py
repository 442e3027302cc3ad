"""`python -m trainer train --data train.jsonl --out DIR [--config cfg.yaml] [--set k=v ...]`.

The one place the trainer reads the environment: LORAPLEX_HOME (default ./.loraplex) is where
built-in base models are converted and cached. Exit codes: 0 done, 2 bad config/data/base
model, 1 training failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.config import load_config
from trainer.errors import BaseModelError, ConfigError, DataError, TrainerError

console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="fine-tune a LoRA adapter on a chat JSONL file")
    run.add_argument("--data", type=Path, required=True, help="training JSONL")
    run.add_argument("--out", type=Path, required=True, help="adapter output directory")
    run.add_argument("--validation", type=Path, help="held-out JSONL (else validation_split)")
    run.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (repeatable)",
    )
    run.add_argument("--resume-from", type=Path, help="checkpoint directory to continue")
    return parser


def run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=args.overrides)  # before the heavy imports
    from trainer.callbacks import Progress as StepProgress
    from trainer.recipe import train

    if config.method == "auto" and config.quantization is None:
        method = "auto (lora; qlora for a base too big for the device in 16-bit)"
    else:
        method = f"{config.method}/{config.resolved_quantization}"
    console.print(f"[bold]{config.base_model}[/] {method} on {args.data}")
    columns = (
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, status="loading model")

        def on_progress(p: StepProgress) -> None:
            status = " ".join(
                f"{label} {value:{fmt}}"
                for label, value, fmt in (
                    ("loss", p.loss, ".4f"),
                    ("acc", p.token_accuracy, ".2f"),
                    ("lr", p.learning_rate, ".2g"),
                    ("tok/s", p.tokens_per_second, ".0f"),
                )
                if value is not None
            )
            bar.update(task, completed=p.step, total=p.total_steps, status=status)

        home = Path(os.environ.get("LORAPLEX_HOME", ".loraplex"))
        result = train(
            config,
            data_path=args.data,
            out_dir=args.out,
            home=home,
            validation_path=args.validation,
            on_progress=on_progress,
            resume_from=args.resume_from,
        )
    hp = result.hyperparameters
    console.print(
        f"adapter written to [bold]{result.out_dir}[/] after {result.steps} steps "
        f"({hp.n_epochs} epochs, batch {hp.batch_size}, lr {hp.learning_rate:g})"
    )
    console.print(
        f"train loss {result.train_loss}, eval loss {result.eval_loss_before} -> "
        f"{result.eval_loss_after}, exact match train {result.exact_match_train} "
        f"validation {result.exact_match_validation}, train on the unquantized base "
        f"(as served) {result.exact_match_train_unquantized}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_train(args)
    except (ConfigError, DataError) as e:
        console.print(f"[red]error:[/] {e}")
        for problem in e.problems:
            console.print(f"  - {problem}")
        return 2
    except BaseModelError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    except TrainerError as e:
        console.print(f"[red]training failed:[/] {e}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

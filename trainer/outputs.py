"""What a finished run writes next to its adapter: metrics.json, train_config.json, loss.png.

out_dir/
  adapter_config.json         peft; base_model_name_or_path = the registered base name
  adapter_model.safetensors   LoRA weights only (no modules_to_save)
  metrics.json                see `METRICS_KEYS` and docs/trainer.md
  train_config.json           the config with "auto" values resolved
  loss.png                    training (and eval) loss per step
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from trainer.callbacks import ProgressCallback
from trainer.config import Hyperparameters, TrainConfig
from trainer.data import RunInputs, TokenCounts
from trainer.modeling import RuntimePlan

VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_loss(path: Path, *, curve: list[dict[str, float]], evals: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label="train loss")
    if evals:
        ax.plot([p["step"] for p in evals], [p["eval_loss"] for p in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_metrics(
    *,
    config: TrainConfig,
    inputs: RunInputs,
    plan: RuntimePlan,
    train_counts: TokenCounts,
    valid_counts: TokenCounts,
    state: Any,
    progress: ProgressCallback,
    before: dict[str, Any],
    after: dict[str, Any],
    served: dict[str, Any] | None,
    stopped_early: bool,
    runtime: float,
) -> dict[str, Any]:
    """Everything metrics.json holds (keys documented in docs/trainer.md; DPO's `preference`
    block in docs/training.md)."""
    done = state.global_step / max(1, state.max_steps)
    trained_tokens = round(train_counts.n_tokens * inputs.hyperparameters.n_epochs * done)
    metrics = {
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": state.epoch,
        "train_loss": progress.curve[-1]["loss"] if progress.curve else None,
        "loss_curve": progress.curve,
        "eval_curve": progress.evals,
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "eval_token_accuracy_before": before["eval_token_accuracy"],
        "eval_token_accuracy_after": after["eval_token_accuracy"],
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "exact_match_unquantized": served,
        "trained_tokens": trained_tokens,
        "train_examples": train_counts.n_examples,
        "validation_examples": valid_counts.n_examples,
        "truncated_examples": train_counts.n_truncated + valid_counts.n_truncated,
        "dropped_examples": train_counts.n_dropped + valid_counts.n_dropped,
        "tokens_per_second": trained_tokens / runtime if runtime else None,
        "runtime_seconds": runtime,
        "stopped_early": stopped_early,
        "device": plan.device,
        "precision": "bf16" if plan.bf16 else "fp32",
        "gradient_checkpointing": plan.gradient_checkpointing,
        "method": plan.method,  # what `auto` resolved to
        "method_requested": config.method,
        "quantization": plan.quantization,
        "hyperparameters": inputs.hyperparameters.model_dump(),
        "data_sha256": inputs.data_sha256,
        "versions": package_versions(),
        "objective": config.objective,
    }
    if config.objective == "dpo":
        metrics["preference"] = preference_metrics(progress, before=before, after=after)
    return metrics


def preference_metrics(
    progress: ProgressCallback, *, before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    """DPO's own numbers: trl's loss and implicit rewards (first and last step, held-out before
    and after), and the measured log-likelihood margin of preferred over rejected answers."""
    curve = progress.curve
    first, last = (curve[0], curve[-1]) if curve else ({}, {})
    return {
        "loss_first_step": first.get("loss"),
        "loss_last_step": last.get("loss"),
        "reward_margin_last_step": last.get("reward_margin"),
        "reward_accuracy_last_step": last.get("reward_accuracy"),
        "eval_reward_margin_before": before.get("eval_reward_margin"),
        "eval_reward_margin_after": after.get("eval_reward_margin"),
        "eval_reward_accuracy_after": after.get("eval_reward_accuracy"),
        # log p(preferred) - log p(rejected), mean over the probed pairs ({train, validation}).
        "margin_before": before.get("preference_margin"),
        "margin_after": after.get("preference_margin"),
    }


def write_outputs(
    out_dir: Path,
    *,
    config: TrainConfig,
    hp: Hyperparameters,
    metrics: dict[str, Any],
    progress: ProgressCallback,
) -> None:
    resolved = config.model_dump(mode="json") | hp.model_dump()
    resolved["method"], resolved["quantization"] = metrics["method"], metrics["quantization"]
    write_json(out_dir / "train_config.json", resolved)
    write_json(out_dir / "metrics.json", metrics)
    plot_loss(out_dir / "loss.png", curve=progress.curve, evals=progress.evals)

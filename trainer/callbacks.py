"""Trainer callbacks: progress reports, checkpoint hand-off, cancellation, early stopping.

The caller (a Celery worker, the CLI) sees only the plain dataclasses `Progress` and
`Checkpoint` and three plain functions; transformers' callback machinery stays in here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

RUN_STATE_FILE = "loraplex_run.json"  # written into each checkpoint: what resume needs


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    token_accuracy: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: float | None
    elapsed_seconds: float
    reward_margin: float | None = None  # DPO only: mean implicit reward margin of the step
    reward_accuracy: float | None = None  # DPO only: share of pairs the rewards rank right


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path  # a transformers checkpoint dir: adapter, optimizer, scheduler, RNG, state
    metrics: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]
CheckpointFn = Callable[[Checkpoint], None]
CancelFn = Callable[[], bool]
# (phase, what is happening), as each phase of a run begins: loading_base_model,
# probing_before, training, probing_after, saving, probing_as_served (see recipe.train).
PhaseFn = Callable[[str, str], None]


class ProgressCallback(TrainerCallback):
    """Turns each training log into a `Progress` and keeps the loss curve for metrics.json."""

    def __init__(self, on_progress: ProgressFn | None) -> None:
        self.on_progress = on_progress
        self.curve: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self._start = time.monotonic()
        self._start_step = 0

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kw: Any) -> None:
        self._start, self._start_step = time.monotonic(), state.global_step

    def on_log(self, args: Any, state: TrainerState, control: Any, **kw: Any) -> None:
        logs: dict[str, float] = kw.get("logs") or {}
        if "eval_loss" in logs:
            self.evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"]})
        if "loss" not in logs:
            return
        point = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate", math.nan),
            "token_accuracy": logs.get("mean_token_accuracy", math.nan),
        }
        if "rewards/margins" in logs:  # DPO: implicit reward of preferred minus rejected
            point["reward_margin"] = logs["rewards/margins"]
            point["reward_accuracy"] = logs.get("rewards/accuracies", math.nan)
        self.curve.append(point)
        if self.on_progress is not None:
            self.on_progress(self._progress(state, logs))

    def _progress(self, state: TrainerState, logs: dict[str, float]) -> Progress:
        elapsed = time.monotonic() - self._start
        done = state.global_step - self._start_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        # trl counts input tokens (no padding) from this trainer's start, resumed or not.
        tokens = logs.get("num_tokens")
        rate = tokens / elapsed if tokens and elapsed > 0 else None
        return Progress(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=float(state.epoch or 0.0),
            loss=logs.get("loss"),
            token_accuracy=logs.get("mean_token_accuracy"),
            learning_rate=logs.get("learning_rate"),
            tokens_per_second=rate,
            eta_seconds=eta,
            elapsed_seconds=elapsed,
            reward_margin=logs.get("rewards/margins"),
            reward_accuracy=logs.get("rewards/accuracies"),
        )


class CheckpointCallback(TrainerCallback):
    """After transformers writes a checkpoint, adds the run state and hands it to the caller."""

    def __init__(self, on_checkpoint: CheckpointFn | None, run_state: dict[str, Any]) -> None:
        self.on_checkpoint = on_checkpoint
        self.run_state = run_state

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kw: Any
    ) -> None:
        path = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        (path / RUN_STATE_FILE).write_text(json.dumps(self.run_state, indent=2))
        last = next((log for log in reversed(state.log_history) if "loss" in log), {})
        metrics = {"train_loss": last["loss"]} if "loss" in last else {}
        if self.on_checkpoint is not None:
            self.on_checkpoint(Checkpoint(step=state.global_step, path=path, metrics=metrics))


class CancelCallback(TrainerCallback):
    """Asks `should_cancel` after every optimizer step and stops the loop on the first yes;
    asks `should_pause` too, which stops it after saving a checkpoint of that step."""

    def __init__(self, should_cancel: CancelFn | None, should_pause: CancelFn | None = None):
        self.should_cancel = should_cancel
        self.should_pause = should_pause
        self.cancelled_at: int | None = None
        self.paused_at: int | None = None

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.should_cancel is not None and self.should_cancel():
            self.cancelled_at = state.global_step
            control.should_training_stop = True
            control.should_save = False  # a cancelled run is not worth a checkpoint
        elif (
            self.should_pause is not None
            and state.global_step < state.max_steps  # the last step: finish instead
            and self.should_pause()
        ):
            self.paused_at = state.global_step
            control.should_training_stop = True
            control.should_save = True  # saved (and on_save called) before the loop stops


class EarlyStopping(TrainerCallback):
    """Stops after `patience` evaluations without a lower eval loss (keeps the last weights).

    transformers' own EarlyStoppingCallback needs load_best_model_at_end, which forces a
    checkpoint at every eval; this one does not.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.bad_evals = 0
        self.stopped = False

    def on_evaluate(
        self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        loss = (kw.get("metrics") or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero or state.global_step == 0:
            return
        if loss < self.best:
            self.best, self.bad_evals = loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stopped = True
            control.should_training_stop = True

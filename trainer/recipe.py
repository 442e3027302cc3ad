"""`train()`: one LoRA/QLoRA fine-tune, from config + JSONL to an adapter directory.

Everything that can be wrong with the inputs (config, data, resume checkpoint) is checked
before a model is loaded. Then: base model -> tokenizer -> token ids + labels (or preference
pairs) -> quantized model + LoRA -> trl SFTTrainer or DPOTrainer (trainer/objectives.py) ->
eval/probe before -> train -> eval/probe after -> outputs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.base_models import needs_conversion, resolve_base_model
from trainer.callbacks import (
    RUN_STATE_FILE,
    CancelCallback,
    CancelFn,
    CheckpointCallback,
    CheckpointFn,
    EarlyStopping,
    PhaseFn,
    ProgressCallback,
    ProgressFn,
)
from trainer.config import Hyperparameters, TrainConfig
from trainer.data import (
    RunInputs,
    TokenCounts,
    TokenizedData,
    TokenizedPairs,
    packed_row_length,
    prepare_inputs,
    tokenize_examples,
    tokenize_pairs,
)
from trainer.errors import CheckpointError, TrainingCancelled, TrainingFailed, TrainingPaused
from trainer.evaluate import measure, probe_as_served
from trainer.modeling import (
    RuntimePlan,
    add_lora,
    choose_plan,
    load_base_model,
    load_tokenizer,
    name_base,
)
from trainer.objectives import TRAINED_ADAPTER, dpo_trainer, sft_trainer
from trainer.outputs import build_metrics, write_outputs

# pytest turns this into an error too; here it guards production runs (ML-NOTES.md).
WRONG_GRADIENT_WARNING = ".*autograd kernel was not registered.*"


@dataclass(frozen=True)
class TrainResult:
    """The headline numbers of a finished run; `metrics` is the whole metrics.json."""

    out_dir: Path
    hyperparameters: Hyperparameters
    steps: int
    trained_tokens: int
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    exact_match_train: float | None
    exact_match_validation: float | None
    exact_match_train_unquantized: float | None  # as served: the adapter on the full base
    stopped_early: bool
    runtime_seconds: float
    metrics: dict[str, Any]


def train(
    config: TrainConfig,
    *,
    data_path: Path,
    out_dir: Path,
    home: Path,
    validation_path: Path | None = None,
    on_progress: ProgressFn | None = None,
    on_phase: PhaseFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    should_cancel: CancelFn | None = None,
    should_pause: CancelFn | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Fine-tune `config.base_model` on `data_path`; write the adapter and metrics to `out_dir`.

    `on_progress` gets a `Progress` after every step; `on_phase(name, message)` hears each
    phase begin (loading_base_model or converting_base_model, probing_before, training,
    probing_after, saving, probing_as_served), so the minutes outside the training steps are
    not silent; `on_checkpoint` gets each `Checkpoint`
    (every `config.checkpoint_interval` steps) and should copy it away before returning;
    `should_cancel` is asked after every step (True -> `TrainingCancelled`); so is
    `should_pause` (True -> a checkpoint of that step, then `TrainingPaused`). `resume_from`
    is a checkpoint directory from the same config and data: the run continues at its step.
    Bad input and the known failure modes raise `TrainerError` subclasses (trainer/errors.py).
    """
    started = time.monotonic()
    phase = on_phase or _no_phase
    inputs = prepare_inputs(config, data_path=data_path, validation_path=validation_path)
    run_state: dict[str, Any] = {
        # init_adapter is a local path (another host resumes from elsewhere): not compared.
        "config": config.model_dump(mode="json", exclude={"init_adapter"}),
        "hyperparameters": inputs.hyperparameters.model_dump(exclude_none=True),
        "data_sha256": inputs.data_sha256,
    }
    resumed = read_run_state(resume_from, expected=run_state) if resume_from else None

    if needs_conversion(config.base_model, home=home):
        phase(
            "converting_base_model",
            f"Converting base model {config.base_model} for training "
            "(first use only; it takes a few minutes)",
        )
    base_dir = resolve_base_model(config.base_model, home=home)
    tokenizer = load_tokenizer(base_dir)
    train_data, valid_data = tokenize_inputs(tokenizer, inputs, config)
    plan = choose_plan(config, base_dir)
    phase(
        "loading_base_model",
        f"Loading base model {config.base_model} ({_precision(plan)} on {plan.device})",
    )
    model = add_lora(load_base_model(base_dir, plan=plan), config)

    out_dir.mkdir(parents=True, exist_ok=True)
    progress = ProgressCallback(on_progress)
    cancel = CancelCallback(should_cancel, should_pause)
    stopper = EarlyStopping(config.early_stopping_patience or 0)
    callbacks: list[Any] = [progress, cancel, CheckpointCallback(on_checkpoint, run_state)]
    if config.early_stopping_patience:
        callbacks.append(stopper)
    hp = inputs.hyperparameters
    common = {"tokenizer": tokenizer, "out_dir": out_dir, "callbacks": callbacks}
    if isinstance(train_data, TokenizedPairs) and isinstance(valid_data, TokenizedPairs):
        trainer: Any = dpo_trainer(
            model, config, plan, inputs=inputs, train_pairs=train_data.pairs,
            valid_pairs=valid_data.pairs, **common,
        )  # fmt: skip
    else:
        assert isinstance(train_data, TokenizedData) and isinstance(valid_data, TokenizedData)
        packed_length = packed_row_length(
            [train_data, valid_data], batch_size=hp.batch_size, max_length=config.max_seq_length
        )
        trainer = sft_trainer(
            model, config, plan, hp=hp, train_data=train_data, valid_data=valid_data,
            packed_length=packed_length, **common,
        )  # fmt: skip
    peft_model: Any = trainer.model  # trl keeps our PeftModel, typed loosely upstream
    keep_lora_fp32(peft_model)
    measured = {"probe_size": config.probe_size, "max_length": config.max_seq_length}

    if resumed:
        before = resumed["before"]
    else:
        phase("probing_before", _measuring("the base model before training", config, inputs))
        before = measure(trainer, tokenizer, inputs, **measured)
    run_state["before"] = before
    beta = f", DPO beta {hp.beta:g}" if hp.beta is not None else ""
    phase(
        "training",
        f"Training: {hp.n_epochs} epochs, batch size {hp.batch_size}, "
        f"learning rate {hp.learning_rate:g}{beta}",
    )
    with fail_on_wrong_gradients():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if cancel.cancelled_at is not None:
        raise TrainingCancelled(cancel.cancelled_at)
    if cancel.paused_at is not None:
        raise TrainingPaused(cancel.paused_at)
    phase("probing_after", _measuring("the adapter after training", config, inputs))
    after = measure(trainer, tokenizer, inputs, **measured)

    phase("saving", "Saving the adapter")
    name_base(peft_model, config.base_model)
    # The base is named, not a path: skip peft's embedding check (LoRA never touches them).
    # Only the trained adapter: DPO's frozen reference copy is no part of the result.
    peft_model.save_pretrained(
        out_dir, save_embedding_layers=False, selected_adapters=[TRAINED_ADAPTER]
    )
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    state = trainer.state
    del trainer, model, peft_model  # free the quantized model before loading another
    served = None
    if plan.quantization != "none" and config.probe_size and config.probe_unquantized:
        phase(
            "probing_as_served",
            f"Probing the adapter as served: on the unquantized base, not the {plan.quantization} "
            "one it trained on",
        )
        served = probe_as_served(
            base_dir,
            out_dir,
            plan=plan,
            tokenizer=tokenizer,
            inputs=inputs,
            probe_size=config.probe_size,
        )
    metrics = build_metrics(
        config=config,
        inputs=inputs,
        plan=plan,
        train_counts=train_data,
        valid_counts=valid_data,
        state=state,
        progress=progress,
        before=before,
        after=after,
        served=served,
        stopped_early=stopper.stopped,
        runtime=time.monotonic() - started,
    )
    write_outputs(
        out_dir, config=config, hp=inputs.hyperparameters, metrics=metrics, progress=progress
    )
    return result_from(out_dir, inputs.hyperparameters, metrics)


def _no_phase(name: str, message: str) -> None:
    pass


def _precision(plan: RuntimePlan) -> str:
    return "unquantized" if plan.quantization == "none" else f"{plan.quantization}-quantized"


def _measuring(what: str, config: TrainConfig, inputs: RunInputs) -> str:
    """What `measure` is about to do, in words."""
    parts = ["eval loss"] if inputs.valid else []
    if config.probe_size:
        n = min(config.probe_size, len(inputs.train))
        parts.append(f"exact-match probe on {n} training prompts")
        if inputs.pairs_train:
            parts.append("preferred-vs-rejected margin")
    return f"Measuring {what}: {' and '.join(parts) or 'nothing to measure'}"


def tokenize_inputs(
    tokenizer: Any, inputs: RunInputs, config: TrainConfig
) -> tuple[TokenCounts, TokenCounts]:
    """Training and validation data as the objective trains on it: token ids + labels (sft)
    or the preference pairs that keep answer tokens within max_seq_length (dpo)."""
    kw: dict[str, Any] = {"max_length": config.max_seq_length}
    if config.objective == "dpo":
        return (
            tokenize_pairs(tokenizer, inputs.pairs_train, what="training data", **kw),
            tokenize_pairs(tokenizer, inputs.pairs_valid, what="validation data", **kw),
        )
    return (
        tokenize_examples(tokenizer, inputs.train, what="training data", **kw),
        tokenize_examples(tokenizer, inputs.valid, what="validation data", **kw),
    )


def keep_lora_fp32(model: torch.nn.Module) -> None:
    """trl casts LoRA weights of quantized models to bf16; AdamW then drops small updates.

    Keeping the (few MB of) trainable weights in fp32 while autocast computes in bf16 is the
    usual mixed-precision recipe, and the adapter file stays fp32 like plain LoRA's.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


@contextlib.contextmanager
def fail_on_wrong_gradients() -> Iterator[None]:
    """Turn bitsandbytes' "no autograd kernel" warning into `TrainingFailed`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=WRONG_GRADIENT_WARNING)
        try:
            yield
        except UserWarning as e:  # only the warning filtered above is raised as an error
            raise TrainingFailed(f"training backpropagated through a 4-bit op: {e}") from e


def read_run_state(resume_from: Path, *, expected: dict[str, Any]) -> dict[str, Any]:
    """The run state saved in a checkpoint; it must match this run's config and data."""
    path = Path(resume_from)
    state_file = path / RUN_STATE_FILE
    if not (path / "trainer_state.json").is_file() or not state_file.is_file():
        raise CheckpointError(f"{path}: not a Loraplex training checkpoint")
    state: dict[str, Any] = json.loads(state_file.read_text())
    for key, value in expected.items():
        if state.get(key) != value:
            raise CheckpointError(f"{path}: checkpoint has a different {key} than this run")
    return state


def result_from(out_dir: Path, hp: Hyperparameters, metrics: dict[str, Any]) -> TrainResult:
    def rate(side: str, key: str = "exact_match_after") -> float | None:
        probe = (metrics[key] or {}).get(side)
        return probe["rate"] if probe and probe["n"] else None

    return TrainResult(
        out_dir=out_dir,
        hyperparameters=hp,
        steps=metrics["steps"],
        trained_tokens=metrics["trained_tokens"],
        train_loss=metrics["train_loss"],
        eval_loss_before=metrics["eval_loss_before"],
        eval_loss_after=metrics["eval_loss_after"],
        exact_match_train=rate("train"),
        exact_match_validation=rate("validation"),
        exact_match_train_unquantized=rate("train", "exact_match_unquantized"),
        stopped_early=metrics["stopped_early"],
        runtime_seconds=metrics["runtime_seconds"],
        metrics=metrics,
    )

"""`train()`: one supervised LoRA/QLoRA fine-tune, from config + JSONL to an adapter directory.

Everything that can be wrong with the inputs (config, data, resume checkpoint) is checked
before a model is loaded. Then: base model -> tokenizer -> token ids + labels -> quantized
model + LoRA -> trl SFTTrainer -> eval/probe before -> train -> eval/probe after -> outputs.
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
from datasets import Dataset
from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer

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
from trainer.data import RunInputs, packed_row_length, prepare_inputs, tokenize_examples
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
        "hyperparameters": inputs.hyperparameters.model_dump(),
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
    train_data = tokenize_examples(
        tokenizer, inputs.train, max_length=config.max_seq_length, what="training data"
    )
    valid_data = tokenize_examples(
        tokenizer, inputs.valid, max_length=config.max_seq_length, what="validation data"
    )
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
    packed_length = packed_row_length(
        [train_data, valid_data],
        batch_size=inputs.hyperparameters.batch_size,
        max_length=config.max_seq_length,
    )
    callbacks: list[Any] = [progress, cancel, CheckpointCallback(on_checkpoint, run_state)]
    if config.early_stopping_patience:
        callbacks.append(stopper)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(
            config,
            inputs.hyperparameters,
            plan,
            out_dir=out_dir,
            has_eval=bool(valid_data.rows),
            packed_length=packed_length,
        ),
        train_dataset=Dataset.from_dict(train_data.as_columns()),
        eval_dataset=Dataset.from_dict(valid_data.as_columns()) if valid_data.rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # a library prints nothing; on_progress reports
    peft_model: Any = trainer.model  # trl keeps our PeftModel, typed loosely upstream
    keep_lora_fp32(peft_model)

    if resumed:
        before = resumed["before"]
    else:
        phase("probing_before", _measuring("the base model before training", config, inputs))
        before = measure(trainer, tokenizer, inputs, probe_size=config.probe_size)
    run_state["before"] = before
    hp = inputs.hyperparameters
    phase(
        "training",
        f"Training: {hp.n_epochs} epochs, batch size {hp.batch_size}, "
        f"learning rate {hp.learning_rate:g}",
    )
    with fail_on_wrong_gradients():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if cancel.cancelled_at is not None:
        raise TrainingCancelled(cancel.cancelled_at)
    if cancel.paused_at is not None:
        raise TrainingPaused(cancel.paused_at)
    phase("probing_after", _measuring("the adapter after training", config, inputs))
    after = measure(trainer, tokenizer, inputs, probe_size=config.probe_size)

    phase("saving", "Saving the adapter")
    name_base(peft_model, config.base_model)
    # The base is named, not a path: skip peft's embedding check (LoRA never touches them).
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
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
        train_data=train_data,
        valid_data=valid_data,
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
    return f"Measuring {what}: {' and '.join(parts) or 'nothing to measure'}"


def sft_config(
    config: TrainConfig,
    hp: Hyperparameters,
    plan: RuntimePlan,
    *,
    out_dir: Path,
    has_eval: bool,
    packed_length: int,
) -> SFTConfig:
    """trl settings; precision and gradient checkpointing always chosen explicitly.

    With packing, a step is one row of `packed_length` tokens holding ~batch_size examples.
    """
    evaluating = has_eval and config.eval_interval is not None
    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=hp.n_epochs,
        per_device_train_batch_size=1 if config.packing else hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of all steps
        weight_decay=config.weight_decay,
        bf16=plan.bf16,  # trl defaults to True: never leave it implicit
        fp16=False,
        gradient_checkpointing=plan.gradient_checkpointing,  # trl defaults to True
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=plan.device == "cpu",
        seed=config.seed,
        data_seed=config.seed,
        # Examples are already cut to max_seq_length; trl cuts eval rows to this too.
        max_length=packed_length if config.packing else config.max_seq_length,
        packing=config.packing,
        packing_strategy="bfd",  # padding-free: packed examples never attend to each other
        eval_packing=False,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if config.checkpoint_interval else "no",
        save_steps=config.checkpoint_interval or 500,
        save_total_limit=1,  # on_checkpoint copies each one away; keep the disk bounded
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_interval if evaluating else None,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
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

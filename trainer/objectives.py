"""The trl trainer for each objective, on our PeftModel: SFTTrainer (sft) or DPOTrainer (dpo).

Both get one set of shared settings (`shared_args`); precision and gradient checkpointing are
always chosen explicitly (trl defaults both to True).

DPO's reference policy is the adapter as training starts: trl copies it into a frozen second
adapter named "ref" (a few MB, no second copy of the base). For a fresh adapter (B = 0) that
is the base model; for a continued one it is the parent, as in SFT-then-DPO, so the KL term
keeps the adapter near what it was trained to, not near the bare base. "ref" is never part of
a result: the final save keeps "default" only, and checkpoints drop it, because transformers'
resume loads only the adapter sub-folders when there are any (and would miss the trained one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from trainer.attention import CPU_ATTENTION
from trainer.config import Hyperparameters, TrainConfig
from trainer.data import RunInputs, TokenizedData, as_chat
from trainer.formats import PreferenceExample
from trainer.lm_head import DPO_OUTPUTS, use_compact_cpu_head
from trainer.modeling import RuntimePlan
from trainer.packing import SHARED_TOKENS, SharedPrefixCollator, shared_prefix_rows

REFERENCE_ADAPTER = "ref"  # the name trl gives the frozen copy of the starting adapter
TRAINED_ADAPTER = "default"
# "off" keeps trl's padding-free packing on CPU too (each example runs its own prompt prefix)
SHARING_SWITCH = "LORAPLEX_PACKING_SHARED_PREFIX"


def shared_args(
    config: TrainConfig, hp: Hyperparameters, plan: RuntimePlan, *, out_dir: Path, has_eval: bool
) -> dict[str, Any]:
    """Settings both objectives share: schedule, precision, logging, checkpoints, evals."""
    evaluating = has_eval and config.eval_interval is not None
    return {
        "output_dir": str(out_dir / "checkpoints"),
        "num_train_epochs": hp.n_epochs,
        "per_device_eval_batch_size": hp.batch_size,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio,  # a float < 1 is a fraction of all steps
        "weight_decay": config.weight_decay,
        "bf16": plan.bf16,  # trl defaults to True: never leave it implicit
        "fp16": False,
        "gradient_checkpointing": plan.gradient_checkpointing,  # trl defaults to True
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "use_cpu": plan.device == "cpu",
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps" if config.checkpoint_interval else "no",
        "save_steps": config.checkpoint_interval or 500,
        "save_total_limit": 1,  # on_checkpoint copies each one away; keep the disk bounded
        "eval_strategy": "steps" if evaluating else "no",
        "eval_steps": config.eval_interval if evaluating else None,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def sft_trainer(
    model: Any,
    config: TrainConfig,
    plan: RuntimePlan,
    *,
    tokenizer: Any,
    hp: Hyperparameters,
    train_data: TokenizedData,
    valid_data: TokenizedData,
    packed_length: int,
    out_dir: Path,
    callbacks: list[TrainerCallback],
) -> SFTTrainer:
    """With packing, a step is one row of `packed_length` tokens holding ~batch_size examples;
    where the CPU training attention runs, the row's shared prompt prefix runs once
    (trainer/packing.py)."""
    sharing = config.packing and _cpu_attention(model) and os.environ.get(SHARING_SWITCH) != "off"
    args = SFTConfig(
        **shared_args(config, hp, plan, out_dir=out_dir, has_eval=bool(valid_data.rows)),
        per_device_train_batch_size=1 if config.packing else hp.batch_size,
        # Examples are already cut to max_seq_length; trl cuts eval rows to this too.
        max_length=packed_length if config.packing else config.max_seq_length,
        packing=config.packing and not sharing,  # shared-prefix rows come packed
        packing_strategy="bfd",  # padding-free: packed examples never attend to each other
        eval_packing=False,
        # Shared-prefix rows carry their own columns; the eval rows are ready as they are
        # (examples cut to max_seq_length, each with a label).
        remove_unused_columns=not sharing,
        dataset_kwargs={"skip_prepare_dataset": True} if sharing else None,
    )
    if sharing:
        train_dataset = shared_prefix_rows(train_data, row_length=packed_length, seed=config.seed)
        collator: Any = SharedPrefixCollator(pad_token_id=tokenizer.pad_token_id)
    else:
        train_dataset, collator = Dataset.from_dict(train_data.as_columns()), None
    trainer = _SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=Dataset.from_dict(valid_data.as_columns()) if valid_data.rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # a library prints nothing; on_progress reports
    if plan.device == "cpu":
        use_compact_cpu_head(trainer.model)  # trl's head scores every position on CPU
    return trainer


def _cpu_attention(model: Any) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == CPU_ATTENTION


class _SFTTrainer(SFTTrainer):
    """trl's SFTTrainer, counting a shared-prefix row's tokens as the examples it holds: the
    tokens/s reported stays comparable with unpacked training (trl counts a padding-free
    row's length)."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
        stood_for = inputs.pop(SHARED_TOKENS, 0)
        if stood_for and model.training:
            self._total_train_tokens += int(stood_for)
        return super().compute_loss(model, inputs, *args, **kw)


def preference_dataset(pairs: list[PreferenceExample]) -> Dataset:
    """trl's conversational preference columns; trl renders them with the chat template."""
    return Dataset.from_dict(
        {
            "prompt": [as_chat(p.prompt) for p in pairs],
            "chosen": [[{"role": "assistant", "content": p.preferred}] for p in pairs],
            "rejected": [[{"role": "assistant", "content": p.rejected}] for p in pairs],
        }
    )


class DropReferenceAdapter(TrainerCallback):
    """Removes the frozen reference adapter from each checkpoint before it is handed on."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        path = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        shutil.rmtree(path / REFERENCE_ADAPTER, ignore_errors=True)


def dpo_trainer(
    model: Any,
    config: TrainConfig,
    plan: RuntimePlan,
    *,
    tokenizer: Any,
    inputs: RunInputs,
    train_pairs: list[PreferenceExample],
    valid_pairs: list[PreferenceExample],
    out_dir: Path,
    callbacks: list[TrainerCallback],
) -> DPOTrainer:
    """DPO (sigmoid loss, `hp.beta`) against the starting adapter; see the module docstring."""
    hp = inputs.hyperparameters
    assert hp.beta is not None  # resolved for every dpo config
    args = DPOConfig(
        **shared_args(config, hp, plan, out_dir=out_dir, has_eval=bool(valid_pairs)),
        per_device_train_batch_size=hp.batch_size,  # pairs per step (2x sequences)
        beta=hp.beta,
        loss_type=["sigmoid"],  # the DPO paper's loss
        max_length=config.max_seq_length,  # pairs whose prompt fills it were dropped before
        truncation_mode="keep_start",
        disable_dropout=True,  # dropout makes policy and reference log-probs disagree at random
        precompute_ref_log_probs=False,  # the reference is an adapter away: nothing to save
    )
    datasets.disable_progress_bars()  # trl maps the pairs through datasets: no bars in logs
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=preference_dataset(train_pairs),
        eval_dataset=preference_dataset(valid_pairs) if valid_pairs else None,
        processing_class=tokenizer,
        # First: the checkpoint loses "ref" before CheckpointCallback hands it away.
        callbacks=[DropReferenceAdapter(), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    if plan.device == "cpu" and not args.use_weighting:
        use_compact_cpu_head(trainer.model, outputs=DPO_OUTPUTS)  # as in sft_trainer
    return trainer

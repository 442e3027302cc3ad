"""Training on a tiny Llama: every quantization trains, packing, resume, cancel, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from trainer.callbacks import Checkpoint, Progress
from trainer.config import TrainConfig
from trainer.errors import CheckpointError, ConfigError, TrainingCancelled
from trainer.modeling import choose_plan, load_base_model
from trainer.recipe import train

from .trainer_testdata import TINY_FACTS, chat_row, write_jsonl


def tiny_config(base: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "base_model": str(base),
        "n_epochs": 4,
        "batch_size": 4,
        "learning_rate_multiplier": 10.0,  # lr 2e-3: a random tiny model needs a push
        "lora_r": 8,
        "probe_size": 2,
        "precision": "fp32",
    }
    return TrainConfig.model_validate(settings | overrides)


@pytest.mark.parametrize(
    ("method", "quantization"), [("qlora", "nf4"), ("qlora", "int8"), ("lora", "none")]
)
def test_each_quantization_trains_with_falling_loss(
    tiny_base: Path, tiny_data: Path, tmp_path: Path, method: str, quantization: str
) -> None:
    config = tiny_config(tiny_base, method=method, quantization=quantization, validation_split=0.25)
    result = train(config, data_path=tiny_data, out_dir=tmp_path / "out", home=tmp_path)
    losses = [point["loss"] for point in result.metrics["loss_curve"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < result.eval_loss_before
    assert result.metrics["quantization"] == quantization
    assert result.steps == 4 * 3  # 9 training examples in batches of 4, 4 epochs


def test_output_directory_is_a_servable_adapter(
    tiny_base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = train(
        tiny_config(tiny_base, n_epochs=1), data_path=tiny_data, out_dir=out, home=tmp_path
    )
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_base)  # the name given, not a cache path
    assert not adapter.get("modules_to_save")
    assert adapter["r"] == 8
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["versions"]["torch"] == torch.__version__
    assert metrics["trained_tokens"] == result.trained_tokens > 0
    resolved = json.loads((out / "train_config.json").read_text())
    # method auto: a small base on this machine trains on the full-precision weights.
    assert (resolved["n_epochs"], resolved["method"]) == (1, "lora")
    assert resolved["quantization"] == "none"
    assert (metrics["method"], metrics["method_requested"]) == ("lora", "auto")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoints").exists()


def test_packing_keeps_the_training_schedule(tiny_base: Path, tmp_path: Path) -> None:
    rows = [chat_row(q, a * (1 + i % 5)) for i, (q, a) in enumerate(TINY_FACTS * 2)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    seen: dict[bool, list[Progress]] = {True: [], False: []}
    results = {
        packing: train(
            tiny_config(tiny_base, packing=packing, n_epochs=3),
            data_path=data,
            out_dir=tmp_path / str(packing),
            home=tmp_path,
            on_progress=seen[packing].append,
        )
        for packing in (False, True)
    }
    # ~batch_size examples per step either way: the same schedule, row for step.
    unpacked, packed = results[False].metrics, results[True].metrics
    assert packed["total_steps"] == unpacked["total_steps"]
    assert packed["trained_tokens"] == unpacked["trained_tokens"]
    losses = [point["loss"] for point in packed["loss_curve"]]
    assert losses[-1] < losses[0]


def test_packed_examples_do_not_attend_to_each_other(tiny_base: Path) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    config = tiny_config(tiny_base, method="lora")
    # As the trainer loads it: use_cache off, which transformers needs to see packed rows.
    model = load_base_model(tiny_base, plan=choose_plan(config)).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": a}, {"input_ids": b}]
    )
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        alone = model(input_ids=torch.tensor([b])).logits
    torch.testing.assert_close(together[0, len(a) :], alone[0], rtol=1e-4, atol=1e-4)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(
    tiny_base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_base, checkpoint_interval=3, lora_dropout=0.1)
    saved: list[Checkpoint] = []

    def keep(checkpoint: Checkpoint) -> None:  # what a worker does: copy it away
        copy = tmp_path / "kept" / f"step-{checkpoint.step}"
        shutil.copytree(checkpoint.path, copy)
        saved.append(Checkpoint(step=checkpoint.step, path=copy, metrics=checkpoint.metrics))

    full = train(
        config, data_path=tiny_data, out_dir=tmp_path / "a", home=tmp_path, on_checkpoint=keep
    )
    assert [c.step for c in saved] == list(range(3, full.steps + 1, 3))
    middle = saved[1]  # step 6 of 12
    resumed = train(
        config, data_path=tiny_data, out_dir=tmp_path / "b", home=tmp_path, resume_from=middle.path
    )
    assert resumed.steps == full.steps
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-4)
    first = load_file(tmp_path / "a" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter_model.safetensors")
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_checkpoint_of_another_run(
    tiny_base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    saved: list[Path] = []

    def keep(checkpoint: Checkpoint) -> None:
        saved.append(Path(shutil.copytree(checkpoint.path, tmp_path / f"k{checkpoint.step}")))

    config = tiny_config(tiny_base, checkpoint_interval=6, n_epochs=2)
    train(config, data_path=tiny_data, out_dir=tmp_path / "a", home=tmp_path, on_checkpoint=keep)
    other = tiny_config(tiny_base, checkpoint_interval=6, n_epochs=3)
    with pytest.raises(CheckpointError, match="different config"):
        train(
            other, data_path=tiny_data, out_dir=tmp_path / "b", home=tmp_path, resume_from=saved[0]
        )
    with pytest.raises(CheckpointError, match="not a Loraplex training checkpoint"):
        train(
            config, data_path=tiny_data, out_dir=tmp_path / "c", home=tmp_path, resume_from=tmp_path
        )


def test_cancel_stops_within_one_step(tiny_base: Path, tiny_data: Path, tmp_path: Path) -> None:
    seen: list[Progress] = []
    requested_at: list[int] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        if progress.step == 2:
            requested_at.append(progress.step)

    with pytest.raises(TrainingCancelled) as info:
        train(
            tiny_config(tiny_base),
            data_path=tiny_data,
            out_dir=tmp_path / "out",
            home=tmp_path,
            on_progress=on_progress,
            should_cancel=lambda: bool(requested_at),
        )
    assert info.value.step <= requested_at[0] + 1
    assert seen[-1].step <= requested_at[0] + 1 < seen[-1].total_steps
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_progress_reports_what_a_progress_bar_needs(
    tiny_base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    train(
        tiny_config(tiny_base, n_epochs=1),
        data_path=tiny_data,
        out_dir=tmp_path / "o",
        home=tmp_path,
        on_progress=seen.append,
    )
    assert [p.step for p in seen] == [1, 2, 3]
    last = seen[-1]
    assert (last.total_steps, last.eta_seconds) == (3, 0.0)
    assert last.loss is not None and last.token_accuracy is not None
    assert last.learning_rate is not None and last.tokens_per_second and last.tokens_per_second > 0


def test_early_stopping_ends_a_run_whose_eval_loss_rises(tiny_base: Path, tmp_path: Path) -> None:
    # Validation answers contradict the training answers: learning makes eval loss worse.
    train_rows = [chat_row(q, a) for q, a in TINY_FACTS]
    wrong = [chat_row(q, "Purple.") for q, _ in TINY_FACTS[:4]]
    data = write_jsonl(tmp_path / "t.jsonl", train_rows)
    valid = write_jsonl(tmp_path / "v.jsonl", wrong)
    config = tiny_config(tiny_base, n_epochs=10, eval_interval=1, early_stopping_patience=2)
    result = train(
        config, data_path=data, validation_path=valid, out_dir=tmp_path / "o", home=tmp_path
    )
    assert result.stopped_early
    assert result.steps < result.metrics["total_steps"]


def test_target_modules_the_base_lacks_fail_before_training(
    tiny_base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Plain names only, checked against the base's real linear modules (issue 13)."""
    config = tiny_config(tiny_base, target_modules=["q_proj", "attn_proj", "embed_tokens"])
    steps: list[int] = []
    with pytest.raises(ConfigError) as info:
        train(
            config,
            data_path=tiny_data,
            out_dir=tmp_path / "out",
            home=tmp_path,
            on_progress=lambda p: steps.append(p.step),
        )
    assert info.value.problems[:2] == [
        "target_modules: the base model has no linear module 'attn_proj'",
        "target_modules: the base model has no linear module 'embed_tokens'",
    ]
    assert "q_proj" in info.value.problems[2] and steps == []

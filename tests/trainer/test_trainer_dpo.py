"""DPO on the tiny Llama: the preferred-vs-rejected margin rises, outputs hold only the trained
adapter, a paused run resumes to the same weights, and a DPO run can start from an SFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from trainer.callbacks import Checkpoint
from trainer.config import TrainConfig
from trainer.errors import TrainingPaused
from trainer.recipe import train

from .test_preference_data import pref_row
from .test_trainer_train_tiny import tiny_config
from .trainer_testdata import TINY_FACTS, write_jsonl

ANSWERS = [a for _, a in TINY_FACTS]


@pytest.fixture()
def pairs(tmp_path: Path) -> Path:
    """Each fact's answer preferred over the next fact's."""
    rows = [pref_row(q, a, ANSWERS[(i + 1) % len(ANSWERS)]) for i, (q, a) in enumerate(TINY_FACTS)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def dpo_config(base: Path, **overrides: Any) -> TrainConfig:
    """The tiny SFT tests' settings (batch 4, lr 2e-3, r 8), 10 epochs, every pair probed."""
    return tiny_config(base, **({"objective": "dpo", "n_epochs": 10, "probe_size": 12} | overrides))


def margin(metrics: dict[str, Any], when: str) -> dict[str, Any]:
    measured: dict[str, Any] = metrics["preference"][f"margin_{when}"]["train"]
    return measured


@pytest.mark.parametrize(("method", "quantization"), [("lora", "none"), ("qlora", "nf4")])
def test_dpo_raises_the_preferred_answers_margin(
    tiny_base: Path, pairs: Path, tmp_path: Path, method: str, quantization: str
) -> None:
    out = tmp_path / "out"
    config = dpo_config(tiny_base, method=method, quantization=quantization, dpo_beta=0.2)
    result = train(config, data_path=pairs, out_dir=out, home=tmp_path)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "dpo" and metrics["hyperparameters"]["beta"] == 0.2
    before, after = margin(metrics, "before"), margin(metrics, "after")
    assert before["n"] == after["n"] == len(TINY_FACTS)
    assert abs(before["margin"]) < 0.5  # the random base prefers neither answer
    assert after["margin"] > before["margin"] + 0.5, (before, after)
    assert after["preferred_share"] > before["preferred_share"]
    dpo = metrics["preference"]
    assert dpo["loss_first_step"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert dpo["loss_last_step"] < dpo["loss_first_step"]
    assert dpo["reward_margin_last_step"] > 0
    assert result.exact_match_train is not None  # the probe asks for the preferred answers
    assert metrics["exact_match_after"]["train"]["samples"][0]["expected"] == ANSWERS[0]
    # Only the trained adapter is written: trl's frozen reference copy stays behind.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and not any(".ref." in name for name in weights)


def test_a_paused_dpo_run_resumes_to_the_same_adapter(
    tiny_base: Path, pairs: Path, tmp_path: Path
) -> None:
    config = dpo_config(tiny_base, n_epochs=3, probe_size=1, checkpoint_interval=100)
    train(config, data_path=pairs, out_dir=tmp_path / "whole", home=tmp_path)
    saved: list[Path] = []

    def keep(ckpt: Checkpoint) -> None:
        saved.append(Path(shutil.copytree(ckpt.path, tmp_path / "ckpt")))

    steps = iter(range(100))
    with pytest.raises(TrainingPaused) as paused:
        train(config, data_path=pairs, out_dir=tmp_path / "a", home=tmp_path,
              should_pause=lambda: next(steps) >= 4, on_checkpoint=keep)  # fmt: skip
    assert paused.value.step == 5 and not (saved[0] / "ref").exists()
    train(config, data_path=pairs, out_dir=tmp_path / "b", home=tmp_path, resume_from=saved[0])
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all((whole[k] - resumed[k]).abs().max() < 1e-6 for k in whole)


def test_dpo_continues_from_an_sft_adapter(tiny_base: Path, tmp_path: Path) -> None:
    """A DPO run from an SFT adapter starts where that adapter is (its margin, not the base's,
    is the one before; the reference is the adapter too: the first loss is log 2). The SFT
    adapter learned to answer "Not sure." to everything, the answer DPO is told to avoid."""
    pairs = write_jsonl(tmp_path / "p.jsonl", [pref_row(q, a, "Not sure.") for q, a in TINY_FACTS])
    sft_data = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": q},
                       {"role": "assistant", "content": "Not sure."}]} for q, _ in TINY_FACTS],
    )  # fmt: skip
    sft = tmp_path / "sft"
    train(
        TrainConfig(base_model=str(tiny_base), n_epochs=8, batch_size=4, lora_r=8,
                    learning_rate_multiplier=25.0, probe_size=0, precision="fp32"),
        data_path=sft_data, out_dir=sft, home=tmp_path,
    )  # fmt: skip
    fresh = train(dpo_config(tiny_base, n_epochs=1), data_path=pairs, out_dir=tmp_path / "f",
                  home=tmp_path)  # fmt: skip
    continued = train(
        dpo_config(tiny_base, n_epochs=3, init_adapter=str(sft)),
        data_path=pairs, out_dir=tmp_path / "c", home=tmp_path,
    )  # fmt: skip
    start = margin(continued.metrics, "before")["margin"]
    assert start < margin(fresh.metrics, "before")["margin"] - 5  # the SFT adapter's
    assert margin(continued.metrics, "after")["margin"] > start
    assert continued.metrics["preference"]["loss_first_step"] == pytest.approx(0.6931, abs=1e-3)


def test_dpo_on_cpu_uses_the_compact_lm_head(tiny_base: Path, pairs: Path, tmp_path: Path) -> None:
    """trainer/lm_head.py serves DPO's log-probs too (tests/trainer/test_trainer_lm_head.py
    compares its numbers with trl's head)."""
    from trainer.data import TokenizedPairs, prepare_inputs
    from trainer.modeling import add_lora, choose_plan, load_base_model, load_tokenizer
    from trainer.objectives import dpo_trainer
    from trainer.recipe import tokenize_inputs

    config = dpo_config(tiny_base)
    inputs = prepare_inputs(config, data_path=pairs)
    train_data, valid_data = tokenize_inputs(load_tokenizer(tiny_base), inputs, config)
    assert isinstance(train_data, TokenizedPairs) and isinstance(valid_data, TokenizedPairs)
    plan = choose_plan(config)
    trainer = dpo_trainer(
        add_lora(load_base_model(tiny_base, plan=plan), config), config, plan,
        tokenizer=load_tokenizer(tiny_base), inputs=inputs, train_pairs=train_data.pairs,
        valid_pairs=valid_data.pairs, out_dir=tmp_path, callbacks=[],
    )  # fmt: skip
    trained: Any = trainer.model
    assert getattr(trained.get_base_model().forward, "compact_cpu_head", False)

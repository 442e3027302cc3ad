"""4-bit LoRA gradients stay right after an eval-mode generate (the AVX512-bf16 CPU trap).

bitsandbytes repacks 4-bit weights on the first no-grad eval forward on AVX512-bf16 CPUs and
then backpropagates through an op with no autograd kernel: gradients go silently wrong
(ML-NOTES.md). The trainer probes the model (generate) before training, so this must hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import TrainConfig
from trainer.evaluate import greedy_answers
from trainer.modeling import add_lora, choose_plan, cpu_supports_bf16, load_base_model

from .trainer_testdata import TINY_FACTS


def lora_model(base: Path, *, fixed: bool = True) -> Any:
    config = TrainConfig(base_model=str(base), method="qlora", precision="fp32", lora_r=8)
    model = load_base_model(base, plan=choose_plan(config))
    if not fixed:  # undo the trainer's fix, to show what the test would catch
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
    model = add_lora(model, config)
    with torch.no_grad():  # non-zero B, so gradients reach every LoRA matrix
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model


def lora_gradients(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.train()
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def generate_then_gradients(base: Path, *, fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = lora_model(base, fixed=fixed)
    batch = tokenizer([f"{q} {a}" for q, a in TINY_FACTS[:4]], return_tensors="pt", padding=True)
    before = lora_gradients(model, dict(batch))
    prompts = [[{"role": "user", "content": q}] for q, _ in TINY_FACTS[:2]]
    greedy_answers(model, tokenizer, prompts, max_new_tokens=4)  # eval mode, no grad
    return before, lora_gradients(model, dict(batch))


def test_gradients_after_generate_match_gradients_before(tiny_base: Path) -> None:
    before, after = generate_then_gradients(tiny_base, fixed=True)
    assert before.abs().sum() > 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="the trap exists only on AVX512-bf16 CPUs")
def test_without_the_fix_training_hits_the_op_with_no_autograd_kernel(tiny_base: Path) -> None:
    # pyproject's filterwarnings turns this warning into an error in every test.
    with pytest.raises(UserWarning, match="autograd kernel was not registered"):
        generate_then_gradients(tiny_base, fixed=False)

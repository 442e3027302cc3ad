"""CPU training attention (trainer/attention.py): same numbers as transformers' sdpa, per
example in packed rows, and installed by the trainer's loader on CPU only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.attention import CPU_ATTENTION, register
from trainer.config import TrainConfig
from trainer.modeling import choose_plan, load_base_model

EXAMPLES = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20]]


def packed_row() -> dict[str, Any]:
    """What trl's padding-free collator hands the model for a packed row."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return dict(collate([{"input_ids": ids} for ids in EXAMPLES]))


def model_with(base: Path, attention: str) -> Any:
    register()
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation=attention
    )
    model.config.use_cache = False  # as the trainer loads it
    return model


def test_the_loader_installs_it_on_cpu(tiny_base: Path) -> None:
    config = TrainConfig.model_validate({"base_model": str(tiny_base), "precision": "fp32"})
    model = load_base_model(tiny_base, plan=choose_plan(config))
    assert model.config._attn_implementation == CPU_ATTENTION


def test_packed_examples_see_only_themselves(tiny_base: Path) -> None:
    model = model_with(tiny_base, CPU_ATTENTION).eval()
    row = packed_row()
    assert "cu_seq_lens_q" in row  # the packed path, not the block-diagonal mask
    with torch.no_grad():
        together = model(**{k: v for k, v in row.items() if k != "labels"}).logits[0]
        start = 0
        for ids in EXAMPLES:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(together[start : start + len(ids)], alone)
            start += len(ids)


@pytest.mark.parametrize("packed", [True, False], ids=["packed row", "padded batch"])
def test_loss_and_gradients_match_sdpa(tiny_base: Path, packed: bool) -> None:
    """The trained numbers are transformers' own (sdpa with its block-diagonal or padding
    mask), in fp32 and under the bf16 autocast the trainer uses on AVX512-bf16 CPUs."""
    if packed:
        batch = packed_row()
    else:
        width = max(map(len, EXAMPLES))
        ids = torch.tensor([x + [0] * (width - len(x)) for x in EXAMPLES])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in EXAMPLES])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }
    results = {}
    for attention in ("sdpa", CPU_ATTENTION):
        for autocast in (False, True):
            model = model_with(tiny_base, attention).train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[attention, autocast] = (loss.detach(), grads)
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        (loss, grads), (ref_loss, ref_grads) = (
            results[CPU_ATTENTION, autocast],
            results["sdpa", autocast],
        )
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        assert (grads - ref_grads).norm() / ref_grads.norm() < tol


def test_generation_with_a_kv_cache_is_unchanged(tiny_base: Path) -> None:
    prompt = torch.tensor([[5, 6, 7, 8]])
    outputs = [
        model_with(tiny_base, attention).generate(
            prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0
        )
        for attention in ("sdpa", CPU_ATTENTION)
    ]
    assert outputs[0].tolist() == outputs[1].tolist()

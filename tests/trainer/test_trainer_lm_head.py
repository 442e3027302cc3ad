"""SFT's CPU LM head (trainer/lm_head.py) against trl's own fused head: the same loss,
LoRA gradients and logged metrics, on packed rows and padded batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trainer.lm_head import DPO_OUTPUTS, SFT_OUTPUTS, use_compact_cpu_head

EXAMPLES = [[5, 6, 7, 8, 9, 21], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 22]]
PROMPT = 2  # the first tokens of each example are prompt (label -100)


def peft_model(base: Path, *, compact: bool, outputs: tuple[str, ...] = SFT_OUTPUTS) -> Any:
    """What the trainer hands trl: LoRA on the base, trl's fused head on the base model."""
    base_model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model: Any = get_peft_model(base_model, lora)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", *outputs))
    if compact:
        assert use_compact_cpu_head(model, outputs=outputs)
    return model


def labels_of(ids: list[int]) -> list[int]:
    return [-100] * PROMPT + ids[PROMPT:]


def batch(kind: str) -> dict[str, Any]:
    if kind == "packed":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
        return dict(collate([{"input_ids": x, "labels": labels_of(x)} for x in EXAMPLES]))
    width = max(map(len, EXAMPLES))
    ids = torch.tensor([x + [0] * (width - len(x)) for x in EXAMPLES])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in EXAMPLES])
    labels = torch.tensor([labels_of(x) + [-100] * (width - len(x)) for x in EXAMPLES])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(model: Any, inputs: dict[str, Any], *, autocast: bool, **extra: Any) -> dict[str, Any]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs, fused_lm_head=True, use_cache=False, **extra)
    out.loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return {
        "loss": out.loss.detach(),
        "grads": torch.cat(grads),
        "entropy": out.entropy.detach(),
        "is_top1": out.is_top1,
        "mean_logits": out.mean_logits,
        "label_mask": out.label_mask,
    }


@pytest.mark.parametrize(
    ("kind", "outputs"),
    [("packed", SFT_OUTPUTS), ("padded", SFT_OUTPUTS), ("padded", DPO_OUTPUTS)],
    ids=["sft packed", "sft padded", "dpo padded"],
)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_same_loss_gradients_and_metrics_as_trl(
    tiny_base: Path, kind: str, outputs: tuple[str, ...], autocast: bool
) -> None:
    inputs = batch(kind)
    assert (inputs["labels"] == -100).any() and (inputs["labels"] != -100).any()
    ours = run(peft_model(tiny_base, compact=True, outputs=outputs), inputs, autocast=autocast)
    theirs = run(peft_model(tiny_base, compact=False, outputs=outputs), inputs, autocast=autocast)
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=tol, atol=tol)
    assert (ours["grads"] - theirs["grads"]).norm() / theirs["grads"].norm() < tol
    assert ours["grads"].norm() > 0
    torch.testing.assert_close(ours["entropy"], theirs["entropy"], rtol=tol, atol=tol)
    assert torch.equal(ours["label_mask"], theirs["label_mask"])
    if "mean_logits" in outputs:
        torch.testing.assert_close(ours["mean_logits"], theirs["mean_logits"], rtol=tol, atol=tol)
    else:
        assert ours["mean_logits"] is None
    if not autocast:  # top-1 ties can flip in bf16
        assert torch.equal(ours["is_top1"], theirs["is_top1"])


def test_num_items_in_batch_divides_the_loss(tiny_base: Path) -> None:
    model = peft_model(tiny_base, compact=True)
    inputs = batch("padded")
    n = int((inputs["labels"][:, 1:] != -100).sum())
    whole = run(model, inputs, autocast=False)["loss"]
    halved = run(model, inputs, autocast=False, num_items_in_batch=2 * n)["loss"]
    torch.testing.assert_close(halved, whole / 2)


def test_a_batch_without_trained_tokens_backpropagates_a_zero(tiny_base: Path) -> None:
    inputs = batch("padded")
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    result = run(peft_model(tiny_base, compact=True), inputs, autocast=False)
    assert result["loss"].item() == 0.0


def test_other_calls_go_to_the_model_unchanged(tiny_base: Path) -> None:
    model = peft_model(tiny_base, compact=True).eval()
    ids = torch.tensor([EXAMPLES[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, len(EXAMPLES[0]), model.config.vocab_size)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, len(EXAMPLES[0]) + 3)


def test_a_head_it_cannot_compute_stays_with_trl(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert not use_compact_cpu_head(model, outputs=("log_sum_sq_probs",))  # DPO's WPO weights
    model.get_output_embeddings().weight.requires_grad_(True)
    assert not use_compact_cpu_head(model)


def test_the_sft_trainer_installs_it_on_cpu(tiny_base: Path, tmp_path: Path) -> None:
    from trainer.config import TrainConfig, resolve_hyperparameters
    from trainer.data import TokenizedData, TokenizedExample
    from trainer.modeling import add_lora, choose_plan, load_base_model, load_tokenizer
    from trainer.objectives import sft_trainer

    config = TrainConfig.model_validate({"base_model": str(tiny_base), "precision": "fp32"})
    plan = choose_plan(config)
    model = add_lora(load_base_model(tiny_base, plan=plan), config)
    data = TokenizedData([TokenizedExample(x, labels_of(x)) for x in EXAMPLES])
    trainer = sft_trainer(
        model, config, plan, tokenizer=load_tokenizer(tiny_base),
        hp=resolve_hyperparameters(config, n_examples=len(EXAMPLES)), train_data=data,
        valid_data=TokenizedData(), packed_length=64, out_dir=tmp_path, callbacks=[],
    )  # fmt: skip
    trained: Any = trainer.model
    assert getattr(trained.get_base_model().forward, "compact_cpu_head", False)


def test_chunking_changes_nothing() -> None:
    from trainer.lm_head import CompactHead

    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight, targets = torch.randn(50, 16), torch.randint(0, 50, (10,))
    results = []
    for rows in (3, 10):  # four chunks, the last one short; one chunk
        out = CompactHead.apply(hidden, weight, targets, torch.float32, True, True, rows)
        (grad,) = torch.autograd.grad(out[0].sum(), hidden)
        results.append((*out, grad))
    for chunked, whole in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole)
    logits = (hidden @ weight.t()).log_softmax(-1)  # and both are the plain log-softmax
    torch.testing.assert_close(results[0][0], logits.gather(-1, targets[:, None])[:, 0])

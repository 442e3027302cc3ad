"""Shared-prefix packing (trainer/packing.py): a row runs its examples' common prompt once,
and every example still gets exactly the logits, loss and gradients it gets alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from trainer.attention import CPU_ATTENTION, SHARED_PREFIX
from trainer.data import IGNORE_INDEX as X
from trainer.data import TokenizedData, TokenizedExample
from trainer.packing import (
    SHARED_TOKENS,
    SharedPrefixCollator,
    _best_fit,
    group_rows,
    share_prefix,
    shareable_prefix,
    shared_prefix_rows,
)

from .test_trainer_attention import model_with
from .trainer_testdata import TINY_FACTS, chat_row, write_jsonl

# Three examples opening with the same 5 tokens ("system prompt") then their own question;
# labels on the answers only.
EXAMPLES = [
    ([1, 2, 3, 4, 5, 20, 21, 9, 30, 31, 32], [X, X, X, X, X, X, X, X, 30, 31, 32]),
    ([1, 2, 3, 4, 5, 22, 9, 33, 34], [X, X, X, X, X, X, X, 33, 34]),
    ([1, 2, 3, 4, 5, 20, 23, 24, 9, 35], [X, X, X, X, X, X, X, X, X, 35]),
]


def test_the_prefix_is_common_unlabelled_and_stops_before_each_first_label() -> None:
    assert shareable_prefix(EXAMPLES) == 5
    assert shareable_prefix(EXAMPLES[:1]) == 0  # nothing to share with
    # Labels start right after the common part: one unlabelled token stays with each example.
    early = [([1, 2, 3, 7], [X, X, X, 7]), ([1, 2, 3, 8], [X, X, X, 8])]
    assert shareable_prefix(early) == 2
    # A label inside the common tokens ends the prefix before it.
    labelled = [([1, 2, 3, 4], [X, 2, 3, 4]), ([1, 2, 3, 5], [X, X, X, 5])]
    assert shareable_prefix(labelled) == 0
    assert shareable_prefix([([1, 2], [X, 2]), ([6, 7], [X, 7])]) == 0


def test_a_row_holds_the_prefix_once_then_each_remainder_positioned_after_it() -> None:
    row = share_prefix(EXAMPLES)
    assert row.shared_prefix == 5
    assert row.input_ids == [1, 2, 3, 4, 5, 20, 21, 9, 30, 31, 32, 22, 9, 33, 34, 20, 23, 24, 9, 35]
    assert row.position_ids == list(range(5)) + list(range(5, 11)) + list(range(5, 9)) + list(
        range(5, 10)
    )
    assert row.bounds == [0, 5, 11, 15, 20]
    assert row.tokens == 11 + 9 + 10
    # Every label kept, and the token at each boundary unlabelled.
    assert [t for t in row.labels if t != X] == [30, 31, 32, 33, 34, 35]
    assert all(row.labels[b] == X for b in row.bounds[:-1])


def collated(examples: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    return SharedPrefixCollator(pad_token_id=0)([dataclasses.asdict(share_prefix(examples))])


def model_on_cpu_attention(base: Path) -> Any:
    return model_with(base, CPU_ATTENTION)


def test_each_example_gets_the_logits_it_gets_alone(tiny_base: Path) -> None:
    model = model_on_cpu_attention(tiny_base).eval()
    batch = collated(EXAMPLES)
    assert batch[SHARED_PREFIX] == 5 and batch[SHARED_TOKENS] == 30 - 20
    batch.pop(SHARED_TOKENS)
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        bounds = batch["cu_seq_lens_q"].tolist()
        for (ids, _), start, end in zip(EXAMPLES, bounds[1:-1], bounds[2:], strict=True):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(together[:5], alone[:5], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(together[start:end], alone[5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_loss_and_gradients_match_the_padding_free_row(tiny_base: Path, autocast: bool) -> None:
    """The same examples through trl's padding-free collator (each runs its own prefix)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padding_free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": ids, "labels": labels} for ids, labels in EXAMPLES]
    )
    shared = collated(EXAMPLES)
    shared.pop(SHARED_TOKENS)
    results = []
    for batch in (padding_free, shared):
        model = model_on_cpu_attention(tiny_base).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    (ref_loss, ref_grads), (loss, grads) = results
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert (grads - ref_grads).norm() / ref_grads.norm() < tol


def test_rows_mix_lengths_in_a_seeded_order_and_never_outnumber_best_fit_decreasing() -> None:
    lengths = [3 + (i * 7) % 40 for i in range(200)]
    rows = group_rows(lengths, row_length=180, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(200))  # each example once
    assert all(sum(lengths[i] for i in row) <= 180 for row in rows)
    decreasing = _best_fit(sorted(range(200), key=lambda i: -lengths[i]), lengths, 180)
    assert len(rows) <= len(decreasing)
    assert group_rows(lengths, row_length=180, seed=0) == rows  # the seed decides
    assert group_rows(lengths, row_length=180, seed=1) != rows
    # Not length-sorted: a row's first example is not always its longest.
    assert any(lengths[row[0]] < max(lengths[i] for i in row) for row in rows)


def test_rows_share_what_their_examples_share() -> None:
    data = TokenizedData(rows=[TokenizedExample(ids, labels) for ids, labels in EXAMPLES * 2])
    rows = shared_prefix_rows(data, row_length=22, seed=0)
    # 60 tokens in rows of at most 22: three rows (as best fit decreasing), two examples or more
    assert len(rows) == 3 and sum(rows["tokens"]) == 60
    for row in rows:
        assert (
            len(row["input_ids"]) == row["tokens"] - (len(row["bounds"]) - 3) * row["shared_prefix"]
        )  # every example after the first drops the prefix
        assert row["shared_prefix"] >= 5  # at least the common 5 tokens


class Tokens(TrainerCallback):
    def __init__(self) -> None:
        self.counted: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if "num_tokens" in (kw.get("logs") or {}):
            self.counted.append(kw["logs"]["num_tokens"])


def trained_sft(base: Path, out: Path, data: TokenizedData, *, packing: bool) -> tuple[Any, float]:
    from trainer.config import TrainConfig, resolve_hyperparameters
    from trainer.data import packed_row_length
    from trainer.modeling import add_lora, choose_plan, load_base_model, load_tokenizer
    from trainer.objectives import sft_trainer

    config = TrainConfig.model_validate(
        {"base_model": str(base), "precision": "fp32", "packing": packing, "batch_size": 4,
         "n_epochs": 2, "lora_r": 8, "learning_rate_multiplier": 10.0}
    )  # fmt: skip
    plan = choose_plan(config)
    model = add_lora(load_base_model(base, plan=plan), config)
    hp = resolve_hyperparameters(config, n_examples=data.n_examples)
    tokens = Tokens()
    trainer = sft_trainer(
        model, config, plan, tokenizer=load_tokenizer(base), hp=hp, train_data=data,
        valid_data=TokenizedData(), out_dir=out, callbacks=[tokens],
        packed_length=packed_row_length([data], batch_size=4, max_length=512),
    )  # fmt: skip
    trainer.train()
    return trainer, tokens.counted[-1]


def test_training_on_shared_prefix_rows_keeps_the_schedule_and_counts_every_token(
    tiny_base: Path, tmp_path: Path
) -> None:
    from trainer.data import tokenize_examples
    from trainer.formats import read_examples
    from trainer.modeling import load_tokenizer

    rows = [chat_row(q, a * (1 + i % 5)) for i, (q, a) in enumerate(TINY_FACTS * 2)]
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    data = tokenize_examples(load_tokenizer(tiny_base), examples, max_length=512, what="data")  # type: ignore[arg-type]
    unpacked, unpacked_tokens = trained_sft(tiny_base, tmp_path / "u", data, packing=False)
    packed, packed_tokens = trained_sft(tiny_base, tmp_path / "p", data, packing=True)
    # The tiny chat template opens every example the same way: each row runs it once.
    shared = packed.train_dataset
    assert min(shared["shared_prefix"]) > 0
    assert sum(map(len, shared["input_ids"])) < sum(shared["tokens"]) == data.n_tokens
    # The unpacked schedule, and trl counts the examples' tokens, not the shorter rows.
    assert packed.state.global_step == unpacked.state.global_step
    assert packed_tokens == unpacked_tokens == 2 * data.n_tokens
    losses = [log["loss"] for log in packed.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]

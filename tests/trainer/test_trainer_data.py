"""Chat-template masking, truncation, validation split, and bad data caught before any model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from trainer.config import TrainConfig
from trainer.data import (
    IGNORE_INDEX,
    load_examples,
    split_validation,
    tokenize_example,
    tokenize_examples,
)
from trainer.errors import DataError
from trainer.formats import Example, Message
from trainer.recipe import train

from .trainer_testdata import chat_row, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_base)


def trained_text(tokenizer: Any, labels: list[int]) -> str:
    return str(tokenizer.decode([t for t in labels if t != IGNORE_INDEX]))


def test_only_assistant_tokens_carry_labels(tokenizer: Any) -> None:
    example = Example(
        (
            Message("system", "Be brief."),
            Message("user", "What colour is the sky?"),
            Message("assistant", "Blue."),
        ),
        "chat",
    )
    row = tokenize_example(tokenizer, example, max_length=512)
    assert trained_text(tokenizer, row.labels) == "Blue.<|im_end|>"
    # Labels are the ids themselves (the model shifts them), so loss and ids line up.
    assert all(
        lab in (IGNORE_INDEX, tok) for tok, lab in zip(row.input_ids, row.labels, strict=True)
    )


def test_weight_zero_turns_are_context_only(tokenizer: Any) -> None:
    example = Example(
        (
            Message("user", "What colour is grass?"),
            Message("assistant", "Red.", weight=0),
            Message("user", "Really?"),
            Message("assistant", "Green."),
        ),
        "chat",
    )
    row = tokenize_example(tokenizer, example, max_length=512)
    assert trained_text(tokenizer, row.labels) == "Green.<|im_end|>"
    assert "Red." in tokenizer.decode(row.input_ids)


def test_overlong_examples_are_truncated_and_counted(tokenizer: Any) -> None:
    long_answer = Example((Message("user", "Hi"), Message("assistant", "Blue. " * 50)), "chat")
    no_room = Example(
        (Message("user", "What is frozen water? " * 20), Message("assistant", "Ice.")), "chat"
    )
    data = tokenize_examples(tokenizer, [long_answer, no_room], max_length=32, what="train")
    assert (data.n_truncated, data.n_dropped, len(data.rows)) == (2, 1, 1)
    assert len(data.rows[0].input_ids) == 32
    with pytest.raises(DataError, match="max_seq_length=32"):
        tokenize_examples(tokenizer, [no_room], max_length=32, what="train")


def test_validation_split_is_seeded_and_disjoint() -> None:
    examples = [
        Example((Message("user", str(i)), Message("assistant", "x")), "chat") for i in range(20)
    ]
    train_a, valid_a = split_validation(examples, fraction=0.2, seed=1)
    _, valid_b = split_validation(examples, fraction=0.2, seed=1)
    assert valid_a == valid_b and len(valid_a) == 4 and len(train_a) == 16
    assert not set(valid_a) & set(train_a)


def test_bad_line_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [chat_row("q", "a")] * 3)
    with path.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(DataError, match="line 4") as info:
        load_examples(path)
    assert info.value.problems[0].startswith("line 4:")


def test_bad_data_fails_before_any_model_is_loaded(tmp_path: Path) -> None:
    # The base model does not exist: reaching it would raise BaseModelError instead.
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\nnot json\n')
    config = TrainConfig(base_model=str(tmp_path / "no-such-model"))
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        train(config, data_path=path, out_dir=tmp_path / "out", home=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        train(config, data_path=tmp_path / "missing.jsonl", out_dir=tmp_path / "o", home=tmp_path)
    assert not (tmp_path / "out").exists()

"""Chat examples -> token ids + labels, with loss only on trained assistant turns.

Each example is rendered once with the base tokenizer's chat template. The character span of
every assistant message with weight 1 (its content and end-of-turn token) is found by
rendering the conversation up to that message with and without it; tokens starting inside a
span keep their id as label, all others get -100. Over-long examples keep their start and are
counted; an example left with no trained token is dropped and counted.
`prepare_inputs` does everything that needs no model: read, check the dataset's kind against
the objective (sft: supervised examples; dpo: preference examples), split, resolve "auto".
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from trainer.config import Hyperparameters, TrainConfig, resolve_hyperparameters
from trainer.errors import ConfigError, DataError
from trainer.formats import (
    PREFERENCE,
    SUPERVISED,
    AnyExample,
    DatasetError,
    Example,
    Message,
    PreferenceExample,
    read_examples,
)

IGNORE_INDEX = -100  # label value the loss skips (torch/transformers convention)
KIND_OF_OBJECTIVE = {"sft": SUPERVISED, "dpo": PREFERENCE}
T = TypeVar("T")


class ChatTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer this module uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizedData:
    rows: list[TokenizedExample] = field(default_factory=list)
    n_truncated: int = 0
    n_dropped: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(row.input_ids) for row in self.rows)

    @property
    def n_trained_tokens(self) -> int:
        return sum(row.n_trained for row in self.rows)

    @property
    def n_examples(self) -> int:
        return len(self.rows)

    def as_columns(self) -> dict[str, list[list[int]]]:
        return {
            "input_ids": [row.input_ids for row in self.rows],
            "labels": [row.labels for row in self.rows],
        }


def packed_row_length(data: Sequence[TokenizedData], *, batch_size: int, max_length: int) -> int:
    """Row length for packing that keeps ~`batch_size` examples per optimizer step.

    trl flattens a padding-free batch into one sequence, so packing `batch_size` rows of
    `max_length` would put batch_size x max_length tokens in one attention (12.5 GB RSS seen on
    CPU). One row of about batch_size examples keeps the unpacked step's examples and
    schedule and only drops the padding; it must still fit the longest example.

    Rows exactly as long as the unpacked steps' average would need a perfect bin packing to
    come out as many as those steps; trl's best-fit-decreasing leaves some room in each row,
    so that made one more row (an extra optimizer step per epoch, ~8% of the time on 12
    steps). Half an average example of room per row keeps the count at the unpacked one.
    """
    lengths = [len(row.input_ids) for part in data for row in part.rows]
    if not lengths:
        return max_length
    train_lengths = [len(row.input_ids) for row in data[0].rows] or lengths
    steps = math.ceil(len(train_lengths) / batch_size)
    room = math.ceil(sum(train_lengths) / len(train_lengths) / 2)
    target = math.ceil(sum(train_lengths) / steps) + room
    return min(max_length, max(max(lengths), target))


def load_examples(path: str | Path) -> list[AnyExample]:
    """Read a JSONL dataset; raise `DataError` naming each bad line (no model needed)."""
    try:
        return read_examples(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except DatasetError as e:
        raise DataError(str(e), e.problems) from e


def check_kind(examples: Sequence[AnyExample], *, objective: str, what: str) -> None:
    """A dpo run needs preference examples, an sft run supervised ones (`DataError` if not)."""
    wanted = KIND_OF_OBJECTIVE[objective]
    if examples and examples[0].kind != wanted:
        raise DataError(
            f"{what} holds {examples[0].kind} examples; the {objective} objective trains on "
            f"{wanted} examples"
        )


def split_validation(
    examples: Sequence[T], *, fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of the examples (at least one when fraction > 0), seeded."""
    if fraction <= 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(examples) * fraction))
    held = set(order[:n_valid])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    valid = [ex for i, ex in enumerate(examples) if i in held]
    return train, valid


def as_chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _render(tokenizer: ChatTokenizer, messages: Sequence[Message], *, prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        as_chat(messages), tokenize=False, add_generation_prompt=prompt
    )
    return str(text)


def trained_spans(tokenizer: ChatTokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans that carry loss."""
    messages = example.messages
    full = _render(tokenizer, messages, prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or message.weight != 1:
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        upto = _render(tokenizer, messages[: i + 1], prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the base model's chat template does not render turns incrementally")
        # The turn's trailing newline is template glue, not something the model should emit.
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def tokenize_example(
    tokenizer: ChatTokenizer, example: Example, *, max_length: int
) -> TokenizedExample:
    """Token ids of the whole conversation; labels only inside trained assistant spans."""
    text, spans = trained_spans(tokenizer, example)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated=truncated)


def tokenize_examples(
    tokenizer: ChatTokenizer, examples: Sequence[Example], *, max_length: int, what: str
) -> TokenizedData:
    """Tokenize every example; raise `DataError` if none keeps a trained token."""
    data = TokenizedData()
    for example in examples:
        row = tokenize_example(tokenizer, example, max_length=max_length)
        data.n_truncated += row.truncated
        if row.n_trained == 0:
            data.n_dropped += 1  # truncation cut every assistant token
            continue
        data.rows.append(row)
    if examples and not data.rows:
        raise DataError(
            f"{what}: every example lost its assistant tokens to max_seq_length={max_length}"
        )
    return data


@dataclass
class TokenizedPairs:
    """Preference pairs that keep answer tokens on both sides; trl tokenizes them itself."""

    pairs: list[PreferenceExample] = field(default_factory=list)
    n_tokens: int = 0  # both sequences of each pair, prompt included
    n_truncated: int = 0
    n_dropped: int = 0

    @property
    def n_examples(self) -> int:
        return len(self.pairs)


class TokenCounts(Protocol):
    """What metrics.json counts of either objective's data."""

    @property
    def n_tokens(self) -> int: ...
    @property
    def n_examples(self) -> int: ...

    n_truncated: int
    n_dropped: int


def tokenize_pairs(
    tokenizer: ChatTokenizer, pairs: Sequence[PreferenceExample], *, max_length: int, what: str
) -> TokenizedPairs:
    """Keep the pairs whose two answers both keep a token within `max_length`."""
    data = TokenizedPairs()
    for pair in pairs:
        sides = [
            tokenize_example(tokenizer, pair.with_answer(answer), max_length=max_length)
            for answer in (pair.preferred, pair.rejected)
        ]
        data.n_truncated += any(side.truncated for side in sides)
        if not all(side.n_trained for side in sides):
            data.n_dropped += 1  # truncation cut an answer entirely
            continue
        data.pairs.append(pair)
        data.n_tokens += sum(len(side.input_ids) for side in sides)
    if pairs and not data.pairs:
        raise DataError(
            f"{what}: every pair lost an answer's tokens to max_seq_length={max_length}"
        )
    return data


@dataclass(frozen=True)
class RunInputs:
    """`train`/`valid`: supervised examples, what the probe asks; for a dpo run, each
    preference prompt with its preferred answer, and the pairs themselves in `pairs_*`."""

    train: list[Example]
    valid: list[Example]
    hyperparameters: Hyperparameters
    data_sha256: str
    pairs_train: list[PreferenceExample] = field(default_factory=list)
    pairs_valid: list[PreferenceExample] = field(default_factory=list)


def _as_supervised(examples: Sequence[AnyExample]) -> list[Example]:
    return [ex.with_answer(ex.preferred) if isinstance(ex, PreferenceExample) else ex
            for ex in examples]  # fmt: skip


def _preferences(examples: Sequence[AnyExample]) -> list[PreferenceExample]:
    return [ex for ex in examples if isinstance(ex, PreferenceExample)]


def prepare_inputs(
    config: TrainConfig, *, data_path: Path, validation_path: Path | None = None
) -> RunInputs:
    """Read and check the data and resolve "auto": everything that needs no model."""
    examples = load_examples(data_path)
    check_kind(examples, objective=config.objective, what="the training file")
    if validation_path is not None:
        train, valid = examples, load_examples(validation_path)
        check_kind(valid, objective=config.objective, what="the validation file")
    else:
        train, valid = split_validation(
            examples, fraction=config.validation_split, seed=config.seed
        )
    if config.early_stopping_patience is not None and not valid:
        raise ConfigError(
            "early_stopping_patience: needs validation data",
            ["early_stopping_patience: needs a validation file or validation_split > 0"],
        )
    digest = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()
    hp = resolve_hyperparameters(config, n_examples=len(train))
    return RunInputs(
        train=_as_supervised(train),
        valid=_as_supervised(valid),
        hyperparameters=hp,
        data_sha256=digest,
        pairs_train=_preferences(train),
        pairs_valid=_preferences(valid),
    )

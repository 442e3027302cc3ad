"""Packed rows that run their examples' common prompt once (CPU training).

Fine-tuning sets repeat their start: the same system prompt in every example, and a chat
template that adds its own (SmolLM2's 30-token default when none is given). A padding-free
packed row (trl's `bfd` strategy: per-example positions, no attention across examples) runs
that start once per example. Here a row runs it once: the longest token prefix the row's
examples share and carry no label on comes first, then each example's remainder, positioned
as if it followed the prefix, attending to the prefix and to itself (trainer/attention.py).

This is exact: causal attention makes the prefix's hidden states the same whichever example
follows, so every example sees what it saw alone, and autograd sums the gradient each one
sends back through the prefix, as the separate copies would. The prefix stops before each
example's first labelled token, and one unlabelled token earlier, so a remainder starts with an
unlabelled token and nothing is ever scored across a boundary; the loss counts the same labels.
The one difference is LoRA dropout (off by default): the shared positions draw one dropout
mask for the row instead of one per example.

Rows are grouped exactly as trl would pack them (`pack_dataset`, best fit decreasing), so the
schedule (examples per step, steps per epoch) is the padding-free one's; only the tokens run
change. On CUDA the trainer keeps trl's packing: flash attention's varlen kernels take
`cu_seq_lens`, not a shared prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trainer.attention import SHARED_PREFIX
from trainer.data import IGNORE_INDEX, TokenizedData

# Batch key the trainer pops before the forward: tokens the prefix stood in for (counted
# as trained input, as trl counts a padding-free row's tokens).
SHARED_TOKENS = "loraplex_shared_tokens"


def shareable_prefix(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """Length of the prefix (ids, labels) examples can share: common ids, no label on them,
    and at least one unlabelled token left before each example's first label; 0 for one
    example."""
    if len(examples) < 2:
        return 0
    first_ids = examples[0][0]
    limit = min(_first_label(labels) for _, labels in examples) - 1
    limit = min(limit, *(len(ids) for ids, _ in examples))
    n = 0
    while n < limit and all(ids[n] == first_ids[n] for ids, _ in examples):
        n += 1
    return n


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


@dataclass(frozen=True)
class SharedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    bounds: list[int]  # segment starts and the end: [0, prefix, ...] when prefix > 0
    prefix: int
    tokens: int  # tokens of the examples it holds, as unpacked

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "bounds": self.bounds,
            "shared_prefix": self.prefix,
            "tokens": self.tokens,
        }


def share_prefix(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> SharedRow:
    """One packed row of `examples` ((ids, labels) each), their shareable prefix run once."""
    p = shareable_prefix(examples)
    ids: list[int] = list(examples[0][0][:p])
    labels: list[int] = [IGNORE_INDEX] * p
    positions: list[int] = list(range(p))
    bounds = [0, p] if p else [0]
    for example_ids, example_labels in examples:
        n = len(example_ids)
        ids += example_ids[p:]
        labels += example_labels[p:]
        positions += range(p, n)
        bounds.append(bounds[-1] + n - p)
    tokens = sum(len(example_ids) for example_ids, _ in examples)
    return SharedRow(ids, labels, positions, bounds, p, tokens)


def shared_prefix_rows(data: TokenizedData, *, row_length: int) -> Dataset:
    """`data` packed as trl packs it (best fit decreasing into rows of `row_length`), each
    row's shared prefix run once; the columns `SharedPrefixCollator` reads."""
    packed = pack_dataset(Dataset.from_dict(data.as_columns()), row_length, strategy="bfd")
    rows = []
    for row in packed:
        cuts = list(itertools.accumulate(row["seq_lengths"], initial=0))
        examples = [
            (row["input_ids"][s:e], row["labels"][s:e]) for s, e in itertools.pairwise(cuts)
        ]
        rows.append(share_prefix(examples).as_dict())
    return Dataset.from_list(rows)


class SharedPrefixCollator:
    """One shared-prefix row -> what trl's padding-free collator gives the model, plus the
    prefix length for attention; any other batch (the unpacked eval rows) -> trl's
    padding-free collator, as trl collates them when it packs."""

    def __init__(self, pad_token_id: int) -> None:
        self.padding_free = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, padding_free=True
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if "shared_prefix" not in rows[0]:
            return dict(self.padding_free(rows))
        if len(rows) != 1:
            raise ValueError("shared-prefix rows are one per step (per_device_train_batch_size 1)")
        (row,) = rows
        bounds = torch.tensor(row["bounds"], dtype=torch.int32)
        longest = int(bounds.diff().max()) + int(row["shared_prefix"])
        return {
            "input_ids": torch.tensor([row["input_ids"]]),
            "labels": torch.tensor([row["labels"]]),
            "position_ids": torch.tensor([row["position_ids"]]),
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
            SHARED_PREFIX: int(row["shared_prefix"]),
            SHARED_TOKENS: int(row["tokens"]) - len(row["input_ids"]),
        }

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

Rows are filled best fit, as trl's `bfd` packing fills them, but in a seeded random order
instead of by decreasing length (`group_rows`), so a row mixes lengths as a shuffled batch
does; never more rows than best fit decreasing makes, so the schedule (~batch_size examples
per step, the unpacked steps per epoch) stays. On CUDA the trainer keeps trl's packing:
flash attention's varlen kernels take `cu_seq_lens`, not a shared prefix.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trainer.attention import SHARED_PREFIX
from trainer.data import IGNORE_INDEX, TokenizedData

# Batch key the trainer pops before the forward: tokens the prefix stood in for (counted
# as trained input, as trl counts a padding-free row's tokens).
SHARED_TOKENS = "loraplex_shared_tokens"
ORDERS_TRIED = 8  # random orders `group_rows` tries before falling back to decreasing length


def shareable_prefix(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """Length of the prefix (ids, labels) examples can share: common ids, no label on them,
    and at least one unlabelled token left before each example's first label; 0 for one
    example."""
    if len(examples) < 2:
        return 0
    first_ids = examples[0][0]
    limit = min(_first_label(labels) for _, labels in examples) - 1  # < every length
    n = 0
    while n < limit and all(ids[n] == first_ids[n] for ids, _ in examples):
        n += 1
    return n


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


@dataclasses.dataclass(frozen=True)
class SharedRow:
    """One packed row; its fields are the dataset columns `SharedPrefixCollator` reads."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    bounds: list[int]  # segment starts and the end: [0, prefix, ...] when prefix > 0
    shared_prefix: int
    tokens: int  # tokens of the examples it holds, as unpacked


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


def shared_prefix_rows(data: TokenizedData, *, row_length: int, seed: int) -> Dataset:
    """`data` packed into rows of at most `row_length` tokens (`group_rows`), each row's
    shared prefix run once; the columns `SharedPrefixCollator` reads."""
    lengths = [len(row.input_ids) for row in data.rows]
    rows = []
    for group in group_rows(lengths, row_length=row_length, seed=seed):
        examples = [(data.rows[i].input_ids, data.rows[i].labels) for i in group]
        rows.append(dataclasses.asdict(share_prefix(examples)))
    return Dataset.from_list(rows)


def group_rows(lengths: Sequence[int], *, row_length: int, seed: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `row_length` tokens: best fit in a seeded
    random order, so a row holds examples of any length, as a shuffled batch does.

    trl's best fit decreasing fills rows as tightly, but in length order: the longest examples
    share rows with the shortest, the same rows every epoch. On 96 short rows that left the
    trained adapter's loss 1% above unpacked training (4.14-4.16 vs 4.10-4.11, two seeds);
    random order gave 4.09-4.10 (docs/benchmarks.md). A random order can need more rows, and so
    more steps, than decreasing order: the first of a few orders that needs no more is used,
    else the decreasing one.
    """
    tightest = _best_fit(sorted(range(len(lengths)), key=lambda i: -lengths[i]), lengths,
                         row_length)  # fmt: skip
    rng = random.Random(seed)
    for _ in range(ORDERS_TRIED):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        rows = _best_fit(order, lengths, row_length)
        if len(rows) <= len(tightest):
            return rows
    return tightest


def _best_fit(order: Sequence[int], lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Each example, in `order`, into the open row it fills most (a new row if none fits)."""
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        at = bisect.bisect_left(space, (lengths[i], -1))
        if at < len(space):
            room, row = space.pop(at)
        else:
            room, row = row_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(space, (room - lengths[i], row))
    return rows


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

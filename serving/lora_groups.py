"""Rows of a batch grouped by LoRA slot, and the grouped LoRA matmuls over them (torch only).

The core of Loraplex's grouped LoRA op for vLLM's CPU build (serving/vllm_lora_op.py installs
it into the replicas); bench/lora_op_cpu.py times this same code against vLLM's op without
importing vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Groups:
    """A batch's rows (or sampled rows) grouped by LoRA slot; -1 rows are in no group.

    Run mode (`rows is None`): `segments` are (slot, start, end) runs of consecutive rows in
    batch order, used as views. Sorted mode: `rows` are the LoRA rows in slot order (stable)
    and `segments` index into them."""

    __slots__ = ("rows", "segments", "size")

    def __init__(self, index: torch.Tensor) -> None:
        self.size = int(index.numel())
        self.rows: torch.Tensor | None = None
        self.segments: list[tuple[int, int, int]] = []
        if self.size == 0:
            return
        run_slots, run_counts = torch.unique_consecutive(index, return_counts=True)
        runs, start = [], 0
        for slot, count in zip(run_slots.tolist(), run_counts.tolist(), strict=True):
            if slot >= 0:
                runs.append((slot, start, start + count))
            start += count
        distinct = {slot for slot, _, _ in runs}
        if len(runs) <= 2 * len(distinct):  # few runs (prefill, or one adapter): in place
            self.segments = runs
            return
        order = torch.argsort(index, stable=True)
        slots, counts = torch.unique_consecutive(index[order], return_counts=True)
        start, skip = 0, 0
        for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
            if slot < 0:
                skip = count  # -1 sorts first
            else:
                self.segments.append((slot, start - skip, start - skip + count))
            start += count
        self.rows = order[skip:]


def slot_weights(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's (out, in) matrix of a stacked (slots, 1, out, in) or (slots, out, in)."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


def lora_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    groups: Groups,
    parts: Sequence[tuple[torch.Tensor | None, torch.Tensor, int, int]],
    scale: float,
) -> None:
    """y[r, off:off+size] += ((x[r] @ A.T) * scale) @ B.T for each LoRA row r, each part
    (A, B, off, size) of its slot; A None: x is already shrunk (expand only). Rows beyond
    the mapping (none in vLLM 0.32's CPU runner) and -1 rows are left as they are."""
    if not groups.segments:
        return
    dtype = y.dtype
    if groups.rows is None:
        for slot, s, e in groups.segments:
            xs = x[s:e]
            for a, b, off, size in parts:
                h = xs if a is None else torch.mm(xs.to(a.dtype), slot_weights(a, slot).t())
                if scale != 1.0:
                    h = h * scale
                w = slot_weights(b, slot)[:size]
                y[s:e, off : off + size].addmm_(h.to(dtype), w.t().to(dtype))
        return
    xs = x.index_select(0, groups.rows)
    width = max(off + size for _, _, off, size in parts)
    delta = torch.zeros(xs.size(0), width, dtype=dtype)
    for slot, s, e in groups.segments:
        for a, b, off, size in parts:
            h = xs[s:e] if a is None else torch.mm(xs[s:e].to(a.dtype), slot_weights(a, slot).t())
            if scale != 1.0:
                h = h * scale
            w = slot_weights(b, slot)[:size]
            delta[s:e, off : off + size] = torch.mm(h.to(dtype), w.t().to(dtype))
    y[:, :width].index_add_(0, groups.rows, delta)

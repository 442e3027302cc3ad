"""Rows of a batch grouped by LoRA slot, and the grouped LoRA matmuls over them (torch only).

The core of Loraplex's grouped LoRA op for vLLM's CPU build (serving/vllm_lora_op.py installs
it into the replicas); bench/lora_op_cpu.py times this same code against vLLM's op without
importing vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serving.lora_kernel import Kernel, Rows


class Groups:
    """A batch's rows (or sampled rows) grouped by LoRA slot; -1 rows are in no group.

    Run mode (`rows is None`): `segments` are (slot, start, end) runs of consecutive rows in
    batch order, used as views. Sorted mode: `rows` are the LoRA rows in slot order (stable)
    and `segments` index into them."""

    __slots__ = ("_kernel_rows", "index", "padded", "rows", "segments", "size")

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index.clone()  # vLLM reuses its buffer for the next mapping
        self._kernel_rows: Rows | bool | None = False  # False: not built yet
        self.size = int(index.numel())
        self.rows: torch.Tensor | None = None
        self.segments: list[tuple[int, int, int]] = []
        self.padded: Padded | None = None
        if self.size == 0:
            return
        self.padded = Padded.of(index)
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

    def kernel_rows(self) -> Rows | None:
        """The rows as the C kernel reads them (built on first use, once per batch), or
        None where the batch has too many LoRA rows for it."""
        if self._kernel_rows is False:
            self._kernel_rows = Rows.of(self.index)
        return self._kernel_rows  # type: ignore[return-value]


class Padded:
    """The LoRA rows as one block per slot lo..lo+span-1, each padded to `width` rows, for
    two batched matmuls per module over the stacked weights' own storage (a narrow() view:
    the op count does not grow with the adapters present). Padding repeats a LoRA row and is
    masked out; -1 rows are in no block. Only where padding at most doubles the LoRA rows
    (decode steps, even prefill chunks); else (one long prefill beside decodes) None."""

    __slots__ = ("gather", "lo", "mask", "span", "width")

    def __init__(self, lo: int, span: int, width: int, gather: torch.Tensor, mask: torch.Tensor):
        self.lo, self.span, self.width, self.gather, self.mask = lo, span, width, gather, mask

    @classmethod
    def of(cls, index: torch.Tensor) -> Padded | None:
        lora = index >= 0
        n = int(lora.sum())
        if n == 0:
            return None
        counts = torch.bincount(index[lora])
        present = counts.nonzero().flatten()
        lo, span, width = int(present[0]), int(present[-1]) + 1 - int(present[0]), int(counts.max())
        if span * width > 2 * n:
            return None
        by_slot = torch.argsort(index, stable=True)[index.numel() - n :]  # -1 sorts first
        slots = index[by_slot]
        firsts = torch.cumsum(counts, 0) - counts
        place = (slots - lo) * width + torch.arange(n) - firsts[slots]
        gather = by_slot[:1].repeat(span * width)
        gather[place] = by_slot
        mask = torch.zeros(span * width, 1)
        mask[place] = 1.0
        return cls(lo, span, width, gather, mask.view(span, width, 1))


class TransposedB:
    """Contiguous (slots, rank, out) copies of stacked LoRA B weights (vLLM keeps them as
    (slots, 1, out, rank)): a batched matmul reads a transposed view about 2x slower than the
    same weights laid out this way (decode, 2 rows per slot, SmolLM2's gate_up: 68 vs 38 us).

    Kept per stacked tensor, copied slot by slot on first use. The owner must call
    `invalidate(slots)` whenever those slots' weights may have changed; vLLM writes a slot's
    weights only when it assigns an adapter to it, and always re-sends the slot layout before
    the next forward (serving/vllm_lora_op.py). Costs one more copy of the B weights."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor, set[int]]] = {}
        self._dirty: set[int] = set()  # copies with a slot to refresh

    @property
    def stale(self) -> bool:
        """Whether any copy has a slot to refresh (a new copy has every slot to)."""
        return bool(self._dirty)

    def invalidate(self, slots: Sequence[int] | set[int]) -> None:
        for key, (_, _, stale) in self._copies.items():
            stale.update(slots)
            if stale:
                self._dirty.add(key)

    def block(self, stacked: torch.Tensor, lo: int, span: int) -> torch.Tensor:
        """Slots lo..lo+span-1 of `stacked` as a contiguous (span, rank, out) tensor."""
        return self.fresh(stacked, lo, span).narrow(0, lo, span)

    def fresh(self, stacked: torch.Tensor, lo: int, span: int) -> torch.Tensor:
        """The whole (slots, rank, out) copy of `stacked`, slots lo..lo+span-1 up to date."""
        entry = self._copies.get(id(stacked))
        if entry is None or entry[0] is not stacked:
            w = stacked.squeeze(1) if stacked.dim() == 4 else stacked
            copy = torch.empty(w.size(0), w.size(2), w.size(1), dtype=w.dtype)
            entry = (stacked, copy, set(range(w.size(0))))
            self._copies[id(stacked)] = entry
            self._dirty.add(id(stacked))
        _, copy, stale = entry
        for slot in [s for s in stale if lo <= s < lo + span]:
            copy[slot].copy_(slot_weights(stacked, slot).t())
            stale.discard(slot)
        if not stale:
            self._dirty.discard(id(stacked))
        return copy


def _block(stacked: torch.Tensor, p: Padded) -> torch.Tensor:
    """Slots lo..lo+span-1 of a stacked (slots, 1, out, in) or (slots, out, in): a view."""
    w = stacked.narrow(0, p.lo, p.span)
    return w.squeeze(1) if w.dim() == 4 else w


def _bmm_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    p: Padded,
    parts: Sequence[tuple[torch.Tensor | None, torch.Tensor, int, int]],
    scale: float,
    transposed: TransposedB | None,
) -> None:
    dtype = y.dtype
    first = min(off for _, _, off, _ in parts)  # the parts cover first..end without gaps
    end = max(off + size for _, _, off, size in parts)
    xg = x.index_select(0, p.gather).view(p.span, p.width, -1)
    delta = torch.empty(p.span, p.width, end - first, dtype=dtype)
    for a, b, off, size in parts:
        if a is None:  # already shrunk; padding rows are masked again here
            h = xg.to(dtype) * p.mask
        else:
            h = torch.bmm(xg.to(dtype), _block(a, p).transpose(1, 2).to(dtype)) * p.mask
        if scale != 1.0:
            h = h * scale
        if transposed is None:
            bt = _block(b, p)[:, :size].transpose(1, 2)
        else:
            bt = transposed.block(b, p.lo, p.span)[:, :, :size]
        delta[:, :, off - first : off - first + size] = torch.bmm(h.to(dtype), bt.to(dtype))
    # Padding rows add exact zeros onto a LoRA row; -1 rows are never indexed.
    y[:, first:end].index_add_(0, p.gather, delta.view(-1, end - first))


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
    transposed: TransposedB | None = None,
    kernel: Kernel | None = None,
) -> None:
    """y[r, off:off+size] += ((x[r] @ A.T) * scale) @ B.T for each LoRA row r, each part
    (A, B, off, size) of its slot, computed in y's dtype (LoRA weights kept in a narrower
    one, --lora-dtype, are widened, as the kernel reads them); A None: x is already shrunk
    (expand only). Rows beyond
    the mapping (none in vLLM 0.32's CPU runner) and -1 rows are left as they are.
    `transposed`: B in the layout batched matmuls read fastest (decode steps). `kernel`:
    the C kernel (serving/lora_kernel.py), used for batches of few LoRA rows it fits."""
    if not groups.segments:
        return
    if kernel is not None and transposed is not None:
        rows = groups.kernel_rows()
        if rows is not None and kernel.add(y, x, rows, parts, scale, transposed):
            return
    if groups.padded is not None:
        _bmm_rows(y, x, groups.padded, parts, scale, transposed)
        return
    dtype = y.dtype
    if groups.rows is None:
        for slot, s, e in groups.segments:
            xs = x[s:e]
            for a, b, off, size in parts:
                h = xs if a is None else torch.mm(xs.to(dtype), slot_weights(a, slot).t().to(dtype))
                if scale != 1.0:
                    h = h * scale
                w = slot_weights(b, slot)[:size]
                y[s:e, off : off + size].addmm_(h.to(dtype), w.t().to(dtype))
        return
    xs = x.index_select(0, groups.rows)
    first = min(off for _, _, off, _ in parts)
    end = max(off + size for _, _, off, size in parts)
    delta = torch.zeros(xs.size(0), end - first, dtype=dtype)
    for slot, s, e in groups.segments:
        for a, b, off, size in parts:
            at = None if a is None else slot_weights(a, slot).t().to(dtype)
            h = xs[s:e] if at is None else torch.mm(xs[s:e].to(dtype), at)
            if scale != 1.0:
                h = h * scale
            w = slot_weights(b, slot)[:size]
            delta[s:e, off - first : off - first + size] = torch.mm(h.to(dtype), w.t().to(dtype))
    y[:, first:end].index_add_(0, groups.rows, delta)

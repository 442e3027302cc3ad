"""Attention for training on CPU: fp32, and per sequence in padding-free packed rows.

transformers' `sdpa` path is slow for CPU training in two ways, both measured on SmolLM2-135M
with bf16 autocast (docs/benchmarks.md):
- Under autocast RoPE hands it fp32 queries and keys but a bf16 value; torch's CPU attention
  backward in these dtypes ran 3x slower than in fp32. Here q, k and v are fp32 throughout
  (autocast off inside the call), which is also at least as precise.
- A packed row (trl's padding-free collator: several examples in one row, `cu_seq_lens_q`
  marking where each starts) gets a block-diagonal L x L mask, so every row pays attention
  over the whole row: 8 examples in a 524-token row cost 8x the attention they need and
  ~20% of the step. Here each example runs its own causal attention, nothing else.
Anything else (padded batches, decoding with a KV cache, a mask from the caller) goes to
transformers' own sdpa function with fp32 inputs. On CUDA the trainer keeps `sdpa` (flash
kernels there already take `cu_seq_lens`); this is never installed for a GPU run.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

CPU_ATTENTION = "loraplex_cpu"


def cpu_training_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (batch, seq, heads, head_dim)."""
    starts: torch.Tensor | None = kwargs.get("cu_seq_lens_q")
    bounds = starts.tolist() if starts is not None else []
    packed = (
        bool(bounds)
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no KV cache: the row attends to itself only
        and bounds[-1] == query.shape[2]
    )
    dtype = query.dtype  # what the caller's sdpa would have returned
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        if not packed:
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                **kwargs,
            )  # fmt: skip
            return out.to(dtype), None
        p = dropout if module.training else 0.0
        pieces = [
            _causal(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout=p, scale=scaling)
            for s, e in itertools.pairwise(bounds)
            if e > s
        ]
        out = torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous().to(dtype), None


def _causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, dropout: float,
    scale: float | None,
) -> torch.Tensor:  # fmt: skip
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key/value heads
    return F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
    )


def register() -> str:
    """Make `CPU_ATTENTION` a valid `attn_implementation` (idempotent); return its name."""
    AttentionInterface.register(CPU_ATTENTION, cpu_training_attention)
    # The mask is sdpa's: used as is by padded batches, ignored by packed rows.
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    return CPU_ATTENTION


def use_cpu_training_attention(model: Any) -> bool:
    """Switch a model loaded with `sdpa` to `CPU_ATTENTION`; False where it cannot (a model
    class that does not take pluggable attention functions, or one already on another)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not getattr(model, "is_backend_compatible", lambda: False)():
        return False
    model.set_attn_implementation(register())
    return True

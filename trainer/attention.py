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
- A shared-prefix row (trainer/packing.py: the examples' common prompt once, then each
  example's remainder) has every later segment attend to the prefix and to itself.
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
# Attention keyword (transformers passes a model's extra keywords down to attention
# functions): the packed row's first n tokens are a prefix every later segment attends to.
SHARED_PREFIX = "loraplex_shared_prefix"


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
        shared = int(kwargs.get(SHARED_PREFIX) or 0)  # trainer/packing.py: [0, shared) first
        if shared and bounds[:2] != [0, shared]:
            raise ValueError(f"a shared prefix ({shared} tokens) must be the row's first segment")
        pieces = [
            _segment(query, key, value, s, e, shared if s else 0, dropout=p, scale=scaling)
            for s, e in itertools.pairwise(bounds)
            if e > s
        ]
        out = torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous().to(dtype), None


def _segment(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: int, end: int,
    shared: int, *, dropout: float, scale: float | None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of segment [start, end); with `shared`, it also sees the row's first
    `shared` tokens, as it would following that prefix alone."""
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key/value heads
    q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
    if not shared:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
        )
    k = torch.cat([key[:, :, :shared], k], dim=2)
    v = torch.cat([value[:, :, :shared], v], dim=2)
    n = end - start
    mask = torch.ones(n, shared + n, dtype=torch.bool, device=query.device).tril(shared)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
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

"""The LM head of SFT and DPO training on CPU: next-token log-probs of the trained positions only.

trl 1.16's SFTTrainer replaces the model's forward with a fused LM head (called with
`fused_lm_head=True`) that never builds the whole `(batch, seq, vocab)` logits. On CUDA it
scores only the positions that have a label. Everywhere else it scores every position (fixed
tile shapes keep compilers from recompiling), in torch ops that fold each vocabulary tile in
fp32 and accumulate the backward GEMMs in fp32. On a CPU that made the head the largest part
of a step: on SmolLM2-135M (49,152-token vocabulary) a 524-token packed row with 200 trained
tokens spent 1.1 s in it, where one bf16 GEMM per chunk of the 200 trained positions costs
0.17 s (docs/benchmarks.md).

`use_compact_cpu_head` wraps trl's forward on a CPU model. Calls it can serve exactly (the
plain `lm_head` linear, no bias, no logit scaling or soft-capping, labels shifted here, no MoE
router loss) get `CompactHead`; every other call, and every call without `fused_lm_head`,
goes to trl's forward unchanged. `CompactHead` computes each chunk's logits once, in the
autocast dtype as transformers' own head would, and the gradient of each log-prob with them
(softmax minus one-hot, times the head), so backward only scales those rows: no logits are
kept, and a chunk holds at most `CHUNK_ELEMENTS` of them. Entropy, top-1 and the mean logit
(trl's logged metrics) come from the same logits, without gradient. SFT and DPO both use it.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MB in fp32 (~4 such buffers live at once)
# The per-token outputs trl 1.16 asks its fused head for (besides log_probs)
SFT_OUTPUTS = ("entropy", "is_top1")
DPO_OUTPUTS = ("entropy", "mean_logits", "is_top1")  # without WPO weighting


class CompactHead(torch.autograd.Function):
    """(hidden [N, H], head weight [V, H], targets [N], ..., `rows` per chunk) ->
    log p(target), entropy, mean logit, top-1, each [N]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
        dtype: torch.dtype, with_grad: bool, with_mean: bool, rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        head = weight.to(dtype)
        log_probs, entropy, mean, top1, grads = [], [], [], [], []
        for start in range(0, hidden.shape[0], rows):
            target = targets[start : start + rows, None]
            logits = (hidden[start : start + rows].to(dtype) @ head.t()).float()
            log_z = logits.logsumexp(-1, keepdim=True)
            log_probs.append((logits.gather(-1, target) - log_z)[:, 0])
            top1.append(logits.argmax(-1) == target[:, 0])  # the first maximum, as trl counts
            if with_mean:
                mean.append(logits.mean(-1))
            log_p = logits.sub_(log_z)  # the logits' memory, reused
            probs = log_p.exp()
            entropy.append(-(probs * log_p).sum(-1))
            if with_grad:  # d log p(target) / d hidden = (one-hot - softmax) @ head
                one_hot_minus_p = probs.neg_().scatter_add_(-1, target, _ones(target, probs))
                grads.append((one_hot_minus_p.to(dtype) @ head).float())
        ctx.save_for_backward(_cat(grads, hidden.new_zeros(0, hidden.shape[1])))
        ctx.hidden_dtype = hidden.dtype
        # Each output its own tensor (even when empty): non-differentiable ones are marked
        lp, ent, mean_logits = (_cat(x, hidden.new_zeros(0)) for x in (log_probs, entropy, mean))
        is_top1 = _cat(top1, targets.new_zeros(0, dtype=torch.bool))
        ctx.mark_non_differentiable(ent, mean_logits, is_top1)
        return lp, ent, mean_logits, is_top1

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_log_probs: torch.Tensor | None, *_: Any
    ) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        (grads,) = ctx.saved_tensors
        if grad_log_probs is None:
            return None, None, None, None, None, None, None
        grad = (grad_log_probs.float()[:, None] * grads).to(ctx.hidden_dtype)
        return grad, None, None, None, None, None, None


def _ones(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(index.shape, dtype=like.dtype, device=like.device)


def _cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else empty


def serves(model: Any) -> bool:
    """Whether `CompactHead` computes exactly what trl's fused head would for `model`."""
    head = model.get_output_embeddings()
    text = model.config.get_text_config()
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and getattr(text, "final_logit_softcapping", None) is None
        and all(
            getattr(text, name, None) in (None, 1.0)
            for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
        )
    )


def use_compact_cpu_head(model: Any, *, outputs: tuple[str, ...] = SFT_OUTPUTS) -> bool:
    """Wrap the fused forward trl installed on `model` (the base under any PEFT wrapper),
    computing the per-token `outputs` trl asked for; False, leaving trl's head in place,
    where `serves` says no, an output is not one `CompactHead` computes, or not on CPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.device.type != "cpu" or not serves(base) or not set(outputs) <= set(DPO_OUTPUTS):
        return False
    trl_forward = base.forward

    @functools.wraps(type(base).forward)  # generate validates kwargs against the signature
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if (
            not kwargs.get("fused_lm_head")
            or labels is None
            or kwargs.get("shift_labels") is not None
            or kwargs.get("output_router_logits")
        ):
            return trl_forward(*args, **kwargs)
        return _compact_forward(self, args, kwargs, with_mean="mean_logits" in outputs)

    forward.compact_cpu_head = True  # type: ignore[attr-defined]  # what tests look for
    base.forward = types.MethodType(forward, base)
    return True


def _compact_forward(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, with_mean: bool
) -> Any:
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs.pop("fused_lm_head")
    labels = kwargs.pop("labels")[:, 1:]
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("shift_labels", None)
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
    mask = labels != -100
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
    weight = model.get_output_embeddings().weight
    with torch.autocast("cpu", enabled=False):
        log_probs, entropy, mean, top1 = CompactHead.apply(
            hidden[mask], weight, labels[mask], dtype,
            torch.is_grad_enabled() and hidden.requires_grad, with_mean,
            max(1, CHUNK_ELEMENTS // weight.shape[0]),
        )  # fmt: skip

    def full(x: torch.Tensor) -> torch.Tensor:  # zero where the label is -100, as trl's
        return x.new_zeros(mask.shape).masked_scatter(mask, x)

    log_probs = full(log_probs)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=full(entropy),
        mean_logits=full(mean) if with_mean else None,
        is_top1=full(top1),
        label_mask=mask,
    )

"""Exact-match probe: greedy answers to training and held-out prompts vs. the references;
and, for preference data, the preferred-vs-rejected log-likelihood margin.

The registry's promotion gate reads these numbers. A prompt is the conversation up to the
last trained assistant turn; the reference is that turn's content (for a preference pair, the
preferred answer). Answers are compared after collapsing whitespace, so a model that says
exactly the trained answer scores 1. The margin of a pair is log p(preferred | prompt) -
log p(rejected | prompt), each the sum of the answer's token log-probabilities (the tokens SFT
would train on: the answer and its end-of-turn token).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.data import IGNORE_INDEX, RunInputs, TokenizedExample, as_chat, tokenize_example
from trainer.formats import Example, PreferenceExample
from trainer.modeling import RuntimePlan, load_adapter_as_served

MAX_NEW_TOKENS_SLACK = 8  # room past the longest reference, so a rambling answer shows
PROBE_BATCH = 8


@dataclass(frozen=True)
class ProbeResult:
    n: int
    exact: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, expected, got

    @property
    def rate(self) -> float:
        return self.exact / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "exact": self.exact, "rate": self.rate, "samples": self.samples}


def _normalise(text: str) -> str:
    return " ".join(text.split())


def probe_pair(example: Example) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, reference answer) for the example's last trained assistant turn."""
    last = max(i for i, m in enumerate(example.messages) if m.role == "assistant" and m.weight == 1)
    return as_chat(example.messages[:last]), example.messages[last].content


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], *, max_new_tokens: int
) -> list[str]:
    """Greedy completions, batched with left padding (decoder-only models continue on the right)."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), PROBE_BATCH):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + PROBE_BATCH]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = "right"
        model.train(was_training)
    return answers


def exact_match_probe(model: Any, tokenizer: Any, examples: Sequence[Example]) -> ProbeResult:
    """Greedy-answer each example's prompt and count answers equal to the reference."""
    if not examples:
        return ProbeResult(n=0, exact=0)
    pairs = [probe_pair(ex) for ex in examples]
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in pairs)
    got = greedy_answers(
        model, tokenizer, [p for p, _ in pairs], max_new_tokens=longest + MAX_NEW_TOKENS_SLACK
    )
    samples: list[dict[str, Any]] = [
        # `messages`: the whole prompt, so serving/validation.py can ask the serving engine.
        {"prompt": prompt[-1]["content"], "messages": prompt, "expected": ref,
         "got": answer.strip()}
        for (prompt, ref), answer in zip(pairs, got, strict=True)
    ]  # fmt: skip
    exact = sum(_normalise(s["expected"]) == _normalise(s["got"]) for s in samples)
    return ProbeResult(n=len(samples), exact=exact, samples=samples)


def probe_sides(model: Any, tokenizer: Any, inputs: RunInputs, *, n: int) -> dict[str, Any]:
    """The probe on the first `n` training and `n` validation examples."""
    sides = {"train": inputs.train[:n], "validation": inputs.valid[:n]}
    return {
        side: exact_match_probe(model, tokenizer, examples).as_dict() if n else None
        for side, examples in sides.items()
    }


def _right_padded(rows: Sequence[TokenizedExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([padded(r.input_ids, pad_id) for r in rows]),
        "labels": torch.tensor([padded(r.labels, IGNORE_INDEX) for r in rows]),
        "attention_mask": torch.tensor([padded([1] * len(r.input_ids), 0) for r in rows]),
    }


@torch.no_grad()
def answer_logps(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, max_length: int
) -> list[float]:
    """Summed log-probability of each example's trained answer tokens given what precedes."""
    was_training = model.training
    model.eval()
    rows = [tokenize_example(tokenizer, ex, max_length=max_length) for ex in examples]
    totals: list[float] = []
    try:
        for start in range(0, len(rows), PROBE_BATCH):
            part = _right_padded(rows[start : start + PROBE_BATCH], pad_id=tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in part.items()}
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            logits = model(**inputs).logits
            # Position t predicts token t + 1.
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = batch["labels"][:, 1:]
            picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            totals.extend((picked * (targets != IGNORE_INDEX)).sum(dim=1).tolist())
    finally:
        model.train(was_training)
    return totals


def preference_margin(
    model: Any, tokenizer: Any, pairs: Sequence[PreferenceExample], *, max_length: int
) -> dict[str, Any] | None:
    """Mean log p(preferred) - log p(rejected) over `pairs`, and the share where it is > 0."""
    if not pairs:
        return None
    kw = {"max_length": max_length}
    good = answer_logps(model, tokenizer, [p.with_answer(p.preferred) for p in pairs], **kw)
    bad = answer_logps(model, tokenizer, [p.with_answer(p.rejected) for p in pairs], **kw)
    margins = [g - b for g, b in zip(good, bad, strict=True)]
    return {
        "n": len(margins),
        "margin": sum(margins) / len(margins),
        "preferred_share": sum(m > 0 for m in margins) / len(margins),
        "logp_preferred": sum(good) / len(good),
        "logp_rejected": sum(bad) / len(bad),
    }


def measure(
    trainer: Any, tokenizer: Any, inputs: RunInputs, *, probe_size: int, max_length: int
) -> dict[str, Any]:
    """Held-out eval loss (trl's: on assistant tokens, or DPO's), the probe, and for preference
    data the margin on the first `probe_size` training and validation pairs, as they stand."""
    result: dict[str, Any] = {"eval_loss": None, "eval_token_accuracy": None}
    if trainer.eval_dataset is not None:
        scores = trainer.evaluate()
        result["eval_loss"] = scores["eval_loss"]
        result["eval_token_accuracy"] = scores.get("eval_mean_token_accuracy")
        if "eval_rewards/margins" in scores:
            result["eval_reward_margin"] = scores["eval_rewards/margins"]
            result["eval_reward_accuracy"] = scores.get("eval_rewards/accuracies")
    result["exact_match"] = probe_sides(trainer.model, tokenizer, inputs, n=probe_size)
    if inputs.pairs_train:
        sides = {"train": inputs.pairs_train, "validation": inputs.pairs_valid}
        result["preference_margin"] = {
            side: preference_margin(
                trainer.model, tokenizer, pairs[:probe_size], max_length=max_length
            )
            for side, pairs in sides.items()
        }
    return result


def probe_as_served(
    base_dir: Path,
    adapter_dir: Path,
    *,
    plan: RuntimePlan,
    tokenizer: Any,
    inputs: RunInputs,
    probe_size: int,
) -> dict[str, Any]:
    """The probe for the written adapter on the unquantized base, as serving loads it."""
    gc.collect()  # the caller dropped the quantized model: let its memory go first
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    model = load_adapter_as_served(base_dir, adapter_dir, plan=plan)
    return probe_sides(model, tokenizer, inputs, n=probe_size)

"""One `generate()` call for a batch of jobs: left-padded rows, per-row adapters, streaming.

`BatchStreamer` receives each step's new token for every row (transformers' streamer
protocol), decodes per row and sends deltas to the row's job; it doubles as the stopping
criterion, so a row that hit a stop string or its own token limit stops there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from serving.engines.textgen import RowDecoder, stop_strings

if TYPE_CHECKING:
    from serving.engines.transformers import Job

BASE_ROW = "__base__"


class BatchStreamer(StoppingCriteria):
    def __init__(self, batch: list[Job], *, tokenizer: Any) -> None:
        eos = tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.rows: list[tuple[Job, int, RowDecoder]] = []
        for job in batch:
            stops = stop_strings(job.request.body)
            for index in range(len(job.prompts) * job.n):
                decoder = RowDecoder(tokenizer, stops=stops, limit=job.limit, eos_ids=eos_ids)
                self.rows.append((job, index, decoder))
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        for (job, index, decoder), token in zip(self.rows, value.view(-1).tolist(), strict=True):
            if decoder.finish_reason is not None:
                continue
            delta = decoder.push(int(token))
            if delta:
                job.emit("delta", index, delta)
            if decoder.finish_reason is not None:
                job.emit("finish", index, decoder.finish_reason)

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [decoder.finish_reason is not None for _, _, decoder in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def finish(self) -> None:
        """Close rows generation left open, then tell each job its usage."""
        usage: dict[int, list[int]] = {}
        for job, index, decoder in self.rows:
            if decoder.finish_reason is None:
                delta = decoder.finish()
                if delta:
                    job.emit("delta", index, delta)
                job.emit("finish", index, decoder.finish_reason)
            usage.setdefault(id(job), [0])[0] += len(decoder.tokens)
        for job in {id(j): j for j, _, _ in self.rows}.values():
            prompt = sum(len(p) for p in job.prompts) * job.n
            completion = usage[id(job)][0]
            job.emit(
                "done",
                {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            )


def generate_kwargs(
    batch: list[Job], *, streamer: BatchStreamer, tokenizer: Any, peft: bool
) -> dict[str, Any]:
    rows: list[list[int]] = []
    names: list[str] = []
    for job in batch:
        adapter = job.request.adapter.name if job.request.adapter else BASE_ROW
        for prompt in job.prompts:
            for _ in range(job.n):
                rows.append(prompt)
                names.append(adapter)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    body = batch[0].request.body
    temperature = body.get("temperature", 1.0)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": max(job.limit for job in batch),
        "streamer": streamer,
        "stopping_criteria": StoppingCriteriaList([streamer]),
        "pad_token_id": pad,
        "do_sample": temperature != 0,
    }
    if temperature != 0:
        kwargs |= {"temperature": temperature, "top_p": body.get("top_p", 1.0), "top_k": 0}
    else:
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    if peft:
        kwargs["adapter_names"] = names
    return kwargs

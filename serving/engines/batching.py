"""One `generate()` call for a batch of slices: left-padded rows, per-row adapters, streaming.

`BatchStreamer` receives each step's new token for every row (transformers' streamer
protocol), decodes per row and sends deltas to the row's job; it doubles as the stopping
criterion, so a row that hit a stop string or its own token limit stops there, and so do the
rows of a request whose client went away. It keeps each request's `progress` current (what
metering charges if the client hangs up) and can take back what a failed attempt counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from serving.engines.textgen import RowDecoder, stop_strings

if TYPE_CHECKING:
    from serving.engines.scheduling import Job, Slice

BASE_ROW = "__base__"


class BatchStreamer(StoppingCriteria):
    def __init__(self, batch: list[Slice], *, tokenizer: Any) -> None:
        eos = tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.batch = batch
        self.rows: list[tuple[Job, int, RowDecoder]] = []
        for part in batch:
            stops = stop_strings(part.job.request.body)
            for index in part.indices:
                decoder = RowDecoder(tokenizer, stops=stops, limit=part.job.limit, eos_ids=eos_ids)
                self.rows.append((part.job, index, decoder))
        self.emitted: set[int] = set()  # id() of jobs sent anything in this attempt
        self._counted: dict[int, list[int]] = {}  # id(job) -> [prompt, completion] counted
        self._prompt_seen = False

    def begin(self) -> None:
        """Count the prompts as processed (the first forward pass reads them all)."""
        for part in self.batch:
            prompt = sum(len(part.job.prompt(row)) for row in part.indices)
            self._count(part.job, prompt=prompt)

    def _count(self, job: Job, *, prompt: int = 0, completion: int = 0) -> None:
        job.progress.prompt_tokens += prompt
        job.progress.completion_tokens += completion
        counted = self._counted.setdefault(id(job), [0, 0])
        counted[0] += prompt
        counted[1] += completion

    def _emit(self, job: Job, *event: Any) -> None:
        self.emitted.add(id(job))
        job.emit(*event)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        for (job, index, decoder), token in zip(self.rows, value.view(-1).tolist(), strict=True):
            if decoder.finish_reason is not None or job.cancelled:
                continue
            before = len(decoder.tokens)
            delta = decoder.push(int(token))
            self._count(job, completion=len(decoder.tokens) - before)
            if delta:
                self._emit(job, "delta", index, delta)
            if decoder.finish_reason is not None:
                self._emit(job, "finish", index, decoder.finish_reason)

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [d.finish_reason is not None or job.cancelled for job, _, d in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def rollback(self) -> None:
        """The attempt failed: take back what it counted (its rows run again, or fail)."""
        for part in self.batch:
            prompt, completion = self._counted.pop(id(part.job), [0, 0])
            part.job.progress.prompt_tokens -= prompt
            part.job.progress.completion_tokens -= completion

    def finish(self) -> None:
        """Close rows generation left open; a job whose last rows these were is done."""
        for job, index, decoder in self.rows:
            if decoder.finish_reason is None and not job.cancelled:
                delta = decoder.finish()
                if delta:
                    self._emit(job, "delta", index, delta)
                self._emit(job, "finish", index, decoder.finish_reason)
        for part in self.batch:
            job = part.job
            job.rows_finished += part.size
            if job.rows_finished == job.rows and not job.cancelled:
                job.emit("done", job.progress.usage())


def generate_kwargs(
    batch: list[Slice], *, streamer: BatchStreamer, tokenizer: Any, peft: bool
) -> dict[str, Any]:
    rows: list[list[int]] = []
    names: list[str] = []
    for part in batch:
        adapter = part.job.request.adapter
        for index in part.indices:
            rows.append(part.job.prompt(index))
            names.append(adapter.name if adapter else BASE_ROW)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    body = batch[0].job.request.body
    temperature = body.get("temperature", 1.0)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": max(part.job.limit for part in batch),
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

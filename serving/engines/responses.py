"""OpenAI response bodies for the in-process engine: a whole completion, or SSE chunks
built from the engine thread's events (delta, finish, done, error)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.engines.scheduling import Job


def _envelope(job: Job, *, chunk: bool) -> dict[str, Any]:
    chat = job.request.endpoint == "chat"
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + job.response_id,
        "object": kind,
        "created": job.created,  # one value for a response and every chunk of its stream
        "model": job.request.body["model"],
    }


def whole_response(
    job: Job, texts: dict[int, list[str]], reasons: dict[int, str], *, usage: dict[str, int]
) -> dict[str, Any]:
    choices = []
    for index in range(len(job.prompts) * job.n):
        text = "".join(texts.get(index, []))
        choice: dict[str, Any] = {"index": index, "finish_reason": reasons.get(index, "length")}
        if job.request.endpoint == "chat":
            # Required by the spec, and nullable: strict clients check `=== null`.
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            choice["logprobs"] = None
        else:
            choice |= {"text": text, "logprobs": None}
        choices.append(choice)
    return {**_envelope(job, chunk=False), "choices": choices, "usage": usage}


async def stream_chunks(job: Job) -> AsyncIterator[dict[str, Any]]:
    """The job's events as chunks; closed before its end (the client went away), it cancels
    the job, so the engine stops generating for it."""
    try:
        async for chunk in _chunks(job):
            yield chunk
    finally:
        job.request.cancelled.set()  # a no-op once the job is done


async def _chunks(job: Job) -> AsyncIterator[dict[str, Any]]:
    chat = job.request.endpoint == "chat"
    started: set[int] = set()
    while True:
        event = await job.events.get()
        kind = event[0]
        if kind == "error":
            error = event[1]
            yield {"error": {"message": error.message, "type": error.type, "param": None,
                             "code": error.code}}  # fmt: skip
            return
        if kind == "done":
            yield {**_envelope(job, chunk=True), "choices": [], "usage": event[1]}
            return
        index = event[1]
        choice: dict[str, Any] = {"index": index, "finish_reason": None}
        if kind == "finish":
            choice["finish_reason"] = event[2]
        if chat:
            delta: dict[str, Any] = {} if kind == "finish" else {"content": event[2]}
            if index not in started:
                delta["role"] = "assistant"
            choice |= {"delta": delta, "logprobs": None}
        else:
            choice |= {"text": event[2] if kind == "delta" else "", "logprobs": None}
        started.add(index)
        yield {**_envelope(job, chunk=True), "choices": [choice]}

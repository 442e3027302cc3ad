"""The deployment's bounds on a completion request, checked by the gateway before an engine
sees it: one tenant's request must not be able to stall, break or crowd out another's.

    rows (prompts x n)   <= serving_max_rows_per_request      param n, or prompt
    prompt text (UTF-8)  <= serving_max_prompt_bytes          param prompt, or messages
    token ids            in [0, the base's vocabulary)        param prompt
    max_tokens           <= the base's context                param max_tokens

Each is a 400 naming the parameter. The cheap static bounds (stop strings, token ids in
int32, n) are schema limits in schemas.py. Everything here is linear in the body, which the
body limit already bounds, so it runs on the event loop.
"""

from __future__ import annotations

from typing import Any

from api.errors import InvalidRequest
from api.settings import Settings
from serving.engines.base import ModelLimits
from serving.engines.textgen import message_text
from serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest


def check_request(body: SamplingRequest, *, settings: Settings, limits: ModelLimits | None) -> None:
    """Raise InvalidRequest for the first bound `body` exceeds."""
    _check_rows(body, limit=settings.serving_max_rows_per_request)
    _check_prompt_bytes(body, limit=settings.serving_max_prompt_bytes)
    if limits is None:  # the engine is not up yet: it answers 503 anyway
        return
    if isinstance(body, CompletionRequest):
        _check_token_ids(body.prompt, vocab_size=limits.vocab_size)
    _check_token_limit(body, context=limits.context)


def prompt_count(body: SamplingRequest) -> int:
    if not isinstance(body, CompletionRequest):
        return 1
    prompt = body.prompt
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return 1
    return len(prompt)


def _check_rows(body: SamplingRequest, *, limit: int) -> None:
    n, prompts = body.n or 1, prompt_count(body)
    if prompts * n > limit:
        raise InvalidRequest(
            f"This request asks for {prompts * n} completions ({prompts} prompt(s) x n={n}); "
            f"at most {limit} are allowed per request.",
            param="n" if n > 1 else "prompt",
            code="too_many_completions",
        )


def _prompt_texts(body: SamplingRequest) -> list[str]:
    if isinstance(body, ChatCompletionRequest):
        return [message_text(m.content) for m in body.messages]
    assert isinstance(body, CompletionRequest)
    prompt: Any = body.prompt
    return [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]


def _check_prompt_bytes(body: SamplingRequest, *, limit: int) -> None:
    size = 0
    for text in _prompt_texts(body):
        # isascii() is O(1) in CPython: most prompts are never copied to count them.
        size += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            chat = isinstance(body, ChatCompletionRequest)
            raise InvalidRequest(
                f"The prompt text is over {limit} bytes, more than this deployment takes.",
                param="messages" if chat else "prompt",
                code="prompt_too_large",
            )


def _check_token_ids(prompt: Any, *, vocab_size: int) -> None:
    if isinstance(prompt, str):
        return
    rows = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
    for row in rows:
        if isinstance(row, str):
            continue
        bad = next((t for t in row if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"Token id {bad} is outside this model's vocabulary (0 to {vocab_size - 1}).",
                param="prompt",
                code="invalid_token_id",
            )


def _check_token_limit(body: SamplingRequest, *, context: int) -> None:
    param, asked = "max_tokens", body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        param, asked = "max_completion_tokens", body.max_completion_tokens
    if asked is not None and asked > context:
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens; {asked} completion "
            "tokens were requested.",
            param=param,
            code="context_length_exceeded",
        )

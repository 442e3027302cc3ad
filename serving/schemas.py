"""Request bodies of POST /v1/chat/completions and /v1/completions.

Only what the gateway reads or checks is declared; everything else a client sends (logprobs,
presence_penalty, vLLM's own extras...) is kept and passed through to the engine.

The static bounds (stop strings, token ids, seed) are schema limits, so /openapi.json shows
them; the ones that depend on the deployment (rows per request, prompt bytes, the model's
vocabulary and context) are checked by serving/bounds.py, and their descriptions say so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

Endpoint = Literal["chat", "completion"]
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 512  # every step checks each stop against the text: keep that cheap
MAX_TOKEN_ID = 2**31 - 1  # int32, as engines hold them; the model's vocabulary is smaller
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields both endpoints share: the model name and the common sampling parameters."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(
        None, ge=1, le=16,
        description="Choices per prompt; prompts x n is capped by the deployment's "
        "`serving_max_rows_per_request` (default 64).",
    )  # fmt: skip
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"Up to {MAX_STOPS} sequences of at most {MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _one_stop_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _one_error(value, handler, f"must be a string or a list of at most {MAX_STOPS} "
                          f"strings of at most {MAX_STOP_CHARS} characters")  # fmt: skip

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def upstream_body(self) -> dict[str, Any]:
        """What the client sent (unset fields left to the engine's defaults)."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(
        description="Text, texts, token ids or lists of token ids; ids must be in the base "
        "model's vocabulary, and all prompts together at most `serving_max_prompt_bytes` "
        "(default 1 MiB) of text and `serving_max_rows_per_request` rows with `n`."
    )

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _one_error(value, handler, "must be a string, a list of strings, a list of "
                          f"token ids (integers 0 to {MAX_TOKEN_ID}) or a list of such lists, "
                          "and no list may be empty")  # fmt: skip

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def _one_error(value: Any, handler: ValidatorFunctionWrapHandler, expected: str) -> Any:
    """Validate a union field, reporting one error on the field itself (so the 400 names
    `param: "prompt"`, not one per union member such as `prompt.list[int].0`)."""
    try:
        return handler(value)
    except ValidationError as e:
        raise ValueError(expected) from e

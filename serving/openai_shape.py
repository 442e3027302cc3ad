"""Engine answers in exactly OpenAI's shape: `conform(body, endpoint=..., chunk=...)`.

vLLM's bodies are OpenAI's plus its own fields (`stop_reason`, `token_ids`, `prompt_logprobs`,
`kv_transfer_params`, `metrics`, a message's `reasoning`...) and nulls where the spec has an
object or leaves the field out (`usage.prompt_tokens_details`, `message.annotations`...). A
strict client's decoder refuses either. Here each level keeps only the fields the official
spec defines (tests/conformance holds the schemas; the conformance test checks both engines),
drops a null the spec does not allow, and fills what the spec requires but an engine may
leave out (`logprobs`, `message.refusal`, `logprobs.refusal`: null). Pure dict work, per
answer and per chunk; the in-process engine's bodies pass through unchanged.
"""

from __future__ import annotations

from typing import Any

from serving.schemas import Endpoint

# field -> may it be null? (False: dropped when null)
_TOP = {"id": False, "object": False, "created": False, "model": False, "choices": False,
        "usage": True, "system_fingerprint": False, "service_tier": False}  # fmt: skip
_CHAT_CHOICE = {"index": False, "message": False, "finish_reason": False, "logprobs": True}
_CHUNK_CHOICE = {"index": False, "delta": False, "finish_reason": True, "logprobs": True}
_TEXT_CHOICE = {"index": False, "text": False, "finish_reason": False, "logprobs": True}
_TEXT_CHUNK_CHOICE = _TEXT_CHOICE | {"finish_reason": True}
_MESSAGE = {"role": False, "content": True, "refusal": True, "tool_calls": False,
            "annotations": False, "function_call": False, "audio": False}  # fmt: skip
_DELTA = {"role": False, "content": True, "refusal": True, "tool_calls": False,
          "function_call": False}  # fmt: skip
_USAGE = {"prompt_tokens": False, "completion_tokens": False, "total_tokens": False,
          "prompt_tokens_details": False, "completion_tokens_details": False}  # fmt: skip
_CHAT_LOGPROBS = ("content", "refusal")
_TEXT_LOGPROBS = {"text_offset": False, "token_logprobs": False, "tokens": False,
                  "top_logprobs": False}  # fmt: skip


def _keep(body: dict[str, Any], fields: dict[str, bool]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k in fields and (v is not None or fields[k])}


def conform(body: dict[str, Any], *, endpoint: Endpoint, chunk: bool) -> dict[str, Any]:
    """`body` (an answer or one stream chunk) with only OpenAI's fields, nulls where the
    spec requires them. An error chunk is returned as it is."""
    if "error" in body:
        return body
    out = _keep(body, _TOP)
    if isinstance(out.get("usage"), dict):
        out["usage"] = _keep(out["usage"], _USAGE)
    out["choices"] = [_choice(c, endpoint=endpoint, chunk=chunk) for c in body.get("choices", [])]
    return out


def _choice(choice: dict[str, Any], *, endpoint: Endpoint, chunk: bool) -> dict[str, Any]:
    if endpoint == "chat":
        out = _keep(choice, _CHUNK_CHOICE if chunk else _CHAT_CHOICE)
        part = "delta" if chunk else "message"
        out[part] = _keep(choice.get(part) or {}, _DELTA if chunk else _MESSAGE)
        if not chunk:
            out[part].setdefault("content", None)
            out[part].setdefault("refusal", None)
        if not out[part].get("tool_calls", True):
            out[part].pop("tool_calls")  # an empty list: none, as OpenAI leaves it out
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):  # both keys required, each a list or null
            out["logprobs"] = {k: logprobs.get(k) for k in _CHAT_LOGPROBS}
        else:
            out["logprobs"] = None
    else:
        out = _keep(choice, _TEXT_CHUNK_CHOICE if chunk else _TEXT_CHOICE)
        out.setdefault("text", "")
        logprobs = choice.get("logprobs")
        out["logprobs"] = _keep(logprobs, _TEXT_LOGPROBS) if isinstance(logprobs, dict) else None
    if "finish_reason" not in out:
        out["finish_reason"] = None if chunk else "stop"
    return out

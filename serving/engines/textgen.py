"""Prompt building and incremental decoding for the in-process engine (no torch here).

`RowDecoder` turns a row's token ids into text deltas as they arrive: it holds back an
incomplete UTF-8 character and any tail that could still become a stop string, so a client
never sees text that a stop sequence later takes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.errors import UnsupportedParameter

# Parameters the in-process engine cannot honour: refused rather than silently ignored.
UNSUPPORTED = (
    "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "response_format",
    "logit_bias", "best_of", "echo", "suffix", "presence_penalty", "frequency_penalty",
)  # fmt: skip
DEFAULT_CHAT_TOKENS = 512
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def check_supported(body: dict[str, Any]) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise UnsupportedParameter(
                f"'{name}' is not supported by this deployment's serving engine "
                "(transformers); use the vLLM engine for it.",
                param=name,
            )


def message_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def prompt_token_ids(tokenizer: Any, endpoint: str, body: dict[str, Any]) -> list[list[int]]:
    """One token-id list per prompt (chat: one; completions: one per prompt given)."""
    if endpoint == "chat":
        messages = [
            {"role": m["role"], "content": message_text(m.get("content"))} for m in body["messages"]
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [list(ids)]
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [tokenizer(prompt)["input_ids"]]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


@dataclass
class RowDecoder:
    tokenizer: Any
    stops: list[str]
    limit: int
    eos_ids: set[int]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already emitted
    finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that can be shown now."""
        if self.finish_reason is not None:
            return ""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush(self._text())
        self.tokens.append(token)
        text = self._text()
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.finish_reason = "stop"
                return self._flush(text[:at])
        if len(self.tokens) >= self.limit:
            self.finish_reason = "length"
            return self._flush(text)
        safe = len(text) - (max(map(len, self.stops)) - 1 if self.stops else 0)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its bytes
            safe = min(safe, len(text) - 1)
        return self._flush(text[: max(safe, self.sent)])

    def finish(self) -> str:
        """Generation ended without eos/stop: release what was held back."""
        if self.finish_reason is None:
            self.finish_reason = "length"
            return self._flush(self._text())
        return ""

    def _text(self) -> str:
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _flush(self, upto: str) -> str:
        delta = upto[self.sent :]
        self.sent = max(self.sent, len(upto))
        return delta

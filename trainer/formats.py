"""Instruction-dataset line formats, normalised to chat messages. Imports no torch.

Accepted JSONL line formats (one JSON object per line):

    {"messages": [{"role": ..., "content": ..., "weight"?: 0|1}, ...]}   -> "chat"
    {"prompt": ..., "completion": ...}                                   -> "prompt_completion"
    {"instruction": ..., "input"?: ..., "output": ...}                   -> "instruction"
    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
     "non_preferred_output": [{"role": "assistant", ...}]}               -> "preference"

The first three are supervised lines: each becomes an `Example`, a list of messages whose
assistant turns carry a weight (1 = trained on, 0 = context only). A preference line (OpenAI's
DPO format) becomes a `PreferenceExample`: a prompt and a preferred and a rejected answer.
A file holds one kind (`SUPERVISED` or `PREFERENCE`); its stats say which. The files API
validates uploads with `DatasetScanner` (streaming, chunk by chunk); the trainer reads a
validated file with `read_examples`.

Exceptions:

    DatasetError               a whole file is unusable (carries up to 20 line problems)
    InvalidExample             one line is unusable (message says what is wrong)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "weight"})
SUPERVISED, PREFERENCE = "supervised", "preference"  # the two kinds of dataset
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
PREFERENCE_INPUT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
OUTPUT_KEYS = frozenset({"role", "content"})
MIN_EXAMPLES = 10  # OpenAI's rule for a fine-tune
MAX_REPORTED_PROBLEMS = 20
CHARS_PER_TOKEN = 4  # rough estimate, good enough for sizing; the trainer counts exactly
UTF8_BOM = b"\xef\xbb\xbf"
HEAD_BYTES = 4  # enough to tell a UTF-8 BOM, UTF-16/32 and compressed files apart
# An example this long is a mistake (training truncates at a few thousand tokens), and the
# cap bounds what validation holds in memory.
MAX_LINE_BYTES = 8 * 1024 * 1024


class InvalidExample(ValueError):
    """One line of a dataset is not a usable training example."""


class DatasetError(ValueError):
    """A dataset file is unusable; `problems` lists `line N: what is wrong` entries."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1  # only meaningful on assistant messages

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            data["weight"] = self.weight
        return data


@dataclass(frozen=True)
class Example:
    messages: tuple[Message, ...]
    format: str
    kind: ClassVar[str] = SUPERVISED

    @property
    def n_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    @property
    def n_messages(self) -> int:
        return len(self.messages)


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt and two answers to it, `preferred` over `rejected` (OpenAI's DPO lines)."""

    prompt: tuple[Message, ...]
    preferred: str
    rejected: str
    format: str = "preference"
    kind: ClassVar[str] = PREFERENCE

    @property
    def n_chars(self) -> int:
        return sum(len(m.content) for m in self.prompt) + len(self.preferred) + len(self.rejected)

    @property
    def n_messages(self) -> int:
        return len(self.prompt) + 2

    def with_answer(self, answer: str) -> Example:
        """The prompt answered by `answer`, the one trained turn (earlier ones are context)."""
        context = tuple(replace(m, weight=0) if m.role == "assistant" else m for m in self.prompt)
        return Example(messages=(*context, Message("assistant", answer)), format=self.format)


AnyExample = Example | PreferenceExample


def _non_empty_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidExample(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidExample(f"{what} must not be empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
            raise InvalidExample(
                f"{what} is not valid Unicode: lone surrogate {value[e.start]!r} "
                f"at character {e.start}"
            ) from None
    return value


def _object(raw: Any, where: str, *, allowed: frozenset[str]) -> dict[str, Any]:
    """`raw`, an object holding only `allowed` keys; else `InvalidExample` naming `where`."""
    if not isinstance(raw, dict):
        raise InvalidExample(f"{where} must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InvalidExample(f"{where} has unknown key(s): {', '.join(unknown)}")
    return raw


def _parse_message(raw: Any, index: int, *, prefix: str = "messages") -> Message:
    where = f"{prefix}[{index}]"
    raw = _object(raw, where, allowed=MESSAGE_KEYS)
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidExample(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    content = _non_empty_string(raw.get("content"), f"{where}.content")
    weight = raw.get("weight", 1)
    if "weight" in raw and role != "assistant":
        raise InvalidExample(f"{where}.weight is only allowed on assistant messages")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise InvalidExample(f"{where}.weight must be 0 or 1, got {weight!r}")
    return Message(role=role, content=content, weight=int(weight))


def _chat(obj: dict[str, Any]) -> Example:
    raw_messages = obj["messages"]
    if not isinstance(raw_messages, list):
        raise InvalidExample("messages must be a list")
    if not raw_messages:
        raise InvalidExample("messages must not be empty")
    messages = tuple(_parse_message(m, i) for i, m in enumerate(raw_messages))
    if not any(m.role == "assistant" and m.weight == 1 for m in messages):
        raise InvalidExample("needs at least one assistant message with weight 1")
    return Example(messages=messages, format="chat")


def _prompt_completion(obj: dict[str, Any]) -> Example:
    prompt = _non_empty_string(obj["prompt"], "prompt")
    completion = _non_empty_string(obj["completion"], "completion")
    return Example(
        messages=(Message("user", prompt), Message("assistant", completion)),
        format="prompt_completion",
    )


def _instruction(obj: dict[str, Any]) -> Example:
    instruction = _non_empty_string(obj["instruction"], "instruction")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise InvalidExample(f"input must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    output = _non_empty_string(obj["output"], "output")
    return Example(
        messages=(Message("user", prompt), Message("assistant", output)), format="instruction"
    )


def _preference_prompt(raw: Any) -> tuple[Message, ...]:
    raw = _object(raw, "input", allowed=PREFERENCE_INPUT_KEYS)
    tools = raw.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidExample(f"input.tools must be a list, got {type(tools).__name__}")
    if tools:  # refused rather than dropped: the answers were judged with those tools in view
        raise InvalidExample("input.tools: tool definitions are not supported in training data")
    parallel = raw.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidExample("input.parallel_tool_calls must be true or false")
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidExample("input.messages must be a non-empty list")
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "weight" in message:
            raise InvalidExample(f"input.messages[{i}].weight: the prompt is never trained on")
    prompt = tuple(_parse_message(m, i, prefix="input.messages") for i, m in enumerate(messages))
    if prompt[-1].role != "user":
        raise InvalidExample("input.messages must end with a user message (the turn answered)")
    return prompt


def _preference_output(raw: Any, key: str) -> str:
    if not isinstance(raw, list) or len(raw) != 1:
        raise InvalidExample(f"{key} must be a list of exactly one assistant message")
    message = _object(raw[0], f"{key}[0]", allowed=OUTPUT_KEYS)
    if message.get("role") != "assistant":
        raise InvalidExample(f"{key}[0].role must be 'assistant', got {message.get('role')!r}")
    return _non_empty_string(message.get("content"), f"{key}[0].content")


def _preference(obj: dict[str, Any]) -> PreferenceExample:
    missing = [key for key in PREFERENCE_KEYS if key not in obj]
    if missing:
        raise InvalidExample(f"preference example lacks {', '.join(missing)}")
    unknown = sorted(set(obj) - set(PREFERENCE_KEYS))
    if unknown:
        raise InvalidExample(f"preference example has unknown key(s): {', '.join(unknown)}")
    prompt = _preference_prompt(obj["input"])
    preferred = _preference_output(obj["preferred_output"], "preferred_output")
    rejected = _preference_output(obj["non_preferred_output"], "non_preferred_output")
    if " ".join(preferred.split()) == " ".join(rejected.split()):
        raise InvalidExample("preferred_output and non_preferred_output are the same answer")
    return PreferenceExample(prompt=prompt, preferred=preferred, rejected=rejected)


def normalize_record(obj: Any) -> AnyExample:
    """Turn one decoded JSON line into an example of either kind, or raise `InvalidExample`."""
    if not isinstance(obj, dict):
        kind = "an array" if isinstance(obj, list) else type(obj).__name__
        raise InvalidExample(f"expected a JSON object, got {kind}")
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return _preference(obj)
    if "messages" in obj:
        return _chat(obj)
    if "prompt" in obj and "completion" in obj:
        return _prompt_completion(obj)
    if "instruction" in obj and "output" in obj:
        return _instruction(obj)
    raise InvalidExample(
        "unknown format: expected keys messages, prompt+completion, instruction+output, or "
        "input+preferred_output+non_preferred_output"
    )


def parse_line(raw: bytes) -> AnyExample | None:
    """Decode one JSONL line (without its newline); None for a blank line."""
    raw = raw.rstrip(b"\r")
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidExample(f"invalid UTF-8 at byte {e.start}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.strip() in ("{", "["):
            raise InvalidExample(
                f"invalid JSON: a line holding only {text.strip()!r}; this looks like "
                "pretty-printed JSON, but JSONL needs each example on one line"
            ) from e
        raise InvalidExample(f"invalid JSON: {e.msg} (column {e.colno})") from e
    except RecursionError:
        raise InvalidExample("invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer over Python's digit limit
        raise InvalidExample(f"invalid JSON: {str(e).split(';')[0]}") from None
    return normalize_record(obj)


# Leading bytes of files that are not UTF-8 text, and what to tell the uploader.
NOT_UTF8_TEXT = (
    (b"\xff\xfe", "file is UTF-16 or UTF-32 (little-endian byte-order mark); save it as UTF-8"),
    (b"\xfe\xff", "file is UTF-16 (big-endian byte-order mark); save it as UTF-8"),
    (b"\x00\x00\xfe\xff", "file is UTF-32 (big-endian byte-order mark); save it as UTF-8"),
    (b"\x1f\x8b", "file is gzip-compressed; upload the uncompressed .jsonl"),
    (b"PK\x03\x04", "file is a zip archive; upload the .jsonl inside it"),
    (b"BZh", "file is bzip2-compressed; upload the uncompressed .jsonl"),
    (b"\xfd7zXZ", "file is xz-compressed; upload the uncompressed .jsonl"),
    (b"%PDF", "file is a PDF, not JSON Lines"),
)


def sniff_not_text(head: bytes) -> str | None:
    """Why a file that starts with `head` (4+ bytes when the file has them) is no JSONL."""
    for magic, why in NOT_UTF8_TEXT:
        if head.startswith(magic):
            return why
    if len(head) >= 2 and (head[0] == 0) != (head[1] == 0):
        return "file looks like UTF-16 without a byte-order mark (NUL bytes); save it as UTF-8"
    return None


@dataclass
class DatasetStats:
    examples: int = 0
    messages: int = 0
    estimated_tokens: int = 0
    longest_example_tokens: int = 0
    longest_example_line: int | None = None
    formats: Counter[str] = field(default_factory=Counter)
    kind: str | None = None  # SUPERVISED or PREFERENCE, from the first example
    kind_line: int | None = None

    def add(self, example: AnyExample, line_no: int) -> None:
        tokens = max(1, example.n_chars // CHARS_PER_TOKEN)
        if self.kind is None:
            self.kind, self.kind_line = example.kind, line_no
        self.examples += 1
        self.messages += example.n_messages
        self.estimated_tokens += tokens
        self.formats[example.format] += 1
        if tokens > self.longest_example_tokens:
            self.longest_example_tokens = tokens
            self.longest_example_line = line_no

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "messages": self.messages,
            "estimated_tokens": self.estimated_tokens,
            "longest_example_tokens": self.longest_example_tokens,
            "longest_example_line": self.longest_example_line,
            "formats": dict(self.formats),
            "kind": self.kind,  # supervised | preference (null: no example)
            "min_examples_for_fine_tune": MIN_EXAMPLES,
            "enough_for_fine_tune": self.examples >= MIN_EXAMPLES,
        }


class DatasetScanner:
    """Validates a JSONL byte stream chunk by chunk; memory bounded by `max_line_bytes`."""

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.stats = DatasetStats()
        self.problems: list[str] = []
        self.n_problems = 0
        self.max_line_bytes = max_line_bytes
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._overlong = False
        self._line_no = 0
        self._head = b""  # the first bytes, held until the encoding can be told
        self._refused = False  # not text at all: one problem said, the rest ignored

    def feed(self, chunk: bytes) -> None:
        if self._refused:
            return
        if self._line_no == 0 and len(self._head) < HEAD_BYTES:
            self._head += chunk
            if len(self._head) < HEAD_BYTES:
                return
            if self._refuse_if_not_text():
                return
            chunk = self._head.removeprefix(UTF8_BOM)
            self._line_no = 1
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._append(chunk[start:end])
            self._end_line()
            start = end + 1
        self._append(chunk[start:])

    def finish(self) -> None:
        if self._refused or (self._line_no == 0 and self._refuse_if_not_text()):
            return
        if self._line_no == 0:  # a file shorter than HEAD_BYTES
            self._line_no = 1
            self._append(self._head.removeprefix(UTF8_BOM))
        if self._pending_len or self._overlong:
            self._end_line()
        if self.stats.examples == 0 and not self.n_problems:
            self._problem("file contains no examples", line_no=None)

    @property
    def ok(self) -> bool:
        return self.n_problems == 0

    def _refuse_if_not_text(self) -> bool:
        why = sniff_not_text(self._head)
        if why is not None:
            self._refused = True
            self._problem(why, line_no=None)
        return self._refused

    def _append(self, piece: bytes) -> None:
        if not piece or self._overlong:
            return
        if self._pending_len + len(piece) > self.max_line_bytes:
            # Stop buffering: the line is refused whatever follows, until its newline.
            self._overlong = True
            self._pending, self._pending_len = [], 0
            return
        self._pending.append(piece)
        self._pending_len += len(piece)

    def _end_line(self) -> None:
        raw = b"".join(self._pending)
        self._pending, self._pending_len = [], 0
        line_no = self._line_no
        self._line_no += 1
        if self._overlong:
            self._overlong = False
            self._problem(f"line is longer than {self.max_line_bytes} bytes", line_no=line_no)
            return
        try:
            example = parse_line(raw)
        except InvalidExample as e:
            self._problem(str(e), line_no=line_no)
            return
        if example is None:
            return
        kind = self.stats.kind
        if kind is not None and example.kind != kind:
            self._problem(
                f"a {example.kind} example in a file of {kind} examples (the first, line "
                f"{self.stats.kind_line}, is {kind}); a file holds one kind",
                line_no=line_no,
            )
            return
        self.stats.add(example, line_no)

    def _problem(self, what: str, *, line_no: int | None) -> None:
        self.n_problems += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(f"line {line_no}: {what}" if line_no else what)


def iter_examples(lines: Iterable[bytes]) -> Iterator[tuple[int, AnyExample]]:
    """Yield (line number, example) for each non-blank line; raise on the first bad one."""
    for line_no, raw in enumerate(lines, start=1):
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
        try:
            example = parse_line(raw.rstrip(b"\n"))
        except InvalidExample as e:
            raise DatasetError(f"line {line_no}: {e}", [f"line {line_no}: {e}"]) from e
        if example is not None:
            yield line_no, example


def read_examples(path: str | Path) -> list[AnyExample]:
    """Read and validate a whole JSONL dataset; raise `DatasetError` listing every problem."""
    scanner = DatasetScanner()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            scanner.feed(chunk)
    scanner.finish()
    if not scanner.ok:
        raise DatasetError(
            f"{path}: {scanner.n_problems} problem(s): " + "; ".join(scanner.problems[:3]),
            scanner.problems,
        )
    with open(path, "rb") as f:
        return [example for _, example in iter_examples(f)]

"""The testing criteria of the Evals API (OpenAI's graders): checked, templated and graded.

Pure logic, no I/O. The API checks criteria when an eval is made (`validate_criteria`); the
worker grades each item: `grade_local` for string_check and text_similarity, and for the
model graders `judge_messages` (what to ask the judge model), then `grade_judgement` (what
its answer means). `item_passed` says whether an item passed all of them.

Templates are OpenAI's: `{{ item.a.b }}`, `{{ item.list[0] }}` (or `.0`),
`{{ sample.output_text }}`. A string is inserted as is, any other value as compact JSON, a
path that does not exist as the empty string. Only paths: no expressions, no filters.

    InvalidRequest
    └── CriterionError   400   a criterion that cannot be accepted; `param` names the field.
                               codes: missing_required_parameter, unknown_parameter,
                               invalid_value, unsupported_grader, unsupported_metric
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from api.errors import InvalidRequest
from api.services.suggest import did_you_mean
from api.services.text_metrics import METRICS, similarity

MAX_CRITERIA = 16
MAX_NAME_CHARS = 256
MAX_TEMPLATE_CHARS = 64 * 1024
MAX_MESSAGES = 32
MAX_CONTENT_PARTS = 64
MAX_LABELS = 64
# A rendered template stops growing here: `{{item.big}}` repeated must not cost gigabytes.
MAX_RENDERED_CHARS = 1024 * 1024
# What of a judge's answer is read and kept.
MAX_JUDGE_CHARS = 64 * 1024

OPERATIONS = ("eq", "ne", "like", "ilike")
ROLES = ("system", "user", "assistant", "developer")
SUPPORTED_TYPES = ("string_check", "text_similarity", "label_model", "score_model")
# OpenAI's, refused here as not supported rather than as unknown.
OPENAI_ONLY_TYPES = ("python", "multi", "endpoint")
OPENAI_ONLY_METRICS = ("meteor", "cosine")
SAMPLING_PARAMS = ("temperature", "top_p", "seed", "max_completions_tokens", "reasoning_effort")

_COMMON = ("type", "name")
_FIELDS = {
    "string_check": (*_COMMON, "input", "reference", "operation"),
    "text_similarity": (*_COMMON, "input", "reference", "evaluation_metric", "pass_threshold"),
    "label_model": (*_COMMON, "model", "input", "labels", "passing_labels"),
    "score_model": (*_COMMON, "model", "input", "range", "pass_threshold", "sampling_params"),
}
_TEXT_PARTS = ("input_text", "output_text")
_MISSING = object()


class CriterionError(InvalidRequest):
    default_code = "invalid_value"


# --- validation ------------------------------------------------------------------------------


def validate_criteria(
    criteria: list[Any], *, param: str = "testing_criteria"
) -> list[dict[str, Any]]:
    """The criteria as stored: known fields only, defaults filled, every name set and unique
    (a missing or empty one becomes `{type}-{index}`). Raises CriterionError naming the field."""
    if not isinstance(criteria, list) or not 1 <= len(criteria) <= MAX_CRITERIA:
        raise CriterionError(f"Give 1 to {MAX_CRITERIA} testing criteria as a list.", param=param)
    out = [_criterion(c, where=f"{param}[{i}]") for i, c in enumerate(criteria)]
    seen: set[str] = set()
    for i, c in enumerate(out):
        if c["name"] in seen:
            message = f"Testing criteria names must be unique; '{c['name']}' is used twice."
            raise CriterionError(message, param=f"{param}[{i}].name")
        seen.update([c["name"]] if c["name"] else [])
    for i, c in enumerate(out):
        if not c["name"]:
            c["name"] = _unused(f"{c['type']}-{i}", seen)
            seen.add(c["name"])
    return out


def _unused(name: str, taken: set[str]) -> str:
    k, free = 1, name
    while free in taken:
        free, k = f"{name}-{k}", k + 1
    return free


def _criterion(raw: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CriterionError("A testing criterion must be an object.", param=where)
    fields = _Fields({k: v for k, v in raw.items() if v is not None}, where)  # null: not sent
    kind = fields.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise _unsupported_type(kind, param=fields.param("type"))
    for key in fields.raw:
        if key not in _FIELDS[kind]:
            message = f"Unknown parameter for a {kind} grader: '{str(key)[:64]}'."
            raise CriterionError(message, param=fields.param(key), code="unknown_parameter")
    name = fields.text("name", default="", limit=MAX_NAME_CHARS)
    return {"type": kind, "name": name if name.strip() else "", **_CHECKS[kind](fields)}


def _unsupported_type(kind: Any, *, param: str) -> CriterionError:
    supported = ", ".join(SUPPORTED_TYPES)
    if kind in OPENAI_ONLY_TYPES:
        message = f"The {kind} grader is not supported by this deployment; use one of: {supported}."
    else:
        shown = str(kind)[:64] if isinstance(kind, str) else type(kind).__name__
        hint = did_you_mean(shown, SUPPORTED_TYPES)
        message = f"Unknown grader type '{shown}'; supported: {supported}.{hint}"
    return CriterionError(message, param=param, code="unsupported_grader")


@dataclass(frozen=True)
class _Fields:
    """One criterion's fields (or a message's), each read and checked with its param path."""

    raw: dict[str, Any]
    where: str

    def param(self, key: Any) -> str:
        return f"{self.where}.{str(key)[:64]}"

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if self.raw.get(key) is not None:
            return self.raw[key]
        if default is not _MISSING:
            return default
        message = f"Missing required parameter: '{self.param(key)}'."
        raise CriterionError(message, param=self.param(key), code="missing_required_parameter")

    def text(self, key: str, *, default: Any = _MISSING, limit: int = MAX_TEMPLATE_CHARS) -> str:
        return _text(self.get(key, default), param=self.param(key), limit=limit)

    def number(self, key: str, *, default: Any = _MISSING) -> float:
        return _number(self.get(key, default), param=self.param(key))

    def choice(self, key: str, choices: Sequence[str]) -> str:
        value = self.get(key)
        if value not in choices:
            message = f"{key} must be one of: {', '.join(choices)}."
            raise CriterionError(message, param=self.param(key))
        return str(value)

    def model(self) -> str:
        model = self.text("model", limit=MAX_NAME_CHARS).strip()
        if not model:
            raise CriterionError("model must name a model.", param=self.param("model"))
        return model


def _string_check(f: _Fields) -> dict[str, Any]:
    return {
        "input": f.text("input"),
        "reference": f.text("reference"),
        "operation": f.choice("operation", OPERATIONS),
    }


def _text_similarity(f: _Fields) -> dict[str, Any]:
    if f.get("evaluation_metric") in OPENAI_ONLY_METRICS:
        message = (
            f"The {f.get('evaluation_metric')} metric is not supported by this deployment; "
            f"use one of: {', '.join(METRICS)}."
        )
        raise CriterionError(message, param=f.param("evaluation_metric"), code="unsupported_metric")
    threshold = f.number("pass_threshold")
    if not 0 <= threshold <= 1:
        raise CriterionError("pass_threshold must be from 0 to 1.", param=f.param("pass_threshold"))
    return {
        "input": f.text("input"),
        "reference": f.text("reference"),
        "evaluation_metric": f.choice("evaluation_metric", METRICS),
        "pass_threshold": threshold,
    }


def _label_model(f: _Fields) -> dict[str, Any]:
    labels = _labels(f.get("labels"), param=f.param("labels"))
    passing = _labels(f.get("passing_labels"), param=f.param("passing_labels"))
    for i, label in enumerate(passing):
        if label not in labels:
            message = f"passing_labels must be among labels; '{label[:64]}' is not."
            raise CriterionError(message, param=f"{f.param('passing_labels')}[{i}]")
    input = check_messages(f.get("input"), param=f.param("input"))
    return {"model": f.model(), "input": input, "labels": labels, "passing_labels": passing}


def _score_model(f: _Fields) -> dict[str, Any]:
    low, high = _range(f.get("range", [0, 1]), param=f.param("range"))
    # OpenAI leaves an absent threshold unsaid; here it is the range's midpoint.
    threshold = f.number("pass_threshold", default=(low + high) / 2)
    if not low <= threshold <= high:
        message = f"pass_threshold must lie within range [{low:g}, {high:g}]."
        raise CriterionError(message, param=f.param("pass_threshold"))
    out = {
        "model": f.model(),
        "input": check_messages(f.get("input"), param=f.param("input")),
        "range": [low, high],
        "pass_threshold": threshold,
    }
    if "sampling_params" in f.raw:
        out["sampling_params"] = _sampling(f.get("sampling_params"), f.param("sampling_params"))
    return out


_CHECKS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "string_check": _string_check,
    "text_similarity": _text_similarity,
    "label_model": _label_model,
    "score_model": _score_model,
}


def _text(value: Any, *, param: str, limit: int) -> str:
    if not isinstance(value, str):
        raise CriterionError(f"{param} must be a string.", param=param)
    if len(value) > limit:
        raise CriterionError(f"{param} is over {limit} characters.", param=param)
    return value


def _number(value: Any, *, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CriterionError(f"{param} must be a number.", param=param)
    return float(value)


def _range(value: Any, *, param: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise CriterionError("range must be two numbers: [min, max].", param=param)
    low, high = (_number(v, param=param) for v in value)
    if not low < high:
        raise CriterionError("range must be [min, max] with min < max.", param=param)
    return low, high


def _labels(value: Any, *, param: str) -> list[str]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LABELS:
        raise CriterionError(f"{param} must be a list of 1 to {MAX_LABELS} labels.", param=param)
    seen: set[str] = set()
    for i, label in enumerate(value):
        text = _text(label, param=f"{param}[{i}]", limit=MAX_NAME_CHARS)
        # The judge's answer is matched without regard to case, so neither may labels be.
        if not text.strip() or text.casefold() in seen:
            raise CriterionError("Labels must be non-empty and unique.", param=f"{param}[{i}]")
        seen.add(text.casefold())
    return list(value)


def check_messages(value: Any, *, param: str) -> list[dict[str, str]]:
    """A list of templated messages, as criteria and completions runs take them."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise CriterionError(f"input must be a list of 1 to {MAX_MESSAGES} messages.", param=param)
    return [_message(m, param=f"{param}[{i}]") for i, m in enumerate(value)]


def _message(value: Any, *, param: str) -> dict[str, str]:
    """{role, content} or {type: message, role, content}; content as _content takes it."""
    if not isinstance(value, dict) or value.get("type", "message") != "message":
        raise CriterionError("Each input message must be a {role, content} object.", param=param)
    if set(value) - {"type", "role", "content"}:
        raise CriterionError("A message has only type, role and content.", param=param)
    f = _Fields(value, param)
    content = _content(f.get("content"), param=f.param("content"))
    return {"type": "message", "role": f.choice("role", ROLES), "content": content}


def _content(value: Any, *, param: str) -> str:
    """Text, a text part, or a list of them (joined by newlines); images and audio refused."""
    parts = value if isinstance(value, list) else [value]
    if not 1 <= len(parts) <= MAX_CONTENT_PARTS:
        raise CriterionError(f"content takes 1 to {MAX_CONTENT_PARTS} parts.", param=param)
    texts: list[str] = []
    for part in parts:
        text = (
            part.get("text") if isinstance(part, dict) and part.get("type") in _TEXT_PARTS else part
        )
        if not isinstance(text, str):
            message = "content must be text: strings or input_text/output_text parts (no images)."
            raise CriterionError(message, param=param)
        texts.append(text)
    return _text("\n".join(texts), param=param, limit=MAX_TEMPLATE_CHARS)


def _sampling(value: Any, param: str) -> dict[str, Any]:
    """Kept for the worker; reasoning_effort is accepted and has no effect on these models."""
    if not isinstance(value, dict):
        raise CriterionError("sampling_params must be an object.", param=param)
    f = _Fields({k: v for k, v in value.items() if v is not None}, param)
    out: dict[str, Any] = {}
    for key, v in f.raw.items():
        if key not in SAMPLING_PARAMS:
            message = f"Unknown sampling parameter; known: {', '.join(SAMPLING_PARAMS)}."
            raise CriterionError(message, param=f.param(key), code="unknown_parameter")
        if key == "reasoning_effort":
            out[key] = f.text(key, limit=16)
        elif key in ("seed", "max_completions_tokens"):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
                raise CriterionError(f"{key} must be a whole number >= 0.", param=f.param(key))
            out[key] = v
        else:
            out[key] = f.number(key)
    return out


# --- templates -------------------------------------------------------------------------------

# `[^{}]*` cannot run past a brace, so each attempt ends at the next one: linear time.
_PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")


def render(template: str, ctx: Mapping[str, Any]) -> str:
    """`template` with each `{{ path }}` replaced by its value in `ctx` ({"item", "sample"});
    a missing path gives "". The result is cut at MAX_RENDERED_CHARS."""
    pieces: list[str] = []
    size, pos = 0, 0
    values: dict[str, str] = {}
    for match in _PLACEHOLDER.finditer(template):
        path = match.group(1).strip().replace("[", ".").replace("]", "")
        if path not in values:
            values[path] = _as_text(_lookup(ctx, path.split(".")))
        pieces += [template[pos : match.start()], values[path]]
        size += match.start() - pos + len(values[path])
        pos = match.end()
        if size >= MAX_RENDERED_CHARS:
            break
    else:
        pieces.append(template[pos:])
    return "".join(pieces)[:MAX_RENDERED_CHARS]


def _lookup(value: Any, keys: list[str]) -> Any:
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key, _MISSING)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
    return value


def _as_text(value: Any) -> str:
    if value is _MISSING:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def render_messages(messages: list[dict[str, Any]], ctx: Mapping[str, Any]) -> list[dict[str, str]]:
    """A criterion's (validated) input messages as chat messages, their content rendered."""
    return [{"role": m["role"], "content": render(m["content"], ctx)} for m in messages]


# --- local grading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GradeResult:
    name: str
    type: str  # the criterion's: string_check, text_similarity, label_model, score_model
    passed: bool
    score: float
    sample: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """One entry of an output item's `results`; `type` as OpenAI names it there."""
        return {
            "name": self.name,
            "type": f"{self.type.replace('_', '-')}-grader",
            "passed": self.passed,
            "score": self.score,
            "sample": self.sample,
        }


def grade_local(criterion: dict[str, Any], ctx: Mapping[str, Any]) -> GradeResult:
    """Grade a string_check or text_similarity criterion (no model needed)."""
    text, reference = render(criterion["input"], ctx), render(criterion["reference"], ctx)
    if criterion["type"] == "string_check":
        passed = _string_check_passes(text, reference, operation=criterion["operation"])
        return GradeResult(criterion["name"], "string_check", passed, float(passed))
    if criterion["type"] == "text_similarity":
        score = similarity(text, reference, metric=criterion["evaluation_metric"])
        passed = score >= criterion["pass_threshold"]
        return GradeResult(criterion["name"], "text_similarity", passed, score)
    raise ValueError(f"{criterion['type']} needs a judge: judge_messages, grade_judgement")


def _string_check_passes(text: str, reference: str, *, operation: str) -> bool:
    """eq / ne: exact (in)equality; like: `reference` occurs in `text`; ilike: ignoring case."""
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    if operation == "like":
        return reference in text
    if operation == "ilike":
        return reference.casefold() in text.casefold()
    raise ValueError(f"unknown operation {operation!r}")


# --- model judges ----------------------------------------------------------------------------


def judge_messages(criterion: dict[str, Any], ctx: Mapping[str, Any]) -> list[dict[str, str]]:
    """What to send the judge model: the rendered input (developer as system, which chat
    templates know), with the answer's form told at the end of the last user message (or in
    a new user message when the input does not end with one)."""
    messages = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in render_messages(criterion["input"], ctx)
    ]
    if criterion["type"] == "label_model":
        listed = ", ".join(json.dumps(label, ensure_ascii=False) for label in criterion["labels"])
        instruction = f"Answer with exactly one of these labels and nothing else: {listed}."
    else:
        low, high = criterion["range"]
        instruction = f"Answer with only a number from {low:g} to {high:g} and nothing else."
    if messages[-1]["role"] == "user":
        messages[-1]["content"] += "\n\n" + instruction
    else:
        messages.append({"role": "user", "content": instruction})
    return messages


def grade_judgement(criterion: dict[str, Any], output_text: str) -> GradeResult:
    """Grade a label_model or score_model criterion from its judge's answer."""
    text = output_text[:MAX_JUDGE_CHARS]
    name, kind = criterion["name"], criterion["type"]
    if kind == "label_model":
        label = parse_label(text, criterion["labels"])
        passed = label in criterion["passing_labels"]
        return GradeResult(name, kind, passed, float(passed), {"output_text": text, "label": label})
    if kind == "score_model":
        low, high = criterion["range"]
        value = parse_score(text)
        score = low if value is None else min(max(value, low), high)
        passed = value is not None and score >= criterion["pass_threshold"]
        sample = {"output_text": text, "score": None if value is None else score}
        return GradeResult(name, kind, passed, score, sample)
    raise ValueError(f"{kind} is graded locally: grade_local")


_WRAPPING = " \t\r\n\"'`*\u201c\u201d\u2018\u2019"  # spaces, quotes, markdown bold
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label the answer is (ignoring case, quotes and a final period), else the one
    named earliest in it as whole words (the longer at the same place); None if none is."""
    answer = _bare(text)
    for label in labels:
        if _bare(label) == answer:
            return label
    found: list[tuple[int, int, str]] = []
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), -len(label), label))
    return min(found)[2] if found else None


def _bare(text: str) -> str:
    return text.strip(_WRAPPING).rstrip(".").strip(_WRAPPING).casefold()


def parse_score(text: str) -> float | None:
    """The first number in the answer, or None."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def item_passed(results: list[GradeResult]) -> bool:
    """An item passes when every criterion passed it."""
    return all(r.passed for r in results)

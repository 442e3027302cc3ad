"""Strict validation of response bodies against the vendored official OpenAI schemas.

`openai_schemas.json` is cut from the official OpenAPI document by
`refresh_openai_schemas.py` (source commit inside). Two adjustments, both toward the spec's
intent and neither a loosening:
- leftover OpenAPI 3.0 keywords mean what OpenAPI 3.0 defined: `nullable: true` (a few
  stream-chunk fields) is "or null" (JSON Schema would ignore it and refuse the null), and
  a boolean `exclusiveMinimum` makes `minimum` exclusive (`learning_rate_multiplier` > 0).
- strict: every object schema that lists its properties and composes nothing refuses
  properties it does not list, unless they are one of Loraplex's documented extensions
  (EXTENSIONS, docs/openai-compatibility.md). Unknown fields are how engine-only fields
  (vLLM's `stop_reason`, `prompt_logprobs`, ...) leak to clients with strict decoders.
The spec has no schema for a completions stream chunk (its docs say chunks are
`CreateCompletionResponse`s); `CompletionStreamChunk` is that schema with the two nulls the
spec itself prescribes for streams: `usage` null on every chunk but the usage one (the
`stream_options.include_usage` text) and `finish_reason` null until a choice ends (as in its
chat chunk schema).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMAS = Path(__file__).with_name("openai_schemas.json")
PREFIX = "#/components/schemas/"

# Fields Loraplex adds to OpenAI objects, by schema (documented in
# docs/openai-compatibility.md). Anything else outside the spec is a violation.
EXTENSIONS: dict[str, set[str]] = {
    "Model": {"root", "parent"},
    "OpenAIFile": {"sha256", "stats"},
    "FineTuningJob": {"user_provided_suffix", "attempts", "config"},
    "FineTuneSupervisedHyperparameters": {"learning_rate"},
    "FineTuneDPOHyperparameters": {"learning_rate"},
    "ListPaginatedFineTuningJobsResponse": {"first_id", "last_id"},
    "ListFineTuningJobEventsResponse": {"first_id", "last_id"},
    "ListFineTuningJobCheckpointsResponse": set(),  # first_id/last_id are the spec's own
}

# What OpenAI's API reference has that the vendored spec commit predates: pausing and resuming
# a fine-tuning job (POST .../pause, .../resume, answering the job) and the job's `paused`
# status. Added here, to the same schemas, rather than left unchecked.
ADDED_OPERATIONS = {
    "POST /fine_tuning/jobs/{fine_tuning_job_id}/pause": "FineTuningJob",
    "POST /fine_tuning/jobs/{fine_tuning_job_id}/resume": "FineTuningJob",
}
ADDED_ENUM_VALUES = {("FineTuningJob", "status"): ["paused"]}


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0 leftovers as JSON Schema 2020-12: `nullable: true` is the schema or null;
    a boolean `exclusiveMinimum`/`exclusiveMaximum` qualifies `minimum`/`maximum` (read as
    numbers, `True` would mean "> 1")."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(exclusive), bool) and node.pop(exclusive) and bound in node:
            node[exclusive] = node.pop(bound)
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


COMPOSITION = ("allOf", "anyOf", "oneOf", "$ref")


def _strict(node: Any, extra: frozenset[str] = frozenset()) -> Any:
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "const", "required", "example") else _strict(v))
           for k, v in node.items()}  # fmt: skip
    listed = "properties" in out and "additionalProperties" not in out
    if listed and not any(k in out for k in COMPOSITION):
        out["propertyNames"] = {"enum": sorted(set(out["properties"]) | extra)}
    return out


@cache
def _registry() -> tuple[dict[str, Any], Registry]:
    document = json.loads(SCHEMAS.read_text())
    document["operations"] = {**ADDED_OPERATIONS, **document["operations"]}
    for (name, field), values in ADDED_ENUM_VALUES.items():
        enum = document["components"]["schemas"][name]["properties"][field]["enum"]
        enum += [v for v in values if v not in enum]
    schemas = {}
    for name, schema in document["components"]["schemas"].items():
        extra = frozenset(EXTENSIONS.get(name, ()))
        schemas[name] = _strict(_nullable(copy.deepcopy(schema)), extra)
    chunk = copy.deepcopy(document["components"]["schemas"]["CreateCompletionResponse"])
    chunk["properties"]["usage"]["nullable"] = True
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
    schemas["CompletionStreamChunk"] = _strict(_nullable(chunk))
    root = {"components": {"schemas": schemas}}
    resource = Resource.from_contents(root, default_specification=DRAFT202012)
    registry = Registry().with_resource("openai", resource)
    return document, registry


def source() -> dict[str, str]:
    return dict(_registry()[0]["source"])


def operation_schema(method: str, path: str) -> str:
    """The component a spec operation answers with, e.g. ("GET", "/files") → ListFilesResponse."""
    return str(_registry()[0]["operations"][f"{method.upper()} {path}"])


def violations(body: Any, schema: str) -> list[str]:
    """Every way `body` breaks the named component, as readable lines (empty: conforms)."""
    _, registry = _registry()
    validator = Draft202012Validator({"$ref": f"openai{PREFIX}{schema}"}, registry=registry)
    found = []
    for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        found.append(f"{schema} at {where}: {error.message[:300]}")
    return found

"""Vendor the response schemas of the official OpenAI OpenAPI document that Loraplex speaks.

    python tests/conformance/refresh_openai_schemas.py OPENAPI_JSON COMMIT

OPENAPI_JSON is `openapi.json` from https://github.com/openai/openai-openapi at COMMIT (a
checkout, or the raw file saved from
https://raw.githubusercontent.com/openai/openai-openapi/COMMIT/openapi.json). It writes
`openai_schemas.json` beside this script: the success-response schema of every operation in
OPERATIONS (and the stream chunk schemas), the error schema, and every component they reach,
with the source commit. The conformance test validates Loraplex's answers against that file;
refresh it when OpenAI's spec moves, and the test says what changed on the wire.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("openai_schemas.json")
REPO = "https://github.com/openai/openai-openapi"

# The OpenAI-compatible operations Loraplex implements (method, path in the spec).
OPERATIONS = [
    ("post", "/files"),
    ("get", "/files"),
    ("get", "/files/{file_id}"),
    ("delete", "/files/{file_id}"),
    ("post", "/fine_tuning/jobs"),
    ("get", "/fine_tuning/jobs"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("get", "/models"),
    ("get", "/models/{model}"),
    ("post", "/chat/completions"),
    ("post", "/completions"),
]
# Named outright: a stream's chunks (the SDKs read completion chunks as the response type)
# and every error body.
EXTRA = ["CreateChatCompletionStreamResponse", "CreateCompletionResponse", "ErrorResponse"]
PREFIX = "#/components/schemas/"


def refs(node: Any) -> set[str]:
    """Component names referenced anywhere in `node`."""
    if isinstance(node, dict):
        found = set().union(*(refs(v) for v in node.values())) if node else set()
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(PREFIX):
            found.add(ref.removeprefix(PREFIX))
        return found
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node)) if node else set()
    return set()


def extract(spec: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(operation -> response component, every component those reach)."""
    operations: dict[str, str] = {}
    for method, path in OPERATIONS:
        content = spec["paths"][path][method]["responses"]["200"]["content"]
        ref = content["application/json"]["schema"]["$ref"]
        operations[f"{method.upper()} {path}"] = ref.removeprefix(PREFIX)
    schemas = spec["components"]["schemas"]
    todo = set(operations.values()) | set(EXTRA)
    components: dict[str, Any] = {}
    while todo:
        name = todo.pop()
        components[name] = schemas[name]
        todo |= refs(schemas[name]) - components.keys()
    return operations, dict(sorted(components.items()))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    operations, components = extract(spec)
    document = {
        "source": {
            "repository": REPO,
            "commit": argv[1],
            "file": "openapi.json",
            "openapi": spec["openapi"],
            "api_version": spec["info"]["version"],
            "license": "MIT (Copyright OpenAI), as the source repository states",
        },
        "operations": operations,
        "components": {"schemas": components},
    }
    OUT.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    print(f"{len(operations)} operations, {len(components)} schemas -> {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

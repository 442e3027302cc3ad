"""Check every OpenAI-compatible response a test sees against the official schemas.

`Conformance.check(response)` validates one httpx response (a TestClient's too): its body
against the schema of the spec operation its method and path match, any 4xx/5xx against
`ErrorResponse`, every chunk of an event stream against the stream schema (plus the rules the
spec states in prose: one `id`, `created` and `model` per stream, `[DONE]` last).
`Conformance.client()` is an httpx client for the openai SDK (`http_client=`) that checks
everything passing through it. Loraplex's own routes (`/v1/admin`, `/v1/adapters`, health)
are not OpenAI's and are skipped. `violations` collects what broke; `seen` what was checked.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import httpx

from tests.conformance.openai_spec import operation_schema, violations

# Spec path templates as regexes; model ids hold ':' but never '/'.
_OPERATIONS = {
    ("POST", "/files"),
    ("GET", "/files"),
    ("GET", "/files/{file_id}"),
    ("DELETE", "/files/{file_id}"),
    ("POST", "/fine_tuning/jobs"),
    ("GET", "/fine_tuning/jobs"),
    ("GET", "/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("POST", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("POST", "/fine_tuning/jobs/{fine_tuning_job_id}/pause"),
    ("POST", "/fine_tuning/jobs/{fine_tuning_job_id}/resume"),
    ("GET", "/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("GET", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("GET", "/models"),
    ("GET", "/models/{model}"),
    ("POST", "/chat/completions"),
    ("POST", "/completions"),
}
STREAMS = {"/chat/completions": "CreateChatCompletionStreamResponse",
           "/completions": "CompletionStreamChunk"}  # fmt: skip
# Answered as raw bytes (the spec says only "string"); errors are still checked.
RAW = re.compile(r"^/files/[^/]+/content$")


def _regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")


_MATCHERS = [(method, template, _regex(template)) for method, template in _OPERATIONS]


def spec_operation(method: str, path: str) -> str | None:
    """The spec's path template for a request to our `/v1...` path, if it is OpenAI's."""
    if not path.startswith("/v1/"):
        return None
    path = path.removeprefix("/v1")
    for m, template, pattern in _MATCHERS:
        if m == method and pattern.match(path):
            return template
    return None


class Conformance:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.seen: Counter[str] = Counter()

    def check(self, response: httpx.Response) -> None:
        method, path = response.request.method, response.request.url.path
        template = spec_operation(method, path)
        openai_path = path.startswith("/v1/") and (template or RAW.match(path.removeprefix("/v1")))
        if not openai_path:
            return
        where = f"{method} {path} → {response.status_code}"
        if response.status_code >= 400:
            self._validate(where, _json(response), "ErrorResponse", key="error")
            return
        if template is None:
            return  # file content: raw bytes
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            self._stream(where, response.text, STREAMS[template])
            return
        schema = operation_schema(method, template)
        self._validate(where, _json(response), schema, key=f"{method} {template}")

    def _validate(self, where: str, body: Any, schema: str, *, key: str) -> None:
        self.seen[key] += 1
        self.violations += [f"{where}: {problem}" for problem in violations(body, schema)]

    def _stream(self, where: str, text: str, schema: str) -> None:
        events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        if not events or events[-1] != "[DONE]":
            self.violations.append(f"{where}: the stream does not end with data: [DONE]")
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        for chunk in chunks:
            if "error" in chunk:
                self._validate(where, chunk, "ErrorResponse", key="stream error")
            else:
                self._validate(where, chunk, schema, key=f"stream {schema}")
        for field in ("id", "created", "model", "object"):
            values = {json.dumps(c.get(field)) for c in chunks if "error" not in c}
            if len(values) > 1:
                problem = f"`{field}` differs between chunks: {sorted(values)}"
                self.violations.append(f"{where}: {problem}")

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client that checks every response (the body is read in full first, so a
        stream arrives at once: fine for a tour, not for tests of streaming itself)."""
        return httpx.Client(transport=_Checking(self, httpx.HTTPTransport()), **kwargs)

    def hook(self, response: httpx.Response) -> None:
        """For `client.event_hooks["response"]` (e.g. a TestClient's): reads the body."""
        response.read()
        self.check(response)

    def assert_clean(self) -> None:
        assert not self.violations, "\n".join(self.violations)


class _Checking(httpx.BaseTransport):
    def __init__(self, conformance: Conformance, inner: httpx.BaseTransport) -> None:
        self.conformance, self.inner = conformance, inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        content = response.read()
        response.close()
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _RECODED]
        copy = httpx.Response(response.status_code, headers=headers, content=content,
                              request=request)  # fmt: skip
        self.conformance.check(copy)
        return copy

    def close(self) -> None:
        self.inner.close()


_RECODED = {"content-encoding", "content-length", "transfer-encoding"}


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"not JSON": response.text[:200]}

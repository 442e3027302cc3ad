"""Per-tenant serving rate limits, end to end: the API and the gateway on one live server (as
`loraplex up` runs them) with the transformers engine on the tiny base; limits set through
the admin API; callers are plain httpx clients and the official openai SDK.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from api.main import create_app
from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant
from tests.serving.conftest import LiveServer, wait_for
from tests.serving.servingdata import BASE

pytestmark = pytest.mark.timeout(300)
RESET = re.compile(r"^(\d+ms|[\d.]+s|(\d+h)?\d+m\d+s)$")
WINDOW_HEADERS = [
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
]


@dataclass
class Platform:
    url: str
    settings: Settings
    admin_key: str

    def tenant(self, **limits: int | None) -> str:
        """A new tenant's key, with these overrides of the default limits."""
        tenant_id, key = new_tenant(self.settings)
        if limits:
            self.set_limits(tenant_id, **limits)
        return key

    def set_limits(self, tenant_id: str, **limits: int | None) -> dict[str, Any]:
        url = f"{self.url}/v1/admin/tenants/{tenant_id}/limits"
        response = httpx.patch(url, json=limits, headers=bearer(self.admin_key), timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture(scope="module")
def platform(serving_settings: Settings) -> Iterator[Platform]:
    settings = serving_settings.model_copy(
        update={
            "serving_engine": "transformers",
            "serving_torch_threads": 1,  # tiny matmuls: threads only contend
            "rate_limit_refresh_seconds": 0.2,  # an admin change lands at once in a test
        }
    )
    app = create_app(settings, with_gateway=True)
    with LiveServer(app) as server:
        wait_for(
            lambda: getattr(app.state, "gateway", None) and app.state.gateway.engine.ready(),
            timeout=120,
            what="transformers engine",
        )
        yield Platform(url=server.url, settings=settings, admin_key=new_admin_key(settings))


def chat_body(question: str = "hi", **extra: Any) -> dict[str, Any]:
    body = {"model": BASE, "messages": [{"role": "user", "content": question}]}
    return body | {"max_tokens": 4, "temperature": 0} | extra


def post(platform: Platform, key: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{platform.url}/v1/chat/completions",
        json=chat_body(**extra),
        headers=bearer(key),
        timeout=120,
    )


async def burst(platform: Platform, key: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=platform.url, timeout=120) as client:
        calls = [
            client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key))
            for _ in range(n)
        ]
        return list(await asyncio.gather(*calls))


def assert_429(response: httpx.Response, *, kind: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == "rate_limit_exceeded", error
    assert error["param"] is None and error["message"]
    for name in WINDOW_HEADERS:
        assert name in response.headers, name
    assert RESET.match(response.headers[f"x-ratelimit-reset-{kind}"])
    return dict(error)


def test_a_tenant_over_its_request_limit_gets_429_while_another_is_served(
    platform: Platform,
) -> None:
    tenant_a, key_a = new_tenant(platform.settings)
    platform.set_limits(tenant_a, requests_per_minute=3)
    key_b = platform.tenant()
    started = time.monotonic()

    async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
        a, b = await asyncio.gather(burst(platform, key_a, 10), burst(platform, key_b, 10))
        return a, b

    answers_a, answers_b = asyncio.run(both())
    refilled = int((time.monotonic() - started) // 20)  # 3 per minute: one every 20 s

    assert [r.status_code for r in answers_b] == [200] * 10, [r.text for r in answers_b]
    assert all(r.headers["x-ratelimit-limit-requests"] == "600" for r in answers_b)
    served = [r for r in answers_a if r.status_code == 200]
    refused = [r for r in answers_a if r.status_code != 200]
    assert 3 <= len(served) <= 3 + refilled
    for response in served:
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert int(response.headers["x-ratelimit-remaining-requests"]) in (0, 1, 2)
    for response in refused:
        assert_429(response, kind="requests")
        assert 1 <= int(response.headers["Retry-After"]) <= 20
        assert 0 < int(response.headers["retry-after-ms"]) <= 20_000
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-should-retry" not in response.headers  # the SDK may wait and retry


def test_tokens_are_reserved_before_and_settled_to_real_usage_after(platform: Platform) -> None:
    limit = 120  # 2 tokens a second come back
    tenant_id, key = new_tenant(platform.settings)
    platform.set_limits(tenant_id, tokens_per_minute=limit)

    too_large = post(platform, key, max_tokens=limit)  # prompt + max_tokens > the whole limit
    assert_429(too_large, kind="tokens")
    assert too_large.headers["x-should-retry"] == "false"
    assert "Retry-After" not in too_large.headers

    first = post(platform, key)  # "hi": 4 tokens estimated + 4 max_tokens reserved
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == str(limit)
    assert int(first.headers["x-ratelimit-remaining-tokens"]) in range(limit - 9, limit - 7)
    usage = first.json()["usage"]
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    assert 8 < used < limit - 8  # the chat template makes the real prompt longer than its text

    settled_at = time.monotonic()
    second = post(platform, key)
    assert second.status_code == 200, second.text
    # Left now: the limit less the first request's real usage (not its reservation) and the
    # second's reservation, plus what came back since.
    refill = 2 * (time.monotonic() - settled_at) + 1
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert limit - used - 8 - 1 <= remaining <= limit - used - 8 + refill

    # More than is left, yet under the whole limit: wait.
    over = post(platform, key, max_tokens=remaining + 10 - 4)
    assert_429(over, kind="tokens")
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert "x-should-retry" not in over.headers


def test_an_admin_override_takes_effect_on_the_next_request(platform: Platform) -> None:
    tenant_id, key = new_tenant(platform.settings)
    assert platform.set_limits(tenant_id, requests_per_minute=1)["requests_per_minute"] == 1
    assert post(platform, key).status_code == 200
    assert_429(post(platform, key), kind="requests")

    raised = platform.set_limits(tenant_id, requests_per_minute=50)
    assert raised["overrides"] == {"requests_per_minute": 50}
    time.sleep(platform.settings.rate_limit_refresh_seconds + 0.1)
    response = post(platform, key)
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-requests"] == "50"
    # What was used stays used: 2 of 50 taken (1 served before, this one).
    assert response.headers["x-ratelimit-remaining-requests"] == "48"

    restored = platform.set_limits(tenant_id, requests_per_minute=None)
    assert restored["overrides"] == {}
    assert restored["requests_per_minute"] == platform.settings.tenant_requests_per_minute


def test_the_openai_sdk_sees_a_rate_limit_error(platform: Platform) -> None:
    tenant_id, key = new_tenant(platform.settings)
    platform.set_limits(tenant_id, requests_per_minute=1)
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.parse().choices[0].message.content is not None
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=BASE, prompt="hi", max_tokens=4)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert int(error.response.headers["retry-after"]) >= 1


def test_streamed_answers_carry_the_headers_and_settle(platform: Platform) -> None:
    tenant_id, key = new_tenant(platform.settings)
    platform.set_limits(tenant_id, tokens_per_minute=1000)
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with httpx.stream(
        "POST", f"{platform.url}/v1/chat/completions", json=body, headers=bearer(key), timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-tokens"] == "1000"
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    usage = httpx.Response(200, content=lines[-1].removeprefix("data: ")).json()["usage"]
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    after = post(platform, key)
    remaining = int(after.headers["x-ratelimit-remaining-tokens"])
    assert 1000 - used - 8 - 1 <= remaining <= 1000 - used - 8 + 20


def test_rate_limits_are_documented(platform: Platform) -> None:
    schema = httpx.get(f"{platform.url}/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        too_many = schema["paths"][path]["post"]["responses"]["429"]
        assert set(WINDOW_HEADERS) | {"Retry-After"} <= set(too_many["headers"])
    limits = schema["paths"]["/v1/admin/tenants/{tenant_id}/limits"]
    assert {"get", "patch"} <= set(limits)


def test_refused_bodies_count_and_an_exhausted_tenant_is_refused_before_its_body(
    platform: Platform,
) -> None:
    """A stream of bodies the bounds refuse (50,000 stop strings: a 400 each) is rate
    limited like any other; once out of requests, the 429 comes before the body is read, so
    a flood of 3 MB prompts costs the gateway no parse (issue 13)."""
    key = platform.tenant(requests_per_minute=3)
    bomb = chat_body(stop=[f"s{i}" for i in range(50_000)])
    codes = [
        httpx.post(
            f"{platform.url}/v1/chat/completions", json=bomb, headers=bearer(key), timeout=60
        ).status_code
        for _ in range(5)
    ]
    assert codes == [400, 400, 400, 429, 429]
    # Headers that promise a 1 MB body, and no body at all: answered at once, not after the
    # body idle timeout (or never).
    host, port = platform.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {key}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
        started = time.monotonic()
        head = conn.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 429") and time.monotonic() - started < 5, head
    assert "rate_limit_exceeded" in head and "retry-after:" in head.lower()
    assert post(platform, platform.tenant()).status_code == 200  # others are served

"""The scripted tour of the gateway's OpenAI surface, run on each engine: models, chat and
completions whole and streamed (with and without usage, n > 1, stop, a token-id prompt,
several prompts), and the errors a client meets (unknown model, a bad parameter, an
unsupported one, no key). Every answer is checked against the official schemas."""

from __future__ import annotations

from typing import Any

import openai

from tests.conformance.recorder import Conformance

CHAT = "POST /chat/completions"
COMPLETIONS = "POST /completions"


def tour(url: str, key: str, *, adapter: str, base: str) -> Conformance:
    checked = Conformance()
    with checked.client(timeout=120) as http:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, http_client=http)
        models = [m.id for m in sdk.models.list()]
        assert base in models, models
        sdk.models.retrieve(base)
        messages: Any = [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "What do bees make?"}]  # fmt: skip
        for model in (adapter, base):
            sdk.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                        temperature=0)  # fmt: skip
            list(sdk.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                             temperature=0, stream=True))  # fmt: skip
        sdk.chat.completions.create(model=adapter, messages=messages, max_completion_tokens=6,
                                    n=2, temperature=0, stop=["\n"], seed=3)  # fmt: skip
        sdk.chat.completions.create(model=adapter, messages=messages, max_tokens=6, n=2,
                                    temperature=0.8, top_p=0.9, seed=5)  # fmt: skip
        list(sdk.chat.completions.create(model=adapter, messages=messages, max_tokens=6,
                                         stream=True, stream_options={"include_usage": True},
                                         n=2, temperature=0.7))  # fmt: skip
        sdk.completions.create(model=adapter, prompt="What do bees", max_tokens=6, temperature=0)
        sdk.completions.create(model=base, prompt=["Bees", "Ants"], max_tokens=4, temperature=0)
        sdk.completions.create(model=base, prompt=[1, 2, 3], max_tokens=4, temperature=0)
        list(sdk.completions.create(model=adapter, prompt="What do bees", max_tokens=6,
                                    temperature=0, stream=True,
                                    stream_options={"include_usage": True}))  # fmt: skip
        list(sdk.completions.create(model=base, prompt="Ants", max_tokens=4, stream=True))

        headers = {"Authorization": f"Bearer {key}"}
        for path, body in [
            ("/v1/chat/completions", {"model": "no-such-model", "messages": messages}),
            ("/v1/chat/completions", {"model": adapter, "messages": messages, "temperature": 9}),
            ("/v1/chat/completions", {"model": adapter, "messages": []}),
            ("/v1/completions", {"model": base, "prompt": "x", "max_tokens": 10**6}),
            ("/v1/completions", {"model": base}),
        ]:
            response = http.post(url + path, json=body, headers=headers)
            assert 400 <= response.status_code < 500, response.text
        # Optional features: answered (and then checked like any answer) or a clear 400.
        for path, body in [
            ("/v1/chat/completions", {"model": adapter, "messages": messages, "max_tokens": 4,
                                      "logprobs": True, "top_logprobs": 2}),
            ("/v1/completions", {"model": base, "prompt": "Bees", "max_tokens": 4,
                                 "logprobs": 2}),
        ]:  # fmt: skip
            response = http.post(url + path, json=body, headers=headers)
            assert response.status_code in (200, 400), response.text
        assert http.get(f"{url}/v1/models").status_code == 401
        assert http.post(f"{url}/v1/chat/completions", json={}).status_code == 401
        missing = http.get(f"{url}/v1/models/no-such-model", headers=headers)
        assert missing.status_code == 404
    return checked


def assert_toured(checked: Conformance) -> None:
    """No violation, and every kind of answer was seen (the tour cannot pass by skipping)."""
    checked.assert_clean()
    wanted = {
        "GET /models",
        "GET /models/{model}",
        CHAT,
        COMPLETIONS,
        "error",
        "stream CreateChatCompletionStreamResponse",
        "stream CompletionStreamChunk",
    }
    assert wanted <= set(checked.seen), checked.seen
    assert checked.seen["error"] >= 8, checked.seen

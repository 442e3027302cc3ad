"""Model aliases (/v1/adapters/{name}/aliases): another name for a tenant's adapter, the
hosted ft: id it replaces among them. Resolved as the name; refused when it would shadow a
model, is malformed, taken, or past the bounds; each refusal a 4xx naming `alias`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import get_engine
from api.main import create_app
from api.models.adapters import ModelAlias
from api.services import aliases
from api.settings import Settings
from tests.api.conftest import TINY, add_version
from tests.conftest import bearer, new_tenant

OLD = "ft:gpt-4o-mini-2024-07-18:acme:support-bot:AbC123"


@pytest.fixture
def api(settings: Settings, tiny_llama: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = settings.model_copy(
        update={
            "base_model": TINY,
            "base_models": {TINY: str(tiny_llama)},
            "serving_engine": "transformers",
        }
    )
    with TestClient(create_app(settings, with_gateway=True)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:  # the engine loads in the background
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.2)
        yield client, settings


def test_an_alias_resolves_as_its_adapters_name_once_the_adapter_exists(
    api: tuple[TestClient, Settings], tiny_adapter: Path
) -> None:
    client, settings = api
    tenant_id, key = new_tenant(settings)
    added = client.post("/v1/adapters/bot/aliases", json={"alias": OLD}, headers=bearer(key))
    assert added.status_code == 200 and added.json()["adapter"] == "bot"
    again = client.post("/v1/adapters/bot/aliases", json={"alias": OLD}, headers=bearer(key))
    assert again.status_code == 200  # idempotent
    chat = {"model": OLD, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    early = client.post("/v1/chat/completions", json=chat, headers=bearer(key))
    assert early.status_code == 404 and "no version yet" in early.json()["error"]["message"]

    version = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="bot")
    candidate = client.post("/v1/chat/completions", json=chat, headers=bearer(key))
    assert candidate.status_code == 404
    assert "no production version yet" in candidate.json()["error"]["message"]
    body = client.get("/v1/adapters/bot", headers=bearer(key)).json()
    assert body["aliases"] == [OLD]
    listed = client.get("/v1/adapters/bot/aliases", headers=bearer(key)).json()["data"]
    assert [a["alias"] for a in listed] == [OLD]
    assert version.fine_tuned_model

    gone = client.delete(f"/v1/adapters/bot/aliases/{OLD}", headers=bearer(key))
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    missing = client.delete(f"/v1/adapters/bot/aliases/{OLD}", headers=bearer(key))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "alias_not_found"


def test_bad_aliases_are_refused_naming_the_alias(
    api: tuple[TestClient, Settings], tiny_adapter: Path
) -> None:
    client, settings = api
    tenant_id, key = new_tenant(settings)
    version = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="bot")
    client.post("/v1/adapters/bot/aliases", json={"alias": OLD}, headers=bearer(key))
    cases = [
        ({"alias": "has space"}, "bot", 400, None),
        ({"alias": ":starts-badly"}, "bot", 400, None),
        ({"alias": "x" * 257}, "bot", 400, None),
        ({"alias": TINY}, "bot", 409, "alias_taken"),  # a base model
        ({"alias": "bot"}, "other", 409, "alias_taken"),  # an adapter's name
        ({"alias": version.fine_tuned_model}, "other", 409, "alias_taken"),  # a version id
        ({"alias": OLD}, "other", 409, "alias_taken"),  # already another adapter's
    ]
    for body, name, status, code in cases:
        response = client.post(f"/v1/adapters/{name}/aliases", json=body, headers=bearer(key))
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == "alias", body
        if code:
            assert error["code"] == code

    # Bounds: per adapter, and per tenant (an alias may name an adapter that never comes).
    with Session(get_engine(settings.database_url)) as session:
        for i in range(aliases.MAX_ALIASES_PER_ADAPTER - 1):
            session.add(ModelAlias(tenant_id=tenant_id, alias=f"old-{i}", adapter_name="bot"))
        session.commit()
    full = client.post("/v1/adapters/bot/aliases", json={"alias": "one-more"}, headers=bearer(key))
    assert full.status_code == 400 and full.json()["error"]["code"] == "too_many_aliases"
    with Session(get_engine(settings.database_url)) as session:
        for i in range(aliases.MAX_ALIASES_PER_TENANT - aliases.MAX_ALIASES_PER_ADAPTER):
            session.add(ModelAlias(tenant_id=tenant_id, alias=f"far-{i}", adapter_name=f"n{i}"))
        session.commit()
    spread = client.post("/v1/adapters/new/aliases", json={"alias": "elsewhere"},
                         headers=bearer(key))  # fmt: skip
    assert spread.status_code == 400 and "at most 1024 aliases" in spread.json()["error"]["message"]

    # Another tenant's aliases are invisible to it and free for it to use.
    _, key_b = new_tenant(settings)
    assert client.get("/v1/adapters/bot/aliases", headers=bearer(key_b)).json()["data"] == []
    mine = client.post("/v1/adapters/bot/aliases", json={"alias": OLD}, headers=bearer(key_b))
    assert mine.status_code == 200

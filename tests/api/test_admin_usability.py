"""The admin API as the README uses it: bodies that are all optional may be left out, and an
adapter may be named as admins think of it (`TENANT:NAME`), not only by its opaque id."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.settings import Settings
from tests.api.conftest import TINY, add_version
from tests.conftest import bearer, new_admin_key, new_tenant


@pytest.fixture
def settings(tmp_path: Path, db_url: str, tiny_llama: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", database_url=db_url, base_models={TINY: str(tiny_llama)}
    )


@pytest.fixture
def world(settings: Settings, tiny_adapter: Path) -> dict[str, str]:
    tenant_id, key = new_tenant(settings, name="support-team")
    v1 = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="support-bot")
    add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="support-bot")
    return {
        "tenant_id": tenant_id,
        "key": key,
        "admin": new_admin_key(settings),
        "adapter_id": v1.adapter_id,
    }


def test_admin_posts_whose_fields_are_all_optional_take_no_body(
    client: TestClient, world: dict[str, str]
) -> None:
    """`curl -X POST $U/adapters/$ID/rollback -H "$A"`: no body, no Content-Type."""
    admin, url = bearer(world["admin"]), f"/v1/admin/adapters/{world['adapter_id']}"
    promoted = client.post(f"{url}/versions/1/promote", json={"stage": "production"}, headers=admin)
    assert promoted.status_code == 200, promoted.text
    for finish in ("abort", "promote"):
        canary = client.post(f"{url}/canary", json={"version": 2, "percent": 5}, headers=admin)
        assert canary.status_code == 200, canary.text
        finished = client.post(f"{url}/canary/{finish}", headers=admin)
        assert finished.status_code == 200, finished.text
        assert finished.json()["canary_version"] is None
    assert finished.json()["production_version"] == 2
    rolled_back = client.post(f"{url}/rollback", headers=admin)
    assert rolled_back.status_code == 200, rolled_back.text
    assert rolled_back.json()["production_version"] == 1
    # An empty body sent as JSON is the same as none; a body that is there is still read.
    empty = client.post(
        f"{url}/rollback", content=b"", headers={**admin, "Content-Type": "application/json"}
    )
    assert empty.status_code == 200, empty.text
    assert empty.json()["production_version"] == 2
    reason = client.post(f"{url}/rollback", json={"reason": "canary regressed"}, headers=admin)
    assert reason.status_code == 200, reason.text
    assert reason.json()["production_version"] == 1

    key = client.post(f"/v1/admin/tenants/{world['tenant_id']}/keys", headers=admin)
    assert key.status_code == 200, key.text
    assert key.json()["api_key"].startswith("lpx-")
    audit = client.get("/v1/admin/audit", params={"action": "rollback"}, headers=admin).json()
    assert sorted(str(e["reason"]) for e in audit["data"]) == ["None", "None", "canary regressed"]


def test_openapi_says_which_admin_bodies_may_be_left_out(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    optional = {}
    for path, ops in schema["paths"].items():
        body = ops.get("post", {}).get("requestBody")
        if path.startswith("/v1/admin") and body:
            ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            all_optional = not schema["components"]["schemas"][ref].get("required")
            assert body.get("required", False) is not all_optional, path
            optional[path] = all_optional
    assert optional["/v1/admin/adapters/{adapter_id}/rollback"] is True
    assert optional["/v1/admin/adapters/{adapter_id}/canary/abort"] is True
    assert optional["/v1/admin/adapters/{adapter_id}/canary/promote"] is True
    assert optional["/v1/admin/tenants/{tenant_id}/keys"] is True
    assert optional["/v1/admin/adapters/{adapter_id}/canary"] is False


def test_admin_names_an_adapter_by_tenant_and_name(
    client: TestClient, world: dict[str, str]
) -> None:
    admin = bearer(world["admin"])
    for ref in ("support-team:support-bot", f"{world['tenant_id']}:support-bot"):
        shown = client.get(f"/v1/admin/adapters/{ref}", headers=admin)
        assert shown.status_code == 200, shown.text
        assert shown.json()["id"] == world["adapter_id"]
    promoted = client.post(
        "/v1/admin/adapters/support-team:support-bot/versions/1/promote",
        json={"stage": "production"},
        headers=admin,
    )
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["production_version"] == 1

    # A bare adapter name, as a newcomer first tries it: the answer says how to name it.
    bare = client.post("/v1/admin/adapters/support-bot/rollback", headers=admin)
    assert bare.status_code == 404
    message = bare.json()["error"]["message"]
    assert "TENANT:NAME" in message and "GET /v1/admin/adapters" in message
    assert "Did you mean 'support-team:support-bot'?" in message
    typo = client.get("/v1/admin/adapters/support-team:supprot-bot", headers=admin)
    assert typo.status_code == 404
    assert "Did you mean 'support-team:support-bot'?" in typo.json()["error"]["message"]

    # To a tenant key, even its own adapter by name is an unknown URL.
    as_tenant = client.get(
        "/v1/admin/adapters/support-team:support-bot", headers=bearer(world["key"])
    )
    unknown = client.get("/v1/admin/no-such-route", headers=bearer(world["key"]))
    assert as_tenant.status_code == unknown.status_code == 404
    assert as_tenant.json()["error"]["code"] == unknown.json()["error"]["code"]

    schema = client.get("/openapi.json").json()
    rollback = schema["paths"]["/v1/admin/adapters/{adapter_id}/rollback"]["post"]
    (param,) = [p for p in rollback["parameters"] if p["name"] == "adapter_id"]
    assert "TENANT:NAME" in param["description"]

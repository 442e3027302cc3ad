"""The control plane's skeleton: boundaries, auth, errors, health, metrics."""

from __future__ import annotations

import subprocess
import sys

from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant


def test_importing_the_api_loads_no_ml_stack() -> None:
    code = (
        "import sys, api.main, api.cli, trainer.formats; "
        "print(' '.join(m for m in ('torch', 'transformers', 'peft', 'vllm', 'trl') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"database": "ok"}}
    client.get("/v1/models")  # one 401 to count
    text = client.get("/metrics").text
    assert 'loraplex_http_requests_total{method="GET",route="/v1/models",status="401"} 1.0' in text
    assert "loraplex_http_request_duration_seconds_bucket" in text


def test_readyz_reports_an_unreachable_database(tmp_path) -> None:
    settings = Settings(home=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/x")
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "service_unavailable"


def _assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_missing_unknown_malformed_and_revoked_keys_are_401(
    client: TestClient, settings: Settings
) -> None:
    _assert_error(client.get("/v1/models"), 401, "missing_api_key")
    _assert_error(client.get("/v1/models", headers=bearer("lpx-nope")), 401, "invalid_api_key")
    _assert_error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    _, key = new_tenant(settings)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200

    admin = new_admin_key(settings)
    keys = client.get("/v1/admin/keys", headers=bearer(admin)).json()["data"]
    key_id = next(k["id"] for k in keys if key.startswith(k["prefix"]) and not k["is_admin"])
    assert all("api_key" not in k and "key_hash" not in k for k in keys)
    r = client.post(f"/v1/admin/keys/{key_id}/revoke", headers=bearer(admin))
    assert r.json()["revoked_at"] is not None
    _assert_error(client.get("/v1/models", headers=bearer(key)), 401, "invalid_api_key")


def test_last_used_at_is_recorded(client: TestClient, settings: Settings) -> None:
    _, key = new_tenant(settings)
    admin = new_admin_key(settings)
    client.get("/v1/models", headers=bearer(key))
    keys = client.get("/v1/admin/keys", headers=bearer(admin)).json()["data"]
    used = [k for k in keys if key.startswith(k["prefix"])]
    assert used and used[0]["last_used_at"] is not None


def test_unknown_route_and_method_are_openai_shaped(client: TestClient) -> None:
    _assert_error(client.get("/v1/nothing-here"), 404)
    r = client.delete("/healthz")
    _assert_error(r, 405, "method_not_allowed")


def test_malformed_json_is_400(client: TestClient, settings: Settings) -> None:
    admin = new_admin_key(settings)
    r = client.post(
        "/v1/admin/tenants",
        content=b'{"name": ',
        headers={**bearer(admin), "Content-Type": "application/json"},
    )
    _assert_error(r, 400, "invalid_json")
    r = client.post("/v1/admin/tenants", json={"name": ""}, headers=bearer(admin))
    assert _assert_error(r, 400)["param"] == "name"


def test_oversize_body_is_413(tmp_path, db_url: str) -> None:
    settings = Settings(home=tmp_path, database_url=db_url, max_json_body_bytes=1000)
    with TestClient(create_app(settings)) as c:
        admin = new_admin_key(settings)
        r = c.post("/v1/admin/tenants", json={"name": "x" * 5000}, headers=bearer(admin))
        _assert_error(r, 413, "payload_too_large")

        def chunks():  # no Content-Length: counted while streaming
            yield b'{"name": "'
            yield b"y" * 5000
            yield b'"}'

        r = c.post(
            "/v1/admin/tenants",
            content=chunks(),
            headers={**bearer(admin), "Content-Type": "application/json"},
        )
        _assert_error(r, 413, "payload_too_large")


def test_admin_routes_are_invisible_to_tenant_keys(client: TestClient, settings: Settings) -> None:
    _, key = new_tenant(settings)
    r = client.get("/v1/admin/tenants", headers=bearer(key))
    assert r.status_code == 404
    unknown = client.get("/v1/admin/does-not-exist", headers=bearer(key))
    assert r.json()["error"]["type"] == unknown.json()["error"]["type"]


def test_admin_key_cannot_act_as_a_tenant(client: TestClient, settings: Settings) -> None:
    admin = new_admin_key(settings)
    _assert_error(client.get("/v1/models", headers=bearer(admin)), 401, "tenant_key_required")


def test_admin_creates_tenant_whose_key_works_once_shown(
    client: TestClient, settings: Settings
) -> None:
    admin = new_admin_key(settings)
    r = client.post("/v1/admin/tenants", json={"name": "support-team"}, headers=bearer(admin))
    assert r.status_code == 200, r.text
    created = r.json()
    assert client.get("/v1/models", headers=bearer(created["api_key"])).status_code == 200
    listed = client.get("/v1/admin/tenants", headers=bearer(admin)).json()
    assert [t["name"] for t in listed["data"]] == ["support-team"]
    assert "api_key" not in listed["data"][0]
    dup = client.post("/v1/admin/tenants", json={"name": "support-team"}, headers=bearer(admin))
    _assert_error(dup, 409, "conflict")

"""API keys as secrets: shown once at creation, never logged, never stored or returned in
the clear afterwards, and refused everywhere the moment they are revoked.

The API runs as a real `loraplex api` process at DEBUG log level; its whole output is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.api.load_driver import ApiProcess
from tests.api.test_cli import run_cli
from tests.conftest import bearer


def _admin_key(tmp_path: Path, db_url: str) -> str:
    made = run_cli("admin", "create-key", "--admin", home=tmp_path / "home", db_url=db_url)
    return str(json.loads(made.stdout)["api_key"])


@pytest.fixture
def api_process(tmp_path: Path, db_url: str) -> Iterator[tuple[str, Path]]:
    """`loraplex api` at DEBUG; yields (base url, its log file)."""
    api = ApiProcess(tmp_path / "home", db_url, extra_env={"LORAPLEX_LOG_LEVEL": "DEBUG"})
    yield api.url, api.log
    api.stop()


def test_keys_are_shown_once_and_never_logged_stored_or_returned(
    api_process: tuple[str, Path], tmp_path: Path, db_url: str
) -> None:
    url, log = api_process
    admin = _admin_key(tmp_path, db_url)
    http = httpx.Client(base_url=url, timeout=30)

    tenant = http.post("/v1/admin/tenants", json={"name": "acme"}, headers=bearer(admin)).json()
    key = http.post(f"/v1/admin/tenants/{tenant['id']}/keys", json={}, headers=bearer(admin)).json()
    raw = key["api_key"]  # the one time it is shown
    assert raw.startswith("lpx-") and len(raw) > 30
    secrets_ = {raw, admin, hashlib.sha256(raw.encode()).hexdigest()}

    # Use it, misuse it, revoke it: every path a key travels.
    assert http.get("/v1/models", headers=bearer(raw)).status_code == 200
    wrong = raw[:-4] + ("aaaa" if not raw.endswith("aaaa") else "bbbb")  # same prefix, wrong key
    assert http.get("/v1/models", headers=bearer(wrong)).status_code == 401
    assert http.get("/v1/models", headers={"Authorization": f"Basic {raw}"}).status_code == 401
    assert http.get(f"/v1/models?api_key={raw}").status_code == 401
    http.post(f"/v1/admin/keys/{key['id']}/revoke", headers=bearer(admin))
    assert http.get("/v1/models", headers=bearer(raw)).status_code == 401

    # Everything an admin can read afterwards.
    for path in ("/v1/admin/keys", "/v1/admin/tenants", "/v1/admin/audit?limit=100"):
        body = http.get(path, headers=bearer(admin)).text
        assert not [s for s in secrets_ if s in body], path
    http.close()

    output = log.read_text(errors="replace")
    assert "DEBUG" in output or "GET /v1/models" in output  # the log really was written
    assert not [s for s in secrets_ if s in output]
    if db_url.startswith("sqlite"):  # the database holds digests only
        stored = Path(db_url.removeprefix("sqlite:///")).read_bytes()
        assert raw.encode() not in stored and admin.encode() not in stored


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_revoked_key_is_refused_at_once_by_every_process(
    api_process: tuple[str, Path], tmp_path: Path, db_url: str
) -> None:
    """Revoked through one API process; refused on the very next request by another one."""
    url, _ = api_process
    made = run_cli("admin", "create-tenant", "acme", home=tmp_path / "home", db_url=db_url)
    raw = json.loads(made.stdout)["api_key"]
    admin = _admin_key(tmp_path, db_url)
    settings = Settings(home=tmp_path / "home", database_url=db_url)
    with TestClient(create_app(settings)) as other, httpx.Client(base_url=url) as http:
        assert other.get("/v1/models", headers=bearer(raw)).status_code == 200
        assert http.get("/v1/models", headers=bearer(raw)).status_code == 200
        key_id = next(
            k["id"]
            for k in http.get("/v1/admin/keys", headers=bearer(admin)).json()["data"]
            if raw.startswith(k["prefix"]) and not k["is_admin"]
        )
        revoked = http.post(f"/v1/admin/keys/{key_id}/revoke", headers=bearer(admin))
        assert revoked.status_code == 200
        assert other.get("/v1/models", headers=bearer(raw)).status_code == 401
        assert http.get("/v1/models", headers=bearer(raw)).status_code == 401

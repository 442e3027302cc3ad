"""The `loraplex` CLI, run as a user would: a real process with LORAPLEX_* settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.conftest import bearer

LORAPLEX = str(Path(sys.executable).parent / "loraplex")


def run_cli(*args: str, home: Path, db_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_DATABASE_URL": db_url}
    return subprocess.run([LORAPLEX, *args], capture_output=True, text=True, env=env, timeout=60)


def test_admin_commands_print_json_keys_that_work(tmp_path: Path, db_url: str) -> None:
    home = tmp_path / "home"
    tenant = run_cli("admin", "create-tenant", "support", home=home, db_url=db_url)
    assert tenant.returncode == 0, tenant.stderr
    created = json.loads(tenant.stdout)
    assert set(created) == {"tenant_id", "api_key"}
    admin = run_cli("admin", "create-key", "--admin", home=home, db_url=db_url)
    admin_key = json.loads(admin.stdout)["api_key"]

    with TestClient(create_app(Settings(home=home, database_url=db_url))) as c:
        assert c.get("/v1/models", headers=bearer(created["api_key"])).status_code == 200
        tenants = c.get("/v1/admin/tenants", headers=bearer(admin_key)).json()["data"]
        assert [t["id"] for t in tenants] == [created["tenant_id"]]


def test_admin_errors_are_clear_and_nonzero(tmp_path: Path, db_url: str) -> None:
    home = tmp_path / "home"
    assert run_cli("admin", "create-tenant", "dup", home=home, db_url=db_url).returncode == 0
    again = run_cli("admin", "create-tenant", "dup", home=home, db_url=db_url)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    neither = run_cli("admin", "create-key", home=home, db_url=db_url)
    assert neither.returncode == 1 and "--admin" in neither.stderr


def test_db_upgrade_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    r = subprocess.run(
        [LORAPLEX, "db", "upgrade"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / ".loraplex" / "loraplex.db").exists()

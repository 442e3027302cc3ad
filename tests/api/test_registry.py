"""The adapter registry and its admin web API, on real adapters made by the trainer."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.db import get_engine
from api.models.adapters import Adapter, AdapterVersion
from api.services.resolver import resolve_model
from api.settings import Settings
from api.storage import ArtifactStore
from tests.api.conftest import TINY, add_version
from tests.conftest import bearer, new_admin_key, new_tenant


@pytest.fixture
def settings(tmp_path: Path, db_url: str, tiny_llama: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", database_url=db_url, base_models={TINY: str(tiny_llama)}
    )


@pytest.fixture
def world(settings: Settings, tiny_adapter: Path):
    tenant_id, key = new_tenant(settings, name="support")
    v1 = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="support-bot")
    v2 = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="support-bot")
    return {
        "tenant_id": tenant_id,
        "key": key,
        "admin": new_admin_key(settings),
        "adapter_id": v1.adapter_id,
        "v1": v1,
        "v2": v2,
    }


def promote(client, world, n: int, stage: str, **extra):
    return client.post(
        f"/v1/admin/adapters/{world['adapter_id']}/versions/{n}/promote",
        json={"stage": stage, **extra},
        headers=bearer(world["admin"]),
    )


def stages(client, world) -> dict[int, str]:
    body = client.get("/v1/adapters/support-bot", headers=bearer(world["key"])).json()
    return {v["version"]: v["stage"] for v in body["versions"]}


def test_versions_promote_canary_finish_and_roll_back(client: TestClient, world, settings):
    assert stages(client, world) == {1: "candidate", 2: "candidate"}
    assert promote(client, world, 1, "production").status_code == 200
    body = client.post(
        f"/v1/admin/adapters/{world['adapter_id']}/canary",
        json={"version": 2, "percent": 25},
        headers=bearer(world["admin"]),
    ).json()
    assert body["production_version"] == 1 and body["canary_version"] == 2
    assert body["canary_percent"] == 25

    rng = random.Random(0)
    with Session(get_engine(settings.database_url)) as s:
        picks = [
            resolve_model(
                s, settings, tenant_id=world["tenant_id"], model="support-bot", rng=rng
            ).version.version
            for _ in range(400)
        ]
    assert 0.18 < picks.count(2) / 400 < 0.32  # the canary's share of by-name traffic

    r = client.post(
        f"/v1/admin/adapters/{world['adapter_id']}/canary/promote",
        json={},
        headers=bearer(world["admin"]),
    )
    assert r.json()["production_version"] == 2 and r.json()["canary_version"] is None
    assert stages(client, world) == {1: "archived", 2: "production"}
    r = client.post(
        f"/v1/admin/adapters/{world['adapter_id']}/rollback",
        json={},
        headers=bearer(world["admin"]),
    )
    assert r.status_code == 200 and stages(client, world) == {1: "production", 2: "archived"}

    log = client.get(
        "/v1/admin/audit", params={"tenant_id": world["tenant_id"]}, headers=bearer(world["admin"])
    ).json()["data"]
    assert [e["action"] for e in log][::-1] == [
        "promote.production",
        "canary.set",
        "canary.promote",
        "rollback",
    ]
    assert log[0]["before"]["production"] == 2 and log[0]["after"]["production"] == 1
    assert all(e["actor_key_id"].startswith("key-") for e in log)


def test_models_list_shows_callable_adapters(client: TestClient, world) -> None:
    promote(client, world, 1, "production")
    ids = [m["id"] for m in client.get("/v1/models", headers=bearer(world["key"])).json()["data"]]
    assert "support-bot" in ids and world["v1"].fine_tuned_model in ids
    assert world["v2"].fine_tuned_model in ids  # candidates are callable by exact id


def test_only_admins_promote_and_tenants_are_isolated(client: TestClient, world, settings):
    r = client.post(
        f"/v1/admin/adapters/{world['adapter_id']}/versions/1/promote",
        json={"stage": "production"},
        headers=bearer(world["key"]),
    )
    assert r.status_code == 404
    _, other = new_tenant(settings)
    mine = client.get("/v1/adapters/no-such-adapter", headers=bearer(other))
    theirs = client.get("/v1/adapters/support-bot", headers=bearer(other))
    assert theirs.status_code == mine.status_code == 404
    assert theirs.json()["error"]["code"] == mine.json()["error"]["code"]
    assert client.get("/v1/adapters", headers=bearer(other)).json()["data"] == []


def test_invalid_transitions_are_409_unless_forced(client: TestClient, world) -> None:
    assert promote(client, world, 1, "archived").status_code == 200
    r = promote(client, world, 1, "production")
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_transition"
    assert "force" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"  # the openai SDK would resend a plain 409
    assert promote(client, world, 1, "production", force=True, reason="hotfix").status_code == 200
    entry = client.get(
        "/v1/admin/audit", params={"action": "promote.production"}, headers=bearer(world["admin"])
    ).json()["data"][0]
    assert entry["forced"] is True and entry["reason"] == "hotfix"


def test_incompatible_adapters_are_registered_as_rejected(client, world, settings, tiny_adapter):
    big = add_version(
        settings,
        tiny_adapter,
        tenant_id=world["tenant_id"],
        suffix="support-bot",
        config_patch={"r": 512, "modules_to_save": ["lm_head"]},
    )
    assert big.stage == "rejected"
    assert "rank 512 exceeds" in big.stage_reason and "modules_to_save" in big.stage_reason
    r = promote(client, world, big.version, "production", force=True)
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_rejected"


def test_a_flipped_byte_in_storage_is_caught(client: TestClient, world, settings) -> None:
    v1 = world["v1"]
    ok = client.get("/v1/adapters/support-bot/versions/1/files", headers=bearer(world["key"]))
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/x-tar"
    digests = json.loads(ok.headers["x-loraplex-files-sha256"])
    assert digests == {k: v["sha256"] for k, v in v1.files.items()}

    stored = Path(settings.storage_url.removeprefix("file://")) / v1.storage_prefix
    weights = stored / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    bad = client.get("/v1/adapters/support-bot/versions/1/files", headers=bearer(world["key"]))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "artifact_integrity_error"
    r = client.post(
        f"/v1/admin/adapters/{world['adapter_id']}/versions/1/verify",
        headers=bearer(world["admin"]),
    ).json()
    assert r["ok"] is False and r["stage"] == "rejected"
    chat = client.get(f"/v1/models/{v1.fine_tuned_model}", headers=bearer(world["key"]))
    assert chat.status_code == 404  # no longer callable
    assert promote(client, world, 1, "production").status_code == 409


def test_delete_removes_artifacts_but_not_production(client, world, settings) -> None:
    promote(client, world, 1, "production")
    r = client.delete(
        f"/v1/admin/adapters/{world['adapter_id']}/versions/1", headers=bearer(world["admin"])
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_in_use"
    r = client.delete(
        f"/v1/admin/adapters/{world['adapter_id']}/versions/2", headers=bearer(world["admin"])
    )
    assert r.status_code == 200
    assert not ArtifactStore(settings.storage_url).exists(world["v2"].storage_prefix)
    assert stages(client, world) == {1: "production"}


def test_promotion_gate(tmp_path, db_url, tiny_llama, tiny_adapter) -> None:
    from api.main import create_app

    settings = Settings(
        home=tmp_path / "h",
        database_url=db_url,
        promotion_gate=True,
        base_models={TINY: str(tiny_llama)},
    )
    tenant_id, _ = new_tenant(settings)
    worse = add_version(
        settings,
        tiny_adapter,
        tenant_id=tenant_id,
        suffix="gated",
        metrics={"eval_loss_before": 1.0, "eval_loss_after": 1.5},
    )
    better = add_version(
        settings,
        tiny_adapter,
        tenant_id=tenant_id,
        suffix="gated",
        metrics={"eval_loss_before": 1.0, "eval_loss_after": 0.4},
    )
    probe = {"exact_match_before": {"train": {"rate": 0.1, "n": 10}}}
    served_worse = add_version(
        settings,
        tiny_adapter,
        tenant_id=tenant_id,
        suffix="gated",
        metrics={  # better on the 4-bit base it trained on, worse as served: refused
            "eval_loss_before": 1.0,
            "eval_loss_after": 0.4,
            **probe,
            "exact_match_after": {"train": {"rate": 0.9, "n": 10}},
            "exact_match_unquantized": {"train": {"rate": 0.0, "n": 10}},
        },
    )
    admin = new_admin_key(settings)
    base = f"/v1/admin/adapters/{worse.adapter_id}/versions"
    with TestClient(create_app(settings)) as c:
        r = c.post(f"{base}/1/promote", json={"stage": "production"}, headers=bearer(admin))
        assert r.status_code == 409 and r.json()["error"]["code"] == "promotion_gate_failed"
        r = c.post(
            f"{base}/{served_worse.version}/promote",
            json={"stage": "production"},
            headers=bearer(admin),
        )
        assert r.status_code == 409 and "as served" in r.json()["error"]["message"]
        r = c.post(
            f"{base}/{better.version}/promote", json={"stage": "production"}, headers=bearer(admin)
        )
        assert r.status_code == 200
        r = c.post(
            f"{base}/1/promote", json={"stage": "production", "force": True}, headers=bearer(admin)
        )
        assert r.status_code == 200


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_concurrent_promotions_leave_one_production_version(world, settings) -> None:
    from api.services.promotion import promote as promote_version
    from api.services.tenants import Principal

    admin = Principal(key_id="key-test", tenant_id=None, is_admin=True)
    barrier = threading.Barrier(2)
    errors: list[Exception] = []

    def go(number: int) -> None:
        with Session(get_engine(settings.database_url)) as s:
            barrier.wait()
            try:
                promote_version(
                    s,
                    actor=admin,
                    adapter_id=world["adapter_id"],
                    number=number,
                    stage="production",
                )
            except Exception as e:  # a Conflict is an acceptable answer; two winners is not
                errors.append(e)

    for _ in range(5):
        threads = [threading.Thread(target=go, args=(n,)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with Session(get_engine(settings.database_url)) as s:
            production = s.exec(
                select(AdapterVersion).where(
                    AdapterVersion.adapter_id == world["adapter_id"],
                    AdapterVersion.stage == "production",
                )
            ).all()
            assert len(production) == 1
            s.exec(select(Adapter)).all()
    assert all(type(e).__name__ == "Conflict" for e in errors)


def test_a_version_never_validated_on_the_served_numerics_is_rejected(
    settings: Settings, tiny_adapter: Path
) -> None:
    """Issue 20: a QLoRA version is served on the full-precision base; registered only if
    a probe measured it there (the trainer's `probe_unquantized`), and the record says so."""
    tenant_id, key = new_tenant(settings)
    probed = {"train": {"rate": 0.9, "n": 10}}
    unchecked = add_version(
        settings, tiny_adapter, tenant_id=tenant_id, suffix="nf4",
        metrics={"quantization": "nf4", "method": "qlora", "exact_match_after": probed},
    )  # fmt: skip
    assert unchecked.stage == "rejected"
    assert "trained on nf4 base weights and never validated on the full ones" in (
        unchecked.stage_reason or ""
    )
    assert unchecked.metrics["numerics"] == {
        "trained": "nf4", "validated": ["nf4"], "served": "full"
    }  # fmt: skip
    checked = add_version(
        settings, tiny_adapter, tenant_id=tenant_id, suffix="nf4",
        metrics={"quantization": "nf4", "method": "qlora", "exact_match_after": probed,
                 "exact_match_unquantized": probed},
    )  # fmt: skip
    assert checked.stage == "candidate", checked.stage_reason
    assert checked.metrics["numerics"]["validated"] == ["full", "nf4"]
    plain = add_version(settings, tiny_adapter, tenant_id=tenant_id, suffix="lora",
                        metrics={"quantization": "none", "method": "lora"})  # fmt: skip
    assert plain.stage == "candidate"
    assert plain.metrics["numerics"] == {"trained": "full", "validated": ["full"], "served": "full"}
    from api.main import create_app

    with TestClient(create_app(settings)) as c:
        ids = [m["id"] for m in c.get("/v1/models", headers=bearer(key)).json()["data"]]
    assert unchecked.fine_tuned_model not in ids and checked.fine_tuned_model in ids


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite has one writer
def test_a_registration_that_loses_the_race_for_a_serial_takes_the_next(
    settings: Settings, tiny_adapter: Path
) -> None:
    """Two workers finishing at once (on the CI's PostgreSQL, two tenants' jobs within the
    same second): the one whose serial was taken between its read and its insert retries
    with the next, and its job succeeds (was: InvalidRequestError, the job failed)."""
    from sqlalchemy import event

    tenant_a, _ = new_tenant(settings, name="a")
    tenant_b, _ = new_tenant(settings, name="b")
    raced: list[int] = []

    def the_other_worker_commits_first(session, _context, _instances) -> None:
        pending = [o for o in session.new if isinstance(o, AdapterVersion)]
        if pending and not raced:
            raced.append(pending[0].serial)  # once; the other registration flushes too
            add_version(settings, tiny_adapter, tenant_id=tenant_b, suffix="other")

    event.listen(Session, "before_flush", the_other_worker_commits_first)
    try:
        mine = add_version(settings, tiny_adapter, tenant_id=tenant_a, suffix="mine")
    finally:
        event.remove(Session, "before_flush", the_other_worker_commits_first)
    with Session(get_engine(settings.database_url)) as s:
        serials = {v.tenant_id: v.serial for v in s.exec(select(AdapterVersion))}
    assert raced and serials[tenant_b] == raced[0]
    assert mine.serial == serials[tenant_a] == raced[0] + 1 and mine.version == 1

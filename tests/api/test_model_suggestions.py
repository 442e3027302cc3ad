"""A mistyped `model` is answered with the closest names the caller may use: its own adapters
and fine-tuned ids and the base models, never another tenant's."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.api.conftest import TINY, add_version
from tests.conftest import bearer, new_admin_key, new_tenant

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _chat(client: TestClient, key: str, model: str) -> tuple[int, str]:
    response = client.post(
        "/v1/chat/completions", json={"model": model, **CHAT}, headers=bearer(key)
    )
    return response.status_code, response.json().get("error", {}).get("message", "")


def _wait_for_engine(client: TestClient, key: str) -> None:
    deadline = time.monotonic() + 120
    while (status := _chat(client, key, TINY)[0]) == 503:
        assert time.monotonic() < deadline, "the gateway's engine did not start"
        time.sleep(0.5)
    assert status == 200


def test_a_mistyped_model_gets_the_callers_closest_names(
    tmp_path: Path, db_url: str, tiny_llama: Path, tiny_adapter: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        database_url=db_url,
        base_model=TINY,
        base_models={TINY: str(tiny_llama)},
        serving_engine="transformers",
        serving_dtype="float32",
    )
    tenant_a, key_a = new_tenant(settings, name="tenant-a")
    _, key_b = new_tenant(settings, name="tenant-b")
    version = add_version(settings, tiny_adapter, tenant_id=tenant_a, suffix="support-bot")
    with TestClient(create_app(settings, with_gateway=True)) as client:
        promoted = client.post(
            f"/v1/admin/adapters/{version.adapter_id}/versions/1/promote",
            json={"stage": "production"},
            headers=bearer(new_admin_key(settings)),
        )
        assert promoted.status_code == 200, promoted.text
        _wait_for_engine(client, key_a)

        status, message = _chat(client, key_a, "supprot-bot")
        assert status == 404
        assert message.startswith("The model 'supprot-bot' does not exist")
        assert message.endswith("Did you mean 'support-bot'?")
        assert _chat(client, key_a, "tiny-lama")[1].endswith("Did you mean 'tiny-llama'?")
        typo = version.fine_tuned_model[:-1] + "x"
        assert _chat(client, key_a, typo)[1].endswith(f"Did you mean '{version.fine_tuned_model}'?")
        assert "Did you mean" not in _chat(client, key_a, "something-else-entirely")[1]

        # Tenant B typing A's adapter's name wrong learns nothing of it.
        status, message = _chat(client, key_b, "supprot-bot")
        assert status == 404
        assert message == "The model 'supprot-bot' does not exist or you do not have access to it."

        models = client.get("/v1/models/supprot-bot", headers=bearer(key_a)).json()
        assert models["error"]["message"].endswith("Did you mean 'support-bot'?")

        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-lama", "training_file": "file-x"},
            headers=bearer(key_a),
        )
        assert job.status_code == 400
        assert job.json()["error"]["message"].endswith("Did you mean 'tiny-llama'?")

"""JSON bodies sent the way curl and hand-written clients send them (issue 21, item 5).

`curl -d '{...}'` labels the body application/x-www-form-urlencoded unless told otherwise;
other clients send no Content-Type or text/plain. Every JSON route reads such a body as JSON;
a body that is not JSON gets a 400 that says what is wrong with it.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.settings import Settings
from tests.conftest import bearer, new_admin_key, new_tenant

FORM = "application/x-www-form-urlencoded"  # what `curl -d` sends


def _post(client: TestClient, path: str, body: bytes, key: str, content_type: str | None):
    headers = bearer(key) | ({"Content-Type": content_type} if content_type else {})
    return client.post(path, content=body, headers=headers)


@pytest.mark.parametrize("content_type", [FORM, None, "text/plain", "application/octet-stream"])
def test_a_json_body_is_read_whatever_its_content_type(
    client: TestClient, settings: Settings, content_type: str | None
) -> None:
    admin = new_admin_key(settings)
    r = _post(client, "/v1/admin/tenants", b'{"name": "acme"}', admin, content_type)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "acme"


def test_a_tenant_route_reads_a_form_labelled_body_as_json(
    client: TestClient, settings: Settings
) -> None:
    _, key = new_tenant(settings)
    body = f'{{"model": "{settings.base_model}", "training_file": "file-nope"}}'.encode()
    r = _post(client, "/v1/fine_tuning/jobs", body, key, FORM)
    # Parsed: the answer is about the fields' values, not the shape of the body.
    assert r.json()["error"]["param"] == "training_file", r.text


def test_a_body_that_is_not_json_gets_a_precise_400(client: TestClient, settings: Settings) -> None:
    admin = new_admin_key(settings)
    r = _post(client, "/v1/admin/tenants", b"name=acme", admin, FORM)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
    assert error["message"] == (
        f"The request body is not valid JSON (sent as {FORM}): Expecting value at character 0."
    )
    r = _post(client, "/v1/admin/tenants", b'{"name": ', admin, "application/json")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "The request body is not valid JSON: Expecting value at character 9."
    )


def test_json_that_is_not_an_object_is_named(client: TestClient, settings: Settings) -> None:
    admin = new_admin_key(settings)
    r = _post(client, "/v1/admin/tenants", b'["acme"]', admin, None)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "The request body must be a JSON object, not an array (sent with no Content-Type)."
    )


def test_uploads_still_need_multipart(client: TestClient, settings: Settings) -> None:
    _, key = new_tenant(settings)
    r = _post(client, "/v1/files", b'{"purpose": "fine-tune"}', key, FORM)
    assert r.status_code == 400
    assert "multipart/form-data" in r.json()["error"]["message"]

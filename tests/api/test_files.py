"""The Files API, driven through the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import openai
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.db import get_engine
from api.models.files import File
from api.settings import Settings
from tests.conftest import bearer, new_tenant, stored_files


def chat(q: str, a: str, **extra: object) -> dict:
    return {
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        **extra,
    }


def jsonl(rows: list[dict], *, sep: str = "\n") -> bytes:
    return sep.join(json.dumps(r) for r in rows).encode() + sep.encode()


GOOD = jsonl([chat(f"What is widget {i}?", f"Widget {i} is a gear.") for i in range(12)])


@pytest.fixture
def tenant(settings: Settings) -> tuple[str, str]:
    return new_tenant(settings)


@pytest.fixture
def sdk(client: TestClient, tenant: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=tenant[1], http_client=client, max_retries=0
    )


def upload(
    client: TestClient,
    key: str,
    data: bytes,
    *,
    name: str = "train.jsonl",
    purpose: str | None = "fine-tune",
):
    form = {"purpose": purpose} if purpose is not None else {}
    return client.post(
        "/v1/files",
        headers=bearer(key),
        data=form,
        files={"file": (name, data, "application/jsonl")},
    )


def rows(settings: Settings) -> list[File]:
    with Session(get_engine(settings.database_url)) as s:
        return list(s.exec(select(File)))


def test_sdk_upload_wait_list_content_delete(sdk: openai.OpenAI, settings: Settings) -> None:
    created = sdk.files.create(file=("train.jsonl", GOOD), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(GOOD) and created.filename == "train.jsonl"
    done = sdk.files.wait_for_processing(created.id, poll_interval=0.1, max_wait_seconds=10)
    assert done.status == "processed" and done.status_details is None
    stats = done.model_extra["stats"]
    assert stats["examples"] == 12 and stats["messages"] == 24
    assert stats["formats"] == {"chat": 12} and stats["enough_for_fine_tune"] is True
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert sdk.files.content(created.id).read() == GOOD

    deleted = sdk.files.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
    assert stored_files(settings) == [] and rows(settings) == []


def test_all_three_formats_normalise(client: TestClient, tenant) -> None:
    data = jsonl(
        [
            chat("q", "a"),
            {"prompt": "Say hi", "completion": "hi"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Count to two", "output": "one two"},
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "draft", "weight": 0},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "final", "weight": 1},
                ]
            },
        ]
    )
    body = upload(client, tenant[1], data).json()
    assert body["status"] == "processed", body
    assert body["stats"]["formats"] == {"chat": 2, "prompt_completion": 1, "instruction": 2}
    assert body["stats"]["examples"] == 5
    assert body["stats"]["enough_for_fine_tune"] is False  # fewer than 10: jobs refuse it


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "file contains no examples"),
        (b"\n\n\n", "file contains no examples"),
        (GOOD + b'{"messages": [{"role": "user", "content": "cut', "line 13: invalid JSON"),
        (GOOD + b'{"prompt": "caf\xe9", "completion": "x"}\n', "line 13: invalid UTF-8"),
        (b"[" + json.dumps(chat("q", "a")).encode() + b"]\n", "line 1: expected a JSON object"),
        (jsonl([{"text": "hello"}]), "line 1: unknown format"),
        (jsonl([{"messages": []}]), "line 1: messages must not be empty"),
        (
            jsonl([{"messages": [{"role": "user", "content": "only a question"}]}]),
            "line 1: needs at least one assistant message with weight 1",
        ),
        (jsonl([chat("q", "")]), "line 1: messages[1].content must not be empty"),
        (jsonl([chat("q", 5)]), "line 1: messages[1].content must be a string, got int"),
        (jsonl([{"messages": [{"role": "robot", "content": "x"}]}]), "messages[0].role must be"),
        (
            jsonl(
                [
                    {
                        "messages": [
                            {"role": "user", "content": "x", "weight": 1},
                            {"role": "assistant", "content": "y"},
                        ]
                    }
                ]
            ),
            "messages[0].weight is only allowed on assistant messages",
        ),
        (
            jsonl(
                [
                    {
                        "messages": [
                            {"role": "user", "content": "x"},
                            {"role": "assistant", "content": "y", "weight": 2},
                        ]
                    }
                ]
            ),
            "messages[1].weight must be 0 or 1",
        ),
        (
            jsonl(
                [
                    {
                        "messages": [
                            {"role": "user", "content": "x"},
                            {"role": "assistant", "content": "y", "weight": 0},
                        ]
                    }
                ]
            ),
            "needs at least one assistant message with weight 1",
        ),
    ],
    ids=[
        "empty",
        "blank-only",
        "truncated-last-line",
        "invalid-utf8",
        "json-array",
        "unknown-format",
        "empty-messages",
        "no-assistant",
        "empty-content",
        "non-string",
        "bad-role",
        "weight-on-user",
        "weight-2",
        "all-weight-0",
    ],
)
def test_bad_datasets_get_line_by_line_errors(
    client: TestClient, tenant, data: bytes, expected: str
) -> None:
    body = upload(client, tenant[1], data).json()
    assert body["status"] == "error", body
    assert expected in body["status_details"]


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf" + GOOD,
        jsonl([chat(f"q{i}", "a") for i in range(12)], sep="\r\n"),
        GOOD.replace(b"\n", b"\n\n  \n"),
        GOOD.rstrip(b"\n"),
    ],
    ids=["utf8-bom", "crlf", "blank-lines", "no-final-newline"],
)
def test_tolerated_variations_are_processed(client: TestClient, tenant, data: bytes) -> None:
    body = upload(client, tenant[1], data).json()
    assert body["status"] == "processed", body["status_details"]
    assert body["stats"]["examples"] == 12


def test_only_the_first_20_problems_are_listed(client: TestClient, tenant) -> None:
    body = upload(client, tenant[1], b"nope\n" * 50).json()
    lines = body["status_details"].splitlines()
    assert lines[0] == "50 problem(s) found:"
    assert lines[1].startswith("line 1: invalid JSON") and lines[20].startswith("line 20:")
    assert lines[21] == "... and 30 more"


def test_a_10_mb_single_line_is_refused_without_buffering_it(client: TestClient, tenant) -> None:
    line = json.dumps(chat("q", "x" * (10 * 1024 * 1024))).encode()
    body = upload(client, tenant[1], GOOD + line + b"\n" + GOOD).json()
    assert body["status"] == "error"
    assert body["status_details"].splitlines()[1] == "line 13: line is longer than 8388608 bytes"
    assert "line 14" not in body["status_details"]  # the lines after it are read normally


@pytest.mark.parametrize(
    ("name", "purpose", "param", "code"),
    [
        ("train.jsonl", "assistants", "purpose", "invalid_purpose"),
        ("train.jsonl", "banana", "purpose", "invalid_purpose"),
        ("train.jsonl", "fine-tune-results", "purpose", "invalid_purpose"),
        ("train.csv", "fine-tune", "file", "invalid_file_format"),
        ("train.jsonl", None, "purpose", None),
    ],
)
def test_rejected_uploads_leave_no_row_and_no_bytes(
    client: TestClient, tenant, settings: Settings, name, purpose, param, code
) -> None:
    r = upload(client, tenant[1], GOOD, name=name, purpose=purpose)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if code:
        assert r.json()["error"]["code"] == code
    assert rows(settings) == [] and stored_files(settings) == []


def test_missing_file_part_and_non_multipart_are_400(client: TestClient, tenant) -> None:
    r = client.post(
        "/v1/files",
        headers=bearer(tenant[1]),
        data={"purpose": "fine-tune"},
        files={"other": ("x.jsonl", b"{}")},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = client.post("/v1/files", headers=bearer(tenant[1]), json={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_duplicate_upload_gets_a_new_id(client: TestClient, tenant) -> None:
    a = upload(client, tenant[1], GOOD).json()
    b = upload(client, tenant[1], GOOD).json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]


def test_over_the_size_limit_is_413_and_leaves_nothing(tmp_path, db_url: str) -> None:
    from api.main import create_app

    settings = Settings(home=tmp_path, database_url=db_url, max_upload_bytes=100_000)
    _, key = new_tenant(settings)
    with TestClient(create_app(settings)) as c:
        r = upload(c, key, GOOD * 1000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert rows(settings) == [] and stored_files(settings) == []


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_upload_cut_off_mid_stream_leaves_nothing(live_url: str, tenant, settings) -> None:
    boundary = "cutcutcut"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        f'fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="t.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
    ).encode()
    url = urlparse(live_url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenant[1]}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + 10_000_000}\r\n\r\n".encode()
            + head
            + GOOD * 200
        )
        assert _wait_until(lambda: len(stored_files(settings)) == 1)  # partial, temporary
    # The client vanished: the partial object goes, no row is written.
    assert _wait_until(lambda: stored_files(settings) == [])
    assert rows(settings) == []


def test_another_tenant_gets_404_for_everything(client: TestClient, settings: Settings) -> None:
    _, key_a = new_tenant(settings)
    _, key_b = new_tenant(settings)
    file_id = upload(client, key_a, GOOD).json()["id"]
    missing = client.get("/v1/files/file-doesnotexist", headers=bearer(key_b))
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        r = client.request(method, path, headers=bearer(key_b))
        assert r.status_code == 404
        assert r.json()["error"]["message"] == missing.json()["error"]["message"].replace(
            "file-doesnotexist", file_id
        )
    assert client.get("/v1/files", headers=bearer(key_b)).json()["data"] == []
    r = client.get(f"/v1/files?after={file_id}", headers=bearer(key_b))
    assert r.status_code == 400
    assert client.get(f"/v1/files/{file_id}", headers=bearer(key_a)).status_code == 200


def test_listing_pages_orders_and_filters(sdk: openai.OpenAI, client: TestClient, tenant) -> None:
    ids = [upload(client, tenant[1], GOOD, name=f"f{i}.jsonl").json()["id"] for i in range(5)]
    newest_first = [f.id for f in sdk.files.list(limit=2)]  # the SDK follows `after` itself
    assert newest_first == ids[::-1]
    first = client.get("/v1/files?limit=2&order=asc", headers=bearer(tenant[1])).json()
    assert [f["id"] for f in first["data"]] == ids[:2] and first["has_more"] is True
    rest = client.get(
        f"/v1/files?limit=10&order=asc&after={ids[1]}", headers=bearer(tenant[1])
    ).json()
    assert [f["id"] for f in rest["data"]] == ids[2:] and rest["has_more"] is False
    assert (
        client.get("/v1/files?purpose=fine-tune-results", headers=bearer(tenant[1])).json()["data"]
        == []
    )
    r = client.get("/v1/files?limit=0", headers=bearer(tenant[1]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"

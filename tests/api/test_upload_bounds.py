"""Hostile uploads: forms of many fields, bodies that stall, and a tenant's storage quota.

Each test plays a tenant who sends what an honest client never would (raw sockets where the
attack is in the framing) and checks what anyone would notice: the status and OpenAI error
body, how soon it comes, the API's memory, other clients still served, nothing stored.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session
from sqlmodel import select as sql_select

from api.db import get_engine
from api.main import create_app
from api.models.adapters import Adapter, AdapterVersion
from api.models.files import File
from api.models.jobs import Job
from api.settings import Settings
from tests.api.load_driver import ApiProcess
from tests.api.test_files import GOOD, upload
from tests.conftest import bearer, new_tenant, serve_in_thread, stored_files

BOUNDARY = "hostile-boundary"
IDLE_TIMEOUT = 3.0  # the stalled-body tests' LORAPLEX_BODY_IDLE_TIMEOUT, seconds


@pytest.fixture
def connect() -> Iterator[Callable[[str], socket.socket]]:
    """Opens raw connections to a server; all are closed before the server is stopped."""
    opened: list[socket.socket] = []

    def open_(url: str) -> socket.socket:
        parsed = urlparse(url)
        opened.append(socket.create_connection((parsed.hostname, parsed.port), timeout=30))
        return opened[-1]

    yield open_
    for sock in opened:
        sock.close()


def _head(path: str, *, key: str, content_type: str, length: int | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: test",
        f"Authorization: Bearer {key}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _field(name: str, value: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
    return head.encode() + value + b"\r\n"


def _file_head(name: str = "train.jsonl") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


class Answer:
    """A response read off a raw socket, and how long after asking for it it came."""

    def __init__(self, sock: socket.socket, *, timeout: float) -> None:
        start = time.monotonic()
        sock.settimeout(timeout)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            self.body = response.read()
        except TimeoutError:
            pytest.fail(f"no response within {timeout} s: the server still waits for the body")
        self.seconds = time.monotonic() - start
        self.status = response.status
        self.headers = response.headers

    def error(self) -> dict:
        error = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return dict(error)


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[ApiProcess]:
    """A real `loraplex api` that drops a body idle for IDLE_TIMEOUT seconds."""
    env = {"LORAPLEX_BODY_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}
    process = ApiProcess(tmp_path / "home", db_url, extra_env=env)
    yield process
    process.stop()


def _process_tenant(tmp_path: Path, db_url: str) -> tuple[str, str]:
    return new_tenant(Settings(home=tmp_path / "home", database_url=db_url))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_form_of_thousands_of_fields_is_refused_at_the_cap_without_pinning_memory(
    api: ApiProcess, connect: Callable[[str], socket.socket], tmp_path: Path, db_url: str
) -> None:
    """Issue 13 #7: 3,000 fields of 60 KB, no closing boundary, then an idle client."""
    _, key = _process_tenant(tmp_path, db_url)
    field = b"x" * 60_000
    n_fields = 3000
    length = n_fields * len(_field("f0000", field)) + 1000
    rss_before = api.rss_mb()
    sock = connect(api.url)
    sock.sendall(_head("/v1/files", key=key, content_type=MULTIPART, length=length))
    sent = 0
    for i in range(n_fields):
        if _answered(sock):
            break
        try:
            sock.sendall(_field(f"f{i:04d}", field))
        except OSError:  # the server stopped reading: that is the point
            break
        sent += 1
    rss_growth = api.rss_mb() - rss_before
    print(f"fields sent before the answer: {sent}; API RSS growth: {rss_growth:.1f} MB")
    # The client now idles with its connection open, as the attacker's did.
    answer = Answer(sock, timeout=15)
    assert answer.status == 400, answer.body
    error = answer.error()
    # 4 fields fit in the form's 256 KiB; the fifth passes it.
    assert error["code"] == "form_too_large" and error["param"] == "f0004", error
    assert sent < n_fields  # answered at the cap, before the body ended
    assert rss_growth < 40, f"the API grew by {rss_growth:.0f} MB"
    sock.close()
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def _form(fields: dict[str, bytes], *, file: bytes | None = GOOD) -> bytes:
    body = b"".join(_field(name, value) for name, value in fields.items())
    if file is not None:
        body += _file_head() + file + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        # 17 small fields: more than any form needs (OpenAI's upload has one).
        ({"purpose": b"fine-tune", **{f"x{i:02d}": b"1" for i in range(16)}}, "x15"),
        # 6 fields of 50 KB, each under the per-field cap: 300 KB of text in all.
        ({"purpose": b"fine-tune", **{f"x{i}": b"y" * 50_000 for i in range(6)}}, "x5"),
    ],
    ids=["count", "total-bytes"],
)
def test_form_fields_are_capped_in_number_and_total_bytes(
    client: TestClient, settings: Settings, fields: dict[str, bytes], param: str
) -> None:
    _, key = new_tenant(settings)
    response = client.post(
        "/v1/files",
        content=_form(fields),
        headers={**bearer(key), "Content-Type": MULTIPART},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "form_too_large" and error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    with Session(get_engine(settings.database_url)) as s:
        assert not s.exec(sql_select(File)).all()
    assert stored_files(settings) == []


def test_bytes_around_the_file_are_capped(client: TestClient, settings: Settings) -> None:
    """400 KB of padding after the form's end: what lets a declared length count as file."""
    _, key = new_tenant(settings)
    body = _form({"purpose": b"fine-tune"}) + b"\r\n" * 200_000
    response = client.post(
        "/v1/files", content=body, headers={**bearer(key), "Content-Type": MULTIPART}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "form_too_large"
    assert stored_files(settings) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("path", "content_type", "partial"),
    [
        ("/v1/files", MULTIPART, _field("purpose", b"fine-tune") + _file_head() + GOOD[:100]),
        ("/v1/fine_tuning/jobs", "application/json", b'{"model": "tiny", "training_f'),
    ],
    ids=["upload", "json"],
)
def test_a_stalled_body_is_dropped_while_others_are_served(
    api: ApiProcess,
    connect: Callable[[str], socket.socket],
    tmp_path: Path,
    db_url: str,
    path: str,
    content_type: str,
    partial: bytes,
) -> None:
    tenant_id, key = _process_tenant(tmp_path, db_url)
    stalled = connect(api.url)
    stalled.sendall(_head(path, key=key, content_type=content_type, length=1_000_000) + partial)
    stalled_at = time.monotonic()
    # ... and then nothing more. Meanwhile another client works as usual.
    with httpx.Client(base_url=api.url, headers=bearer(key), timeout=10) as other:
        for _ in range(3):
            assert other.get("/healthz").status_code == 200
            done = other.post(
                "/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": ("train.jsonl", GOOD, "application/jsonl")},
            )
            assert done.status_code == 200, done.text
    assert not _answered(stalled)  # all that while, the stalled request was still open
    answer = Answer(stalled, timeout=IDLE_TIMEOUT + 10)
    waited = time.monotonic() - stalled_at
    print(f"stalled {path} answered {answer.status} after {waited:.2f} s")
    assert answer.status == 408, answer.body
    assert answer.error()["code"] == "request_timeout"
    assert IDLE_TIMEOUT * 0.9 <= waited < IDLE_TIMEOUT + 3
    assert stalled.recv(1) == b""  # and the connection is closed
    stalled.close()
    home = tmp_path / "home" / "artifacts" / "files" / tenant_id
    left = [p for p in home.rglob("*") if p.is_file()]
    assert len(left) == 3 and not [p for p in left if p.name.startswith(".")], left


def _quota_settings(tmp_path: Path, db_url: str, quota: int) -> Settings:
    return Settings(home=tmp_path / "home", database_url=db_url, tenant_storage_quota_bytes=quota)


def _rows(settings: Settings) -> list[File]:
    with Session(get_engine(settings.database_url)) as s:
        return list(s.exec(sql_select(File)))


def test_uploads_past_the_storage_quota_are_refused_and_store_nothing(
    tmp_path: Path, db_url: str
) -> None:
    settings = _quota_settings(tmp_path, db_url, quota=3 * len(GOOD) + 100)
    (_, key), (_, other_key) = new_tenant(settings), new_tenant(settings)
    with TestClient(create_app(settings)) as client:
        ids = [upload(client, key, GOOD).json()["id"] for _ in range(3)]
        refused = upload(client, key, GOOD)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "storage_quota_exceeded" and error["param"] == "file", error
        assert len(_rows(settings)) == 3 and len(stored_files(settings)) == 3
        # The quota is the tenant's own: another tenant still uploads.
        assert upload(client, other_key, GOOD).status_code == 200
        # Deleting a file makes room again.
        assert client.delete(f"/v1/files/{ids[0]}", headers=bearer(key)).status_code == 200
        assert upload(client, key, GOOD).status_code == 200


def test_adapter_versions_count_toward_the_storage_quota(tmp_path: Path, db_url: str) -> None:
    settings = _quota_settings(tmp_path, db_url, quota=10 * len(GOOD))
    tenant_id, key = new_tenant(settings)
    with Session(get_engine(settings.database_url)) as s:
        job = Job(
            tenant_id=tenant_id,
            model="tiny",
            training_file="file-x",
            method={},
            config={},
            hyperparameters={},
            status="succeeded",
        )
        adapter = Adapter(tenant_id=tenant_id, name="bot", base_model="tiny")
        s.add_all([job, adapter])
        s.flush()
        s.add(
            AdapterVersion(
                adapter_id=adapter.id,
                tenant_id=tenant_id,
                version=1,
                job_id=job.id,
                fine_tuned_model="ft:tiny:bot:1",
                base_model="tiny",
                storage_prefix="adapters/x",
                files={},
                size_bytes=10 * len(GOOD) - 10,
                rank=8,
                target_modules=["q_proj"],
            )
        )
        s.commit()
    with TestClient(create_app(settings)) as client:
        refused = upload(client, key, GOOD)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "storage_quota_exceeded"
    assert _rows(settings) == [] and stored_files(settings) == []


@pytest.fixture
def quota_url(tmp_path: Path, db_url: str) -> Iterator[tuple[str, Settings]]:
    """The app with a 50 KB storage quota, on a real uvicorn server in a thread."""
    settings = _quota_settings(tmp_path, db_url, quota=50_000)
    with serve_in_thread(settings) as url:
        yield url, settings


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_declared_length_past_the_quota_is_refused_before_the_body(
    quota_url: tuple[str, Settings], connect: Callable[[str], socket.socket]
) -> None:
    url, settings = quota_url
    _, key = new_tenant(settings)
    sock = connect(url)
    sock.sendall(_head("/v1/files", key=key, content_type=MULTIPART, length=5_000_000))
    answer = Answer(sock, timeout=10)  # not one byte of the body was sent
    sock.close()
    assert answer.status == 400, answer.body
    assert answer.error()["code"] == "storage_quota_exceeded"
    assert _rows(settings) == [] and stored_files(settings) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_chunked_upload_is_cut_off_once_it_passes_the_quota(
    quota_url: tuple[str, Settings], connect: Callable[[str], socket.socket]
) -> None:
    """No Content-Length: the running total is what passes the quota; the rest is not read."""
    url, settings = quota_url
    _, key = new_tenant(settings)
    sock = connect(url)
    sock.sendall(_head("/v1/files", key=key, content_type=MULTIPART, length=None))

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    sock.sendall(chunk(_field("purpose", b"fine-tune") + _file_head()))
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 900}]}).encode() + b"\n"
    for _ in range(100):  # 90 KB of a file, against a 50 KB quota; the body never ends
        sock.sendall(chunk(line))
    answer = Answer(sock, timeout=10)
    sock.close()
    assert answer.status == 400, answer.body
    assert answer.error()["code"] == "storage_quota_exceeded"
    assert _rows(settings) == [] and stored_files(settings) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_zero_storage_quota_means_unlimited(tmp_path: Path, db_url: str) -> None:
    settings = _quota_settings(tmp_path, db_url, quota=0)
    _, key = new_tenant(settings)
    with TestClient(create_app(settings)) as client:
        assert upload(client, key, GOOD).status_code == 200

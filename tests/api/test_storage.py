"""The artifact store: atomic, hashed, streaming; on the filesystem and on a real S3 server
(moto's server mode, over HTTP through s3fs, as against AWS or MinIO)."""

from __future__ import annotations

import hashlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.storage import ArtifactStore, StorageError
from tests.s3server import S3

MiB = 1 << 20


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'art'}"
    s3: S3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/artifacts"


def everything(store: ArtifactStore) -> list[str]:
    """Every object under the store's root, in-flight temporaries included."""
    return sorted(store.fs.find(store.root)) if store.fs.exists(store.root) else []


def test_put_stream_hashes_and_reads_back(store_url: str) -> None:
    store = ArtifactStore(store_url)
    chunks = [b"a" * 1000, b"b" * 5000, b"c"]
    stored = store.put_stream("files/x/data.jsonl", iter(chunks))
    blob = b"".join(chunks)
    assert stored.sha256 == hashlib.sha256(blob).hexdigest()
    assert stored.size == len(blob) == store.size("files/x/data.jsonl")
    assert b"".join(store.iter_bytes("files/x/data.jsonl", chunk_size=777)) == blob
    assert store.uri("files/x/data.jsonl") == f"{store_url}/files/x/data.jsonl"


def test_failed_write_leaves_nothing_behind(store_url: str) -> None:
    store = ArtifactStore(store_url)

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_stream("files/y/data.jsonl", broken())
    assert not store.exists("files/y/data.jsonl")
    assert everything(store) == []


def test_reader_never_sees_a_partial_object(store_url: str) -> None:
    store = ArtifactStore(store_url)
    with store.writer("a/b") as w:
        w.write(b"first half")
        assert not store.exists("a/b")
    assert store.exists("a/b")


def test_put_dir_and_delete_prefix(tmp_path: Path, store_url: str) -> None:
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    store = ArtifactStore(store_url)
    stored = store.put_dir("adapters/v1", src)
    assert set(stored) == {"adapter_config.json", "sub/w.bin"}
    assert stored["sub/w.bin"].size == 10
    assert set(store.get_dir("adapters/v1", tmp_path / "back")) == set(stored)
    out = tmp_path / "copy.bin"
    assert store.get_file("adapters/v1/sub/w.bin", out) == stored["sub/w.bin"].sha256
    assert store.delete("adapters/v1") is True
    assert store.delete("adapters/v1") is False
    assert not store.exists("adapters/v1/adapter_config.json")


def test_a_large_object_goes_up_in_parts_and_back_intact(s3: S3, tmp_path: Path) -> None:
    """Past the part size an upload is multipart (S3's minimum part: 5 MiB); the object
    appears whole, with the sha256 of what was streamed."""
    bucket = s3.new_bucket()
    store = ArtifactStore(f"s3://{bucket}/artifacts", block_size=5 * MiB)
    blob = os.urandom(13 * MiB)
    stored = store.put_stream(
        "big/weights.bin", (blob[i : i + MiB] for i in range(0, len(blob), MiB))
    )
    assert stored.size == len(blob) and stored.sha256 == hashlib.sha256(blob).hexdigest()
    client: Any = s3.client()
    head = client.head_object(Bucket=bucket, Key="artifacts/big/weights.bin")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts: 5 + 5 + 3 MiB
    assert store.get_file("big/weights.bin", tmp_path / "w.bin") == stored.sha256


def test_a_multipart_upload_that_fails_midway_leaves_no_object_and_no_parts(s3: S3) -> None:
    bucket = s3.new_bucket()
    store = ArtifactStore(f"s3://{bucket}/artifacts", block_size=5 * MiB)

    def dies_after_two_parts() -> Iterator[bytes]:
        for _ in range(11):
            yield os.urandom(MiB)
        raise RuntimeError("the worker was killed")

    with pytest.raises(RuntimeError):
        store.put_stream("big/weights.bin", dies_after_two_parts())
    client: Any = s3.client()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_keys_cannot_escape_the_root(store_url: str) -> None:
    store = ArtifactStore(store_url)
    with pytest.raises(StorageError):
        store.put_stream("../outside", iter([b"x"]))


def test_a_write_error_midway_through_put_dir_leaves_nothing(tmp_path: Path) -> None:
    limit = 64 * 1024
    local = tmp_path / "adapter"
    local.mkdir()
    (local / "adapter_config.json").write_bytes(b"{}")
    (local / "adapter_model.safetensors").write_bytes(b"x" * (4 * limit))
    store = ArtifactStore(f"file://{tmp_path / 'art'}")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(StorageError, match=r"adapter_model\.safetensors: .*File too large"):
            store.put_dir("adapters/t/a/job", local)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p for p in (tmp_path / "art").rglob("*") if p.is_file()] == []

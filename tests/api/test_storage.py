"""The artifact store: atomic, hashed, streaming."""

from __future__ import annotations

import hashlib
import resource
from pathlib import Path

import pytest

from api.storage import ArtifactStore, StorageError


def test_put_stream_hashes_and_reads_back(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path / 'art'}")
    chunks = [b"a" * 1000, b"b" * 5000, b"c"]
    stored = store.put_stream("files/x/data.jsonl", iter(chunks))
    blob = b"".join(chunks)
    assert stored.sha256 == hashlib.sha256(blob).hexdigest()
    assert stored.size == len(blob)
    assert b"".join(store.iter_bytes("files/x/data.jsonl", chunk_size=777)) == blob
    assert store.uri("files/x/data.jsonl").endswith("art/files/x/data.jsonl")


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")

    def broken():
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_stream("files/y/data.jsonl", broken())
    assert not store.exists("files/y/data.jsonl")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_reader_never_sees_a_partial_object(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    with store.writer("a/b") as w:
        w.write(b"first half")
        assert not store.exists("a/b")
    assert store.exists("a/b")


def test_put_dir_and_delete_prefix(tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    stored = store.put_dir("adapters/v1", src)
    assert set(stored) == {"adapter_config.json", "sub/w.bin"}
    assert stored["sub/w.bin"].size == 10
    out = tmp_path / "copy.bin"
    assert store.get_file("adapters/v1/sub/w.bin", out) == stored["sub/w.bin"].sha256
    assert store.delete("adapters/v1") is True
    assert store.delete("adapters/v1") is False
    assert not store.exists("adapters/v1/adapter_config.json")


def test_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
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

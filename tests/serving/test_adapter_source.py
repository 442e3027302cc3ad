"""The replica side of adapter delivery (serving/adapter_source.py): a replica resolves a
content name to bytes in the artifact store, verifies them against the name, and keeps a
bounded cache of its own. On the filesystem store and on a real S3 server (moto), with
read-only use of the bucket. Serving through vLLM is covered in test_vllm_gateway.py and the
multi-host test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.storage import ArtifactStore
from serving.adapter_source import (
    AdapterRefused,
    ReplicaAdapterStore,
    content_digest,
    parse_replica_name,
    replica_name,
)
from tests.s3server import S3


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path / 'bucket'}")
    s3: S3 = request.getfixturevalue("s3")
    return ArtifactStore(f"s3://{s3.new_bucket()}/artifacts")


def publish(store: ArtifactStore, tmp_path: Path, prefix: str, weights: bytes) -> str:
    """What a worker does (upload, record sha256 and size per file); returns the name the
    gateway would hand a replica."""
    local = tmp_path / prefix.replace("/", "_")
    local.mkdir(parents=True)
    (local / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (local / "adapter_model.safetensors").write_bytes(weights)
    stored = store.put_dir(prefix, local)
    files = {rel: {"sha256": o.sha256, "size": o.size} for rel, o in stored.items()}
    return replica_name(storage_prefix=prefix, files=files)


def test_a_replica_fetches_a_version_by_its_name_and_verifies_it(
    store: ArtifactStore, tmp_path: Path
) -> None:
    name = publish(store, tmp_path, "adapters/t1/support/v1", b"w" * 1000)
    replica = ReplicaAdapterStore(store, tmp_path / "replica")
    local = replica.fetch(name)
    assert (local / "adapter_model.safetensors").read_bytes() == b"w" * 1000
    assert local.name == parse_replica_name(name)[1]  # type: ignore[index]
    assert (local / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o444  # read-only
    assert replica.fetch(name) == local  # cached: no second download


@pytest.mark.parametrize(
    "tamper",
    ["altered", "extra file", "missing weights"],
)
def test_bytes_that_are_not_the_named_version_are_never_handed_out(
    store: ArtifactStore, tmp_path: Path, tamper: str
) -> None:
    prefix = "adapters/t1/support/v2"
    name = publish(store, tmp_path, prefix, b"w" * 1000)
    if tamper == "altered":  # same size, other bytes
        store.put_stream(f"{prefix}/adapter_model.safetensors", iter([b"x" * 1000]))
    elif tamper == "extra file":
        store.put_stream(f"{prefix}/extra.py", iter([b"import os"]))
    else:
        store.delete(f"{prefix}/adapter_model.safetensors")
    replica = ReplicaAdapterStore(store, tmp_path / "replica")
    with pytest.raises(AdapterRefused) as refused:
        replica.fetch(name)
    assert refused.value.reason == ("incomplete" if tamper == "missing weights" else "altered")
    assert [p for p in (tmp_path / "replica").rglob("*") if p.is_file()] == []


def test_names_are_content_and_nothing_else_is_resolved(tmp_path: Path) -> None:
    files: dict[str, Any] = {"adapter_model.safetensors": {"sha256": "a" * 64, "size": 3}}
    other = {"adapter_model.safetensors": {"sha256": "b" * 64, "size": 3}}
    assert replica_name(storage_prefix="p/v1", files=files) != replica_name(
        storage_prefix="p/v1", files=other
    )
    assert content_digest(files) == content_digest(dict(reversed(list(files.items()))))
    replica = ReplicaAdapterStore(ArtifactStore(f"file://{tmp_path}"), tmp_path / "replica")
    for name in ["ft:base:t:x:1", "../etc@" + "a" * 64, "p/../q@" + "a" * 64, "p@short"]:
        assert parse_replica_name(name) is None
        with pytest.raises(AdapterRefused):
            replica.fetch(name)


def test_the_replica_cache_is_bounded_but_keeps_the_most_recent(
    store: ArtifactStore, tmp_path: Path
) -> None:
    names = [publish(store, tmp_path, f"adapters/t/a/v{i}", bytes([i]) * 100) for i in range(6)]
    replica = ReplicaAdapterStore(store, tmp_path / "replica", max_adapters=3, keep=2)
    for name in names:
        replica.fetch(name)
    kept = sorted(p.name for p in (tmp_path / "replica").iterdir())
    assert kept == sorted(parse_replica_name(n)[1] for n in names[-3:])  # type: ignore[index]
    replica = ReplicaAdapterStore(store, tmp_path / "replica", max_adapters=1, max_bytes=1, keep=2)
    replica.prune()
    assert len(list((tmp_path / "replica").iterdir())) == 2  # never below `keep`


def test_a_copy_altered_on_the_replicas_disk_is_fetched_again(
    store: ArtifactStore, tmp_path: Path
) -> None:
    name = publish(store, tmp_path, "adapters/t/a/v9", b"w" * 1000)
    local = ReplicaAdapterStore(store, tmp_path / "replica").fetch(name)
    weights = local / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"z" * 1000)
    # A restarted replica (a new process) hashes what it finds before using it.
    again = ReplicaAdapterStore(store, tmp_path / "replica").fetch(name)
    assert (again / "adapter_model.safetensors").read_bytes() == b"w" * 1000

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


# The LoRA scaling folded into lora_B on the way in (FoldScaling) ---------------------------


def lora_weights(dtype: Any, *, big: float | None = None) -> dict[str, Any]:
    """A two-layer adapter in `dtype` as peft names it, with a non-LoRA tensor beside it."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for module, (out, inp) in {"q_proj": (24, 16), "down_proj": (16, 40)}.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, inp, generator=generator).to(dtype)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=generator).to(dtype)
    tensors["base_model.model.lm_head.new_rows"] = torch.randn(3, 5).to(dtype)
    if big is not None:
        tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = big
    return tensors


def publish_adapter(
    store: ArtifactStore, tmp_path: Path, prefix: str, config: dict[str, Any],
    tensors: dict[str, Any],
) -> str:  # fmt: skip
    import json

    from safetensors.torch import save_file

    local = tmp_path / prefix.replace("/", "_")
    local.mkdir(parents=True)
    (local / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(local / "adapter_model.safetensors"))
    (local / "README.md").write_text("trained here")
    stored = store.put_dir(prefix, local)
    files = {rel: {"sha256": o.sha256, "size": o.size} for rel, o in stored.items()}
    return replica_name(storage_prefix=prefix, files=files)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_lora_scaling_comes_folded_into_b_as_vllm_would_fold_it(
    store: ArtifactStore, tmp_path: Path, dtype: str
) -> None:
    """alpha = 2r: the replica's copy has lora_B x 2 (what vLLM would compute at load, in
    any dtype: a power of two), lora_alpha = r, and every other byte as published."""
    import json

    import torch
    from safetensors.torch import load_file

    tensors = lora_weights(getattr(torch, dtype))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    name = publish_adapter(store, tmp_path, "adapters/t/f/v1", config, tensors)
    local = ReplicaAdapterStore(store, tmp_path / "replica", fold=True).fetch(name)

    served = load_file(str(local / "adapter_model.safetensors"))
    assert served.keys() == tensors.keys()
    for key, original in tensors.items():
        expected = original * 2.0 if ".lora_B." in key else original  # vLLM: lora_b *= 2.0
        assert served[key].dtype == original.dtype
        assert torch.equal(served[key], expected), key
    served_config = json.loads((local / "adapter_config.json").read_text())
    assert served_config == config | {"lora_alpha": 4, "use_rslora": False}
    assert (local / "README.md").read_text() == "trained here"
    # Off unless asked for (LORAPLEX_REPLICA_FOLD_SCALING=1): stored as published.
    plain = ReplicaAdapterStore(store, tmp_path / "plain").fetch(name)
    published = tmp_path / "adapters_t_f_v1" / "adapter_model.safetensors"
    assert (plain / "adapter_model.safetensors").read_bytes() == published.read_bytes()
    # A restarted replica cannot hash the folded copy against the name: it fetches again.
    again = ReplicaAdapterStore(store, tmp_path / "replica", fold=True).fetch(name)
    assert torch.equal(load_file(str(again / "adapter_model.safetensors"))[key], served[key])


@pytest.mark.parametrize(
    "config, big",
    [
        ({"r": 4, "lora_alpha": 4}, None),  # scaling 1: nothing to fold
        ({"r": 4, "lora_alpha": 6}, None),  # 1.5: not exact in every dtype
        ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 4}}, None),  # per module
        ({"r": 4, "lora_alpha": 8}, 60000.0),  # x 2 overflows float16: stored as it is
    ],
)
def test_adapters_it_cannot_fold_exactly_are_kept_as_published(
    tmp_path: Path, config: dict[str, Any], big: float | None
) -> None:
    import torch

    store = ArtifactStore(f"file://{tmp_path / 'bucket'}")
    config = {"peft_type": "LORA", **config}
    tensors = lora_weights(torch.float16, big=big)
    name = publish_adapter(store, tmp_path, "adapters/t/k/v1", config, tensors)
    local = ReplicaAdapterStore(store, tmp_path / "replica", fold=True).fetch(name)
    published = tmp_path / "adapters_t_k_v1"
    for rel in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (local / rel).read_bytes() == (published / rel).read_bytes(), rel


def test_folding_is_the_same_whatever_the_chunks_the_bytes_arrive_in(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from serving.adapter_source import FoldScaling

    path = tmp_path / "w.safetensors"
    save_file(lora_weights(torch.bfloat16), str(path))
    data = path.read_bytes()

    def folded(sizes: list[int]) -> bytes:
        fold, out, at = FoldScaling(4.0), b"", 0
        for size in sizes:
            out += fold.feed(data[at : at + size])
            at += size
        out += fold.feed(data[at:]) + fold.finish()
        assert fold.done and not fold.failed
        return out

    whole = folded([])
    assert len(whole) == len(data) and whole != data
    for step in (1, 7, 64, 1000):
        assert folded([step] * (len(data) // step)) == whole, step


def test_a_header_with_offsets_outside_the_data_is_not_folded(tmp_path: Path) -> None:
    """An uploaded file's header is the uploader's: offsets before the data (into the
    header) or backwards leave every byte as it came."""
    import json

    from serving.adapter_source import FoldScaling

    for offsets in ([-16, 0], [8, 4]):
        header = json.dumps({"m.lora_B.weight": {"dtype": "F32", "shape": [2],
                                                 "data_offsets": offsets}}).encode()  # fmt: skip
        data = len(header).to_bytes(8, "little") + header + bytes(range(16))
        fold = FoldScaling(2.0)
        assert fold.feed(data) + fold.finish() == data
        assert fold.failed, offsets

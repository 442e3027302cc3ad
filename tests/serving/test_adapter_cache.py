"""The local adapter cache's bounds: least recently used versions are deleted past a count or
a byte bound, never one a request holds or a replica has loaded, and an evicted version comes
back verified. The cache does not parse adapter files, so small stand-in files do here.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from api.models.adapters import AdapterVersion
from api.storage import ArtifactStore
from serving.cache import AdapterCache

KIB = 1024


def stored_version(
    store: ArtifactStore, tmp_path: Path, n: int, *, size: int = KIB
) -> AdapterVersion:
    """A version whose two files are in the store, as registration leaves them."""
    source = tmp_path / "src" / str(n)
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text(f'{{"r": 8, "n": {n}}}')
    (source / "adapter_model.safetensors").write_bytes(os.urandom(size))
    prefix = f"adapters/t/line{n}/job{n}"
    stored = store.put_dir(prefix, source)
    return AdapterVersion(
        id=f"adv-{n:04d}", adapter_id="adapter-x", tenant_id="t", version=1, serial=n,
        job_id=f"job{n}", fine_tuned_model=f"ft:base:t:line{n}:{n:08d}", base_model="base",
        storage_prefix=prefix, files={k: {"sha256": v.sha256, "size": v.size}
                                      for k, v in stored.items()},
        size_bytes=sum(v.size for v in stored.values()), rank=8, target_modules=["q_proj"],
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(f"file://{tmp_path / 'artifacts'}")


def cached(cache: AdapterCache) -> set[str]:
    return {p.name for p in cache.root.glob("adv-*")}


def use(cache: AdapterCache, version: AdapterVersion) -> bool:
    """One request's use: fetch if needed, then done; says whether it fetched."""
    _, fetched = asyncio.run(cache.ensure(version))
    cache.release(version.id)
    return fetched


def test_least_recently_used_versions_go_past_the_count_bound(
    store: ArtifactStore, tmp_path: Path
) -> None:
    events: list[str] = []
    cache = AdapterCache(store=store, root=tmp_path / "cache", max_adapters=2,
                         on_event=events.append)  # fmt: skip
    v = [stored_version(store, tmp_path, n) for n in range(4)]
    use(cache, v[0])
    use(cache, v[1])
    assert not use(cache, v[0])  # a hit: v[0] is now the most recently used
    assert use(cache, v[2])
    assert cached(cache) == {v[0].id, v[2].id} and events == ["cache_evict"]
    assert use(cache, v[1])  # evicted, asked for again: fetched and verified again
    assert cached(cache) == {v[1].id, v[2].id}
    assert cache.in_use() == {}


def test_versions_in_use_or_loaded_on_a_replica_are_spared(
    store: ArtifactStore, tmp_path: Path
) -> None:
    v = [stored_version(store, tmp_path, n) for n in range(4)]
    loaded = {v[1].fine_tuned_model}
    cache = AdapterCache(store=store, root=tmp_path / "cache", max_adapters=2,
                         loaded=lambda: loaded)  # fmt: skip

    async def scenario() -> None:
        await cache.ensure(v[0])  # a request still running on v[0]
        for version in v[1:]:
            await cache.ensure(version)
            cache.release(version.id)

    asyncio.run(scenario())
    # v[0] is held and v[1] is on a replica: the bound yields (soft), v[2] went instead.
    assert cached(cache) == {v[0].id, v[1].id, v[3].id}
    cache.release(v[0].id)
    loaded.clear()
    assert cache.prune(keep_names=()) == [v[0].id]  # both are now idle, v[0] the oldest use
    assert cached(cache) == {v[1].id, v[3].id}


def test_the_byte_bound_and_copies_left_by_an_earlier_run(
    store: ArtifactStore, tmp_path: Path
) -> None:
    v = [stored_version(store, tmp_path, n, size=100 * KIB) for n in range(4)]
    earlier = AdapterCache(store=store, root=tmp_path / "cache")  # no bounds: keeps all
    for version in v[:2]:
        use(earlier, version)
    os.utime(earlier.path_of(v[0].id), (1, 1))  # the older of the two
    cache = AdapterCache(store=store, root=tmp_path / "cache", max_bytes=250 * KIB)
    use(cache, v[2])
    assert cached(cache) == {v[1].id, v[2].id}  # the earlier run's oldest went first
    use(cache, v[3])
    assert cached(cache) == {v[2].id, v[3].id}
    assert not use(cache, v[2])  # what stays is still served from the cache

"""Adapter integrity: an adapter whose bytes or config are not what the registry accepted is
never served. Registration rejects lying configs; the artifact store's copy is verified
against the registry's sha256 on fetch (refused with a clean OpenAI-shaped error, a log line
and a metric); the local cache's copy is re-verified and repaired from the store. Real
adapters from the trainer, the gateway over the transformers engine on the tiny base.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api.settings import Settings
from api.storage import ArtifactStore
from serving.engines.transformers import TransformersEngine
from tests.serving.conftest import LiveServer, Reference, answer, chat
from tests.serving.servingdata import QUESTIONS, TenantKey, register, variant

pytestmark = pytest.mark.timeout(300)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def metric(server: LiveServer, name: str, **labels: str) -> float:
    value = server.app.state.registry.get_sample_value(name, labels)
    return float(value or 0)


def padded(adapter_dir: Path, out: Path, *, rank: int) -> Path:
    """The same adapter with its LoRA matrices zero-padded to `rank` (same outputs, since the
    config's r, and so the scaling, is unchanged): weights whose rank the config understates."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    shutil.copy(adapter_dir / CONFIG, out / CONFIG)
    weights = load_file(adapter_dir / WEIGHTS)
    for name, w in weights.items():
        if ".lora_A." in name:
            weights[name] = torch.cat([w, w.new_zeros(rank - w.shape[0], w.shape[1])])
        elif ".lora_B." in name:
            weights[name] = torch.cat([w, w.new_zeros(w.shape[0], rank - w.shape[1])], dim=1)
    save_file(weights, out / WEIGHTS)
    return out


# Registration: a config that lies is rejected and never served --------------------------


LYING_CONFIGS = {  # case: (adapter_config.json patch, the rejection reason it must give)
    "rank-above-max": ({"r": 64, "lora_alpha": 128}, "rank 64 exceeds"),
    "rank-pattern-above-max": ({"rank_pattern": {"q_proj": 64}}, "rank 64 exceeds"),
    "other-base": ({"base_model_name_or_path": "other-model"}, "trained on base"),
    "understated-rank": ({}, "declares rank(s) [8] but the weights have rank(s) [16]"),
    "not-safetensors": ({}, "not a valid safetensors file"),
}


@pytest.mark.parametrize("case", LYING_CONFIGS)
def test_a_version_whose_config_lies_is_rejected_and_never_served(
    transformers_gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    tmp_path: Path,
    case: str,
) -> None:
    patch, why = LYING_CONFIGS[case]
    source = adapters["a"]
    if case == "understated-rank":
        source = padded(source, tmp_path / "padded", rank=16)
    adapter_dir = variant(source, tmp_path / "lying", scale=1.0)
    if case == "not-safetensors":
        (adapter_dir / WEIGHTS).write_bytes((adapter_dir / WEIGHTS).read_bytes()[:100])
    version = register(serving_settings, tenant=tenants["a"], suffix=f"lie-{case}",
                       adapter_dir=adapter_dir, config_patch=patch)  # fmt: skip
    assert version.stage == "rejected" and why in (version.stage_reason or "")
    key = tenants["a"].key
    by_id = chat(transformers_gateway.url, key, version.fine_tuned_model, QUESTIONS[0])
    assert by_id.status_code == 400
    assert by_id.json()["error"]["code"] == "model_not_servable"
    by_name = chat(transformers_gateway.url, key, f"lie-{case}", QUESTIONS[0])
    assert by_name.status_code == 404  # the line has no production version
    assert not transformers_gateway.app.state.gateway.cache.path_of(version.id).exists()


# The artifact store's copy is altered after registration: refused ------------------------


def _flip_tail(data: bytes, other: bytes) -> bytes:
    return data[:-8] + b"\x00\x00\x80\x7f" * 2  # two weights become +inf; same size


def _truncate(data: bytes, other: bytes) -> bytes:
    return data[: len(data) // 2]


def _swap(data: bytes, other: bytes) -> bytes:
    return other  # another adapter's valid weights, same size: a wrong answer if served


def _config_edit(patch: dict[str, Any]) -> Callable[[bytes, bytes], bytes]:
    return lambda data, other: json.dumps({**json.loads(data), **patch}).encode()


STORE_TAMPERING = {
    "weights-altered": (WEIGHTS, _flip_tail),
    "weights-truncated": (WEIGHTS, _truncate),
    "weights-swapped": (WEIGHTS, _swap),
    "config-rank-above-max": (CONFIG, _config_edit({"r": 64, "lora_alpha": 128})),
    "config-other-base": (CONFIG, _config_edit({"base_model_name_or_path": "other-model"})),
}


@pytest.mark.parametrize("case", [*STORE_TAMPERING, "weights-deleted"])
def test_an_adapter_altered_in_the_store_is_refused_cleanly(
    transformers_gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    tenant = tenants["a"]
    version = register(serving_settings, tenant=tenant, suffix=f"tampered-{case}",
                       adapter_dir=variant(adapters["a"], tmp_path / "v", scale=1.0))  # fmt: skip
    other = variant(adapters["b"], tmp_path / "other", scale=1.0)
    store = ArtifactStore(serving_settings.storage_url)
    if case == "weights-deleted":
        store.delete(f"{version.storage_prefix}/{WEIGHTS}")
        reason = "unreadable"
    else:
        rel, tamper = STORE_TAMPERING[case]
        key = f"{version.storage_prefix}/{rel}"
        original = b"".join(store.iter_bytes(key))
        store.put_stream(key, iter([tamper(original, (other / rel).read_bytes())]))
        reason = "altered"
    refused_before = metric(transformers_gateway, "loraplex_serving_adapter_refusals_total",
                            reason=reason)  # fmt: skip
    caplog.set_level(logging.ERROR, logger="serving.gateway")
    for stream in (False, True):  # a stream is refused before it starts, as a whole request
        response = chat(transformers_gateway.url, tenant.key, f"tampered-{case}", QUESTIONS[0],
                        stream=stream)  # fmt: skip
        assert response.status_code == 500, response.text
        assert response.headers["x-should-retry"] == "false"  # the SDK must not resend it
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "adapter_integrity_error"
        assert version.fine_tuned_model in error["message"]
    gateway = transformers_gateway.app.state.gateway
    assert not gateway.cache.path_of(version.id).exists()
    assert list(gateway.cache.root.glob(f".{version.id}.*")) == []  # no half-fetched leftovers
    engine = gateway.engine
    assert isinstance(engine, TransformersEngine)
    assert version.fine_tuned_model not in engine.loaded
    refused = metric(transformers_gateway, "loraplex_serving_adapter_refusals_total",
                     reason=reason)  # fmt: skip
    assert refused == refused_before + 2
    logged = [r.getMessage() for r in caplog.records if r.name == "serving.gateway"]
    assert any(version.fine_tuned_model in m and reason in m for m in logged), logged


# The local cache's copy is altered: verified again, fetched again, served right ----------


@pytest.mark.parametrize("when", ["left-by-an-earlier-run", "rewritten-after-use"])
def test_a_corrupt_cached_copy_is_replaced_from_the_store(
    transformers_gateway: LiveServer,
    serving_settings: Settings,
    tenants: dict[str, TenantKey],
    adapters: dict,
    reference: Reference,
    tmp_path: Path,
    when: str,
) -> None:
    """The cached copy holds another adapter's weights (valid, same size): either a directory
    this process has never verified (left by an earlier run), or one rewritten after use.
    Either way it is hashed again before use, and fetched again from the store."""
    tenant = tenants["a"]
    registered = variant(adapters["a"], tmp_path / "v", scale=1.0)
    version = register(serving_settings, tenant=tenant, suffix=f"cache-{when}",
                       adapter_dir=registered)  # fmt: skip
    url, key = transformers_gateway.url, tenant.key
    cached = transformers_gateway.app.state.gateway.cache.path_of(version.id)
    if when == "rewritten-after-use":
        assert answer(chat(url, key, f"cache-{when}", QUESTIONS[0])) == reference.chat(
            adapters["a"], QUESTIONS[0]
        )
        assert (cached / WEIGHTS).stat().st_mode & 0o222 == 0  # verified files are read-only
        (cached / WEIGHTS).chmod(0o644)
    else:
        cached.mkdir(parents=True)
        shutil.copy(registered / CONFIG, cached / CONFIG)
    wrong = variant(adapters["b"], tmp_path / "other", scale=1.0) / WEIGHTS
    (cached / WEIGHTS).write_bytes(wrong.read_bytes())
    repairs = metric(transformers_gateway, "loraplex_serving_adapter_loads_total",
                     event="cache_repair")  # fmt: skip
    got = answer(chat(url, key, f"cache-{when}", QUESTIONS[0]))
    assert got == reference.chat(adapters["a"], QUESTIONS[0])
    assert got != reference.chat(adapters["b"], QUESTIONS[0])
    assert (cached / WEIGHTS).read_bytes() == (registered / WEIGHTS).read_bytes()
    assert metric(transformers_gateway, "loraplex_serving_adapter_loads_total",
                  event="cache_repair") == repairs + 1  # fmt: skip

"""Test data for the serving tests: a vLLM-compatible tiny Llama, trained adapters, registry
rows made the way a finished job makes them (trainer output -> artifact store -> version).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session

from api.db import get_engine
from api.models.adapters import AdapterVersion
from api.models.jobs import Job
from api.models.tenants import Tenant
from api.services import registry
from api.services.jobs import fine_tuned_model_name
from api.settings import Settings
from api.storage import ArtifactStore
from tests.trainer.trainer_testdata import TINY_FACTS, chat_row, save_tiny_llama, write_jsonl

BASE = "tiny-serve"
# Two tenants' training sets: different facts, so their adapters answer differently.
FACTS_A = TINY_FACTS[:6]
FACTS_B = TINY_FACTS[6:]
QUESTIONS = [q for q, _ in TINY_FACTS[:3] + TINY_FACTS[6:9]]


def build_tiny_base(out: Path) -> Path:
    """A 2-layer Llama, head_dim 64 (vLLM's CPU attention needs a supported head size)."""
    return save_tiny_llama(out, hidden_size=128, intermediate_size=256, heads=2, kv_heads=1)


def train_adapter(base_dir: Path, facts: list[tuple[str, str]], out: Path) -> Path:
    """A real LoRA adapter from the trainer (fp32, r=8, all linear layers, ~2 s)."""
    from trainer.config import TrainConfig
    from trainer.recipe import train

    data = write_jsonl(out.parent / f"{out.name}.jsonl", [chat_row(q, a) for q, a in facts * 2])
    config = TrainConfig.model_validate(
        {
            "base_model": str(base_dir),
            "method": "lora",
            "quantization": "none",
            "precision": "fp32",
            "lora_r": 8,
            "n_epochs": 30,
            "batch_size": 4,
            "learning_rate_multiplier": 50.0,  # a random tiny model needs a big push
            "probe_size": 0,
            "probe_unquantized": False,
        }
    )
    train(config, data_path=data, out_dir=out, home=out.parent / "home")
    return out


def variant(adapter_dir: Path, out: Path, *, scale: float) -> Path:
    """A copy whose lora_B weights are scaled: a valid adapter with distinct weights."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter_dir / "adapter_config.json", out / "adapter_config.json")
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    scaled = {k: v * scale if "lora_B" in k else v for k, v in weights.items()}
    save_file(scaled, out / "adapter_model.safetensors")
    return out


def lower_rank(adapter_dir: Path, out: Path, *, rank: int) -> Path:
    """A copy cut to its first `rank` LoRA components (alpha kept in proportion, so each
    kept component is scaled as before): a valid adapter of another rank, other answers."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = config["lora_alpha"] * rank / config["r"]
    config |= {"r": rank, "lora_alpha": alpha}
    (out / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    cut = {
        k: v[:rank].contiguous() if "lora_A" in k else v[:, :rank].contiguous()
        for k, v in weights.items()
        if "lora_A" in k or "lora_B" in k
    }
    assert len(cut) == len(weights), "only LoRA weights expected"
    save_file(cut, out / "adapter_model.safetensors")
    return out


@dataclass(frozen=True)
class TenantKey:
    tenant_id: str
    key: str
    name: str


def register(
    settings: Settings,
    *,
    tenant: TenantKey,
    suffix: str,
    adapter_dir: Path,
    stage: str = "production",
    config_patch: dict[str, Any] | None = None,
) -> AdapterVersion:
    """What a succeeded job does: name the base, upload, register; then promote if asked.

    `config_patch` edits adapter_config.json first; a version the registry rejects is
    returned as it is (stage `rejected`), not promoted.
    """
    config_path = adapter_dir / "adapter_config.json"
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE
    config |= config_patch or {}
    config_path.write_text(json.dumps(config, indent=2))
    store = ArtifactStore(settings.storage_url)
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        job = Job(
            tenant_id=tenant.tenant_id,
            model=BASE,
            training_file="file-test",
            suffix=suffix,
            method={"type": "supervised"},
            config={},
            hyperparameters={},
            status="succeeded",
        )
        session.add(job)
        session.flush()
        tenant_row = session.get(Tenant, tenant.tenant_id)
        assert tenant_row is not None
        prefix, stored = registry.upload_adapter(store, job=job, adapter_dir=adapter_dir)
        version = registry.register_version(
            session,
            job=job,
            fine_tuned_model=fine_tuned_model_name(job, tenant_row),
            prefix=prefix,
            stored=stored,
            adapter_dir=adapter_dir,
            metrics={},
            lineage={},
            max_rank=settings.max_lora_rank,
        )
        if version.stage == "rejected":
            assert config_patch is not None, version.stage_reason
        else:
            version.stage = stage
        session.commit()
        return version

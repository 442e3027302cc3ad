"""Registry fixtures shared by the API tests: one real adapter made by the trainer, and a
helper that registers it as a finished job's version, the way the worker does."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from sqlmodel import Session

from api.db import get_engine
from api.models.adapters import AdapterVersion
from api.models.jobs import Job
from api.services import registry
from api.settings import Settings
from api.storage import ArtifactStore
from tests.trainer.trainer_testdata import TINY_FACTS, chat_row, write_jsonl

TINY = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real LoRA adapter, trained for a few steps on the tiny base."""
    from trainer.config import parse_config
    from trainer.recipe import train

    tmp = tmp_path_factory.mktemp("tiny-adapter")
    data = write_jsonl(tmp / "train.jsonl", [chat_row(q, a) for q, a in TINY_FACTS])
    config = parse_config(
        {
            "base_model": str(tiny_llama),
            "method": "lora",
            "n_epochs": 1,
            "batch_size": 4,
            "probe_size": 2,
        }
    )
    result = train(config, data_path=data, out_dir=tmp / "adapter", home=tmp / "home")
    return result.out_dir


def add_version(
    settings: Settings,
    adapter_dir: Path,
    *,
    tenant_id: str,
    suffix: str,
    metrics: dict | None = None,
    config_patch: dict | None = None,
) -> AdapterVersion:
    """Register a finished job's adapter, as the worker does on success."""
    work = settings.home / "staging" / suffix / str(random.random())
    shutil.copytree(adapter_dir, work)
    config_path = work / "adapter_config.json"
    config = {
        **json.loads(config_path.read_text()),
        "base_model_name_or_path": TINY,
        **(config_patch or {}),
    }
    config_path.write_text(json.dumps(config))
    store = ArtifactStore(settings.storage_url)
    with Session(get_engine(settings.database_url), expire_on_commit=False) as s:
        job = Job(
            tenant_id=tenant_id,
            model=TINY,
            training_file="file-x",
            suffix=suffix,
            method={},
            config={},
            hyperparameters={},
            status="running",
        )
        s.add(job)
        s.commit()
        prefix, stored = registry.upload_adapter(store, job=job, adapter_dir=work)
        version = registry.register_version(
            s,
            job=job,
            fine_tuned_model=f"ft:{TINY}:t:{suffix}:{job.id[6:14]}",
            prefix=prefix,
            stored=stored,
            adapter_dir=work,
            metrics=metrics or {},
            lineage={"job_id": job.id},
            max_rank=settings.max_lora_rank,
        )
        s.commit()
        return version

"""The adapter registry: turn a finished job's adapter directory into an immutable version.

Compatibility is checked here, when a version is registered, not at its first request: an
adapter the serving pool could not load is registered as `rejected`, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from api.models.adapters import Adapter, AdapterVersion
from api.models.jobs import Job
from api.storage import ArtifactStore, StoredObject

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_name(job: Job) -> str:
    return job.suffix or f"ft-{job.id.removeprefix('ftjob-')[:8]}"


def compatibility_problems(
    adapter_config: dict[str, Any], *, base_model: str, max_rank: int, files: set[str]
) -> list[str]:
    problems = [f"missing {name}" for name in REQUIRED_FILES if name not in files]
    rank = int(adapter_config.get("r", 0))
    if rank > max_rank:
        problems.append(f"rank {rank} exceeds the serving pool's max LoRA rank {max_rank}")
    if adapter_config.get("modules_to_save"):
        problems.append("modules_to_save is set; vLLM cannot serve such adapters")
    declared = adapter_config.get("base_model_name_or_path")
    if declared != base_model:
        problems.append(f"trained on base {declared!r}, not {base_model!r}")
    return problems


def _modules(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return sorted(value or [])


def _get_or_create_adapter(session: Session, *, job: Job) -> Adapter:
    name = adapter_name(job)
    query = select(Adapter).where(Adapter.tenant_id == job.tenant_id, Adapter.name == name)
    adapter = session.exec(query).first()
    if adapter is None:
        adapter = Adapter(tenant_id=job.tenant_id, name=name, base_model=job.model)
        session.add(adapter)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:  # another job of this line created it first
            adapter = session.exec(query).one()
    return adapter


def _next_version(session: Session, adapter: Adapter) -> int:
    current = session.exec(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)
    ).one()
    return int(current or 0) + 1


def _next_serial(session: Session) -> int:
    current = session.exec(select(func.max(AdapterVersion.serial))).one()
    return int(current or 0) + 1


def upload_adapter(
    store: ArtifactStore, *, job: Job, adapter_dir: Path
) -> tuple[str, dict[str, StoredObject]]:
    prefix = f"adapters/{job.tenant_id}/{adapter_name(job)}/{job.id}"
    return prefix, store.put_dir(prefix, adapter_dir)


def register_version(
    session: Session,
    *,
    job: Job,
    fine_tuned_model: str,
    prefix: str,
    stored: dict[str, StoredObject],
    adapter_dir: Path,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    max_rank: int,
) -> AdapterVersion:
    """Add the job's version (in the caller's transaction); idempotent per job."""
    existing = session.exec(select(AdapterVersion).where(AdapterVersion.job_id == job.id)).first()
    if existing is not None:
        return existing
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = compatibility_problems(
        config, base_model=job.model, max_rank=max_rank, files=set(stored)
    )
    adapter = _get_or_create_adapter(session, job=job)
    for _ in range(5):
        version = AdapterVersion(
            adapter_id=adapter.id,
            tenant_id=job.tenant_id,
            version=_next_version(session, adapter),
            serial=_next_serial(session),
            job_id=job.id,
            fine_tuned_model=fine_tuned_model,
            base_model=job.model,
            storage_prefix=prefix,
            files={k: {"sha256": v.sha256, "size": v.size} for k, v in stored.items()},
            size_bytes=sum(v.size for v in stored.values()),
            rank=int(config.get("r", 0)),
            target_modules=_modules(config.get("target_modules")),
            metrics=metrics,
            lineage=lineage,
            stage="rejected" if problems else "candidate",
            stage_reason="; ".join(problems) or None,
        )
        session.add(version)
        try:
            with session.begin_nested():
                session.flush()
            return version
        except IntegrityError:  # another registration took the number: take the next one
            session.expunge(version)
    raise RuntimeError(f"could not allocate a version number for {adapter.name}")


def versions_of_job(session: Session, *, job_id: str) -> list[AdapterVersion]:
    return list(
        session.exec(
            select(AdapterVersion)
            .where(AdapterVersion.job_id == job_id)
            .order_by(col(AdapterVersion.version))
        )
    )

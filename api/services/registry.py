"""The adapter registry: turn a finished job's adapter directory into an immutable version.

Compatibility is checked here, when a version is registered, not at its first request: an
adapter the serving pool could not load is registered as `rejected`, with the reason.

Numerics too. An adapter fits the base weights it was trained against: one trained on an NF4
base loses answers on the full-precision base serving runs (docs/trainer.md measured 24/24 on
NF4, 15/24 as served). Each version records the base numerics it was trained on, those a probe
validated it on (its own, plus `full` when the trainer re-probed it on the full-precision
base), and those the pool serves it on; a version never validated on the served numerics is
registered `rejected`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from api.models.adapters import Adapter, AdapterVersion
from api.models.jobs import Job
from api.storage import ArtifactStore, StoredObject

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The base's own 16/32-bit float weights: what vLLM and the transformers engine serve.
FULL = "full"
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def numerics(metrics: dict[str, Any], *, served: str = FULL) -> dict[str, Any]:
    """{trained, validated, served} base numerics of a version, from the trainer's metrics."""
    quantization = metrics.get("quantization") or "none"
    trained = FULL if quantization == "none" else str(quantization)
    validated = {trained}
    if metrics.get("exact_match_unquantized") is not None:
        validated.add(FULL)  # the trainer probed it on the full-precision base too
    return {"trained": trained, "validated": sorted(validated), "served": served}


def numerics_problems(record: dict[str, Any]) -> list[str]:
    if record["served"] in record["validated"]:
        return []
    return [
        f"trained on {record['trained']} base weights and never validated on the "
        f"{record['served']} ones this deployment serves it on (its answers there are "
        "unmeasured; a QLoRA adapter loses answers off its trained numerics): train with "
        "method 'auto' or 'lora', or keep probe_unquantized on"
    ]


def adapter_name(job: Job) -> str:
    return job.suffix or f"ft-{job.id.removeprefix('ftjob-')[:8]}"


def compatibility_problems(
    adapter_config: dict[str, Any],
    *,
    base_model: str,
    max_rank: int,
    files: set[str],
    shapes: dict[str, list[int]] | None = None,
) -> list[str]:
    """Why the serving pool could not (or must not) serve this adapter; empty when it can.

    `shapes` (tensor name -> shape, from the weights file) is checked against the config, so
    a config that understates the rank of its weights is caught here, not in an engine.
    """
    problems = [f"missing {name}" for name in REQUIRED_FILES if name not in files]
    declared = _declared_ranks(adapter_config)
    if max(declared) > max_rank:
        problems.append(f"rank {max(declared)} exceeds the serving pool's max LoRA rank {max_rank}")
    if shapes is not None:
        problems += _weight_problems(shapes, declared=declared, max_rank=max_rank)
    if adapter_config.get("modules_to_save"):
        problems.append("modules_to_save is set; vLLM cannot serve such adapters")
    trained_on = adapter_config.get("base_model_name_or_path")
    if trained_on != base_model:
        problems.append(f"trained on base {trained_on!r}, not {base_model!r}")
    return problems


def _declared_ranks(adapter_config: dict[str, Any]) -> set[int]:
    pattern = adapter_config.get("rank_pattern") or {}
    return {int(adapter_config.get("r", 0)), *(int(r) for r in pattern.values())}


def _weight_problems(
    shapes: dict[str, list[int]], *, declared: set[int], max_rank: int
) -> list[str]:
    # peft stores lora_A as (rank, in_features) and lora_B as (out_features, rank).
    ranks = {s[0] for k, s in shapes.items() if ".lora_A." in k and s}
    ranks |= {s[-1] for k, s in shapes.items() if ".lora_B." in k and s}
    if not ranks:
        return ["adapter_model.safetensors holds no LoRA weights"]
    problems = []
    if max(ranks) > max_rank:
        problems.append(
            f"the weights have rank {max(ranks)}, above the serving pool's max LoRA rank {max_rank}"
        )
    if not ranks <= declared:
        problems.append(
            f"adapter_config.json declares rank(s) {sorted(declared)} but the weights have "
            f"rank(s) {sorted(ranks)}"
        )
    return problems


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets} from a safetensors file's header (no
    torch, no tensor reads).

    The format is an 8-byte little-endian header length, then that many bytes of JSON.
    Raises ValueError for a file that is not safetensors (truncated, another format).
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise ValueError(f"header length {length} does not fit the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError("the header is not JSON") from e
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        shape = info.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise ValueError(f"tensor {name!r} has no valid shape")
        tensors[name] = info
    return tensors


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape (see `safetensors_header`)."""
    return {name: list(info.get("shape", [])) for name, info in safetensors_header(path).items()}


def modules_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return sorted(value or [])


def get_or_create_adapter(
    session: Session, *, tenant_id: str, name: str, base_model: str
) -> Adapter:
    """The tenant's adapter `name`, created on `base_model` if it is new (in the caller's
    transaction; a concurrent creator's row wins)."""
    query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    adapter = session.exec(query).first()
    if adapter is None:
        adapter = Adapter(tenant_id=tenant_id, name=name, base_model=base_model)
        try:
            with session.begin_nested():  # (begin_nested flushes what is pending: add inside)
                session.add(adapter)
                session.flush()
        except IntegrityError:  # another registration of this name created it first
            adapter = session.exec(query).one()
    return adapter


def add_version(session: Session, adapter: Adapter, **fields: Any) -> AdapterVersion:
    """A new version of `adapter` (in the caller's transaction) with the next free version
    number and serial; a number taken by a concurrent registration is retried."""
    for _ in range(5):
        version = AdapterVersion(
            adapter_id=adapter.id,
            version=_next_version(session, adapter),
            serial=_next_serial(session),
            **fields,
        )
        try:
            with session.begin_nested():
                session.add(version)
                session.flush()
            return version
        except IntegrityError:  # another registration took the number: take the next one
            if version in session:  # the savepoint's rollback may have expunged it already
                session.expunge(version)
    raise RuntimeError(f"could not allocate a version number for {adapter.name}")


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
    served_numerics: str = FULL,
) -> AdapterVersion:
    """Add the job's version (in the caller's transaction); idempotent per job."""
    existing = session.exec(select(AdapterVersion).where(AdapterVersion.job_id == job.id)).first()
    if existing is not None:
        return existing
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems, shapes = [], None
    try:
        shapes = safetensors_shapes(adapter_dir / "adapter_model.safetensors")
    except FileNotFoundError:
        pass  # reported as a missing file below
    except ValueError as e:
        problems.append(f"adapter_model.safetensors is not a valid safetensors file ({e})")
    problems += compatibility_problems(
        config, base_model=job.model, max_rank=max_rank, files=set(stored), shapes=shapes
    )
    metrics = {**metrics, "numerics": numerics(metrics, served=served_numerics)}
    problems += numerics_problems(metrics["numerics"])
    adapter = get_or_create_adapter(
        session, tenant_id=job.tenant_id, name=adapter_name(job), base_model=job.model
    )
    return add_version(
        session,
        adapter,
        tenant_id=job.tenant_id,
        job_id=job.id,
        fine_tuned_model=fine_tuned_model,
        base_model=job.model,
        storage_prefix=prefix,
        files=stored_files(stored),
        size_bytes=sum(v.size for v in stored.values()),
        rank=int(config.get("r", 0)),
        target_modules=modules_of(config.get("target_modules")),
        metrics=metrics,
        lineage=lineage,
        stage="rejected" if problems else "candidate",
        stage_reason="; ".join(problems) or None,
    )


def stored_files(stored: dict[str, StoredObject]) -> dict[str, dict[str, Any]]:
    """A version's `files`: path -> {sha256, size}, from what the store wrote."""
    return {k: {"sha256": v.sha256, "size": v.size} for k, v in stored.items()}


def versions_of_job(session: Session, *, job_id: str) -> list[AdapterVersion]:
    return list(
        session.exec(
            select(AdapterVersion)
            .where(AdapterVersion.job_id == job_id)
            .order_by(col(AdapterVersion.version))
        )
    )

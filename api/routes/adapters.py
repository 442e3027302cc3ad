"""Tenant view of the adapter registry: /v1/adapters."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api.db import unix
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ErrorResponse, LoraplexError, NotFound, error_responses
from api.models.adapters import MAX_VERSION, Adapter, AdapterVersion
from api.models.tenants import Tenant
from api.multipart import least_file_bytes, read_upload_form
from api.services import adapter_upload, aliases, quotas
from api.services.promotion import verify_version
from api.settings import Settings
from api.storage import ArtifactStore

router = APIRouter(prefix="/v1", tags=["adapters"])
# Bounded so an out-of-range number is a 400, not a database overflow.
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION, description="The version number.")]
AdapterName = Annotated[
    str, Path(pattern=r"^[a-z0-9-]{1,64}$", description="1-64 characters of a-z, 0-9 and '-'.")
]


class ArtifactCorrupted(LoraplexError):
    status_code = 422  # not the client's fault, but retrying will not help either
    type = "server_error"
    default_code = "artifact_integrity_error"


def version_public(v: AdapterVersion, adapter: Adapter, *, samples: bool = True) -> dict[str, Any]:
    """A version's wire shape; without `samples`, its probe scores lose their example
    answers (kilobytes per version), as list views do: one adapter's view keeps them."""
    return {
        "object": "adapter.version",
        "id": v.fine_tuned_model,
        "version": v.version,
        "stage": v.stage,
        "stage_reason": v.stage_reason,
        "canary_percent": adapter.canary_percent if adapter.canary_version_id == v.id else None,
        "base_model": v.base_model,
        "rank": v.rank,
        "target_modules": v.target_modules,
        "size_bytes": v.size_bytes,
        "files": v.files,
        "metrics": v.metrics if samples else without_samples(v.metrics),
        "lineage": v.lineage,
        "created_at": unix(v.created_at),
        "promoted_at": unix(v.promoted_at),
    }


def without_samples(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with each probe's `samples` dropped (scores and counts kept)."""

    def trim(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: trim(v) for k, v in value.items() if k != "samples"}

    return {k: trim(v) for k, v in (metrics or {}).items()}


def versions_of(session: Session, adapter: Adapter) -> list[AdapterVersion]:
    return list(
        session.exec(
            select(AdapterVersion)
            .where(AdapterVersion.adapter_id == adapter.id)
            .order_by(col(AdapterVersion.version))
        )
    )


def adapter_public(
    adapter: Adapter, versions: list[AdapterVersion], *, samples: bool = True
) -> dict[str, Any]:
    production = next((v.version for v in versions if v.stage == "production"), None)
    canary = next((v.version for v in versions if v.id == adapter.canary_version_id), None)
    return {
        "object": "adapter",
        "id": adapter.id,
        "name": adapter.name,
        "tenant_id": adapter.tenant_id,
        "base_model": adapter.base_model,
        "production_version": production,
        "canary_version": canary,
        "canary_percent": adapter.canary_percent if canary else None,
        "created_at": unix(adapter.created_at),
        "versions": [version_public(v, adapter, samples=samples) for v in versions],
    }


def get_adapter(session: Session, *, tenant_id: str, name: str) -> Adapter:
    adapter = session.exec(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    ).first()
    if adapter is None:
        raise NotFound(f"No adapter named {name!r}", param="name", code="adapter_not_found")
    return adapter


@router.get("/adapters")
def list_adapters(tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    adapters = session.exec(
        select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(col(Adapter.name))
    ).all()
    data = [adapter_public(a, versions_of(session, a), samples=False) for a in adapters]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/adapters/{name}", responses=error_responses(404))
def retrieve_adapter(name: str, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    adapter = get_adapter(session, tenant_id=tenant_id, name=name)
    body = adapter_public(adapter, versions_of(session, adapter))
    names = aliases.aliases_of(session, tenant_id=tenant_id, name=name)
    return {**body, "aliases": [a.alias for a in names]}


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field(
        min_length=1,
        max_length=256,
        pattern=aliases.ALIAS_RE.pattern,
        description="Another model name for this adapter, e.g. the hosted ft: id it replaces.",
    )


@router.get("/adapters/{name}/aliases")
def list_aliases(name: AdapterName, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    """The aliases of `name` (set before its adapter exists, too)."""
    rows = aliases.aliases_of(session, tenant_id=tenant_id, name=name)
    return {"object": "list", "data": [aliases.alias_public(a) for a in rows], "has_more": False}


@router.post("/adapters/{name}/aliases", responses=error_responses(400, 409))
def add_alias(
    name: AdapterName,
    body: AliasRequest,
    tenant_id: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Call the adapter `name` by another model name too: it resolves as `name` does (its
    production version). `name` need not exist yet (a migrated job's adapter appears when
    the job succeeds)."""
    row = aliases.add_alias(session, settings, tenant_id=tenant_id, name=name, alias=body.alias)
    return aliases.alias_public(row)


@router.delete("/adapters/{name}/aliases/{alias:path}", responses=error_responses(404))
def delete_alias(
    name: AdapterName, alias: str, tenant_id: TenantDep, session: SessionDep
) -> dict[str, Any]:
    aliases.delete_alias(session, tenant_id=tenant_id, name=name, alias=alias)
    return {"object": "adapter.alias", "alias": alias, "deleted": True}


def _tar_stream(store: ArtifactStore, version: AdapterVersion) -> Iterator[bytes]:
    """An uncompressed tar of the version's files, one file in memory at a time at most."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for rel, info in sorted(version.files.items()):
            member = tarfile.TarInfo(name=rel)
            member.size = int(info["size"])
            with store.open(f"{version.storage_prefix}/{rel}") as f:
                tar.addfile(member, f)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@router.get(
    "/adapters/{name}/versions/{number}/files",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "An uncompressed tar of the version's files.",
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                "X-Loraplex-Files-Sha256": {
                    "description": "JSON object: each file's path to its sha256, hex.",
                    "schema": {"type": "string"},
                }
            },
        },
        **error_responses(404),
        422: {
            "model": ErrorResponse,
            "description": "The stored files failed their integrity check.",
        },
    },
)
def download_version(
    name: str, number: VersionNumber, tenant_id: TenantDep, session: SessionDep, store: StoreDep
) -> StreamingResponse:
    """The version's files as a tar; each file's sha256 in `X-Loraplex-Files-Sha256`."""
    adapter = get_adapter(session, tenant_id=tenant_id, name=name)
    version = session.exec(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == number
        )
    ).first()
    if version is None:
        raise NotFound(
            f"Adapter {name!r} has no version {number}", param="version", code="version_not_found"
        )
    problems = verify_version(store, version)
    if problems:
        raise ArtifactCorrupted(
            f"Stored files of {version.fine_tuned_model} failed their "
            f"integrity check: {'; '.join(problems)}"
        )
    digests = {rel: info["sha256"] for rel, info in sorted(version.files.items())}
    filename = f"{name}-v{number}.tar"
    return StreamingResponse(
        _tar_stream(store, version),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Loraplex-Files-Sha256": json.dumps(digests),
        },
    )


_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A tar of a peft LoRA adapter directory: "
                            "adapter_config.json and adapter_model.safetensors.",
                        },
                        "base_model": {
                            "type": "string",
                            "description": "The base model it adapts; default: the served one.",
                        },
                        "check_only": {
                            "type": "string",
                            "enum": ["true", "false"],
                            "description": "'true': answer the report, register nothing.",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/adapters/{name}/versions",
    openapi_extra=_UPLOAD_SCHEMA,
    responses=error_responses(400, 413),
)
async def upload_version(
    name: AdapterName,
    request: Request,
    tenant_id: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Register a peft LoRA adapter trained elsewhere as the next version of `name`.

    The answer is the new version with `report`: what the adapter is and what would stop
    it being served. An adapter with problems is refused (400 `adapter_not_servable`, the
    problems in the message) and nothing is stored; `check_only=true` only reports.
    """
    room = await run_in_threadpool(quotas.storage_room, session, settings, tenant_id=tenant_id)
    room.check(least_file_bytes(request))
    form = await read_upload_form(
        request,
        new_upload=lambda filename: adapter_upload.AdapterSpool(
            max_bytes=settings.max_upload_bytes, filename=filename, room=room
        ),
    )
    spool = form.upload
    assert spool is not None
    try:
        base_model = form.fields.get("base_model") or settings.base_model
        adapter_upload.check_base_model(base_model, settings)
        adapter_dir, ignored = await run_in_threadpool(spool.unpack)
        report = await run_in_threadpool(
            adapter_upload.inspect,
            adapter_dir,
            base_model=base_model,
            settings=settings,
            ignored=ignored,
        )
        if form.fields.get("check_only", "").lower() == "true":
            return report
        if report["problems"]:
            raise adapter_upload.AdapterRefused(
                f"Adapter refused; it could not be served: {'; '.join(report['problems'])}.",
                param="file",
            )
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        version = await run_in_threadpool(
            adapter_upload.register_upload,
            session,
            store,
            settings,
            tenant=tenant,
            name=name,
            base_model=base_model,
            adapter_dir=adapter_dir,
            report=report,
            filename=spool.filename,
        )
        adapter = session.get(Adapter, version.adapter_id)
        assert adapter is not None
        await run_in_threadpool(start_version_evals, session, settings, version)
        return {**version_public(version, adapter), "report": report}
    finally:
        spool.abort()  # the spool is temporary either way


def start_version_evals(session: Session, settings: Settings, version: AdapterVersion) -> None:
    """A/B for an uploaded version too: the adapter's attached evals run on it (and on
    production and the base where they have none yet), as for a trained one."""
    from api.services import eval_policy
    from workers.celery_app import send_eval_runs

    runs = eval_policy.runs_for_new_version(session, version)
    session.commit()
    send_eval_runs(settings, [run.id for run in runs])

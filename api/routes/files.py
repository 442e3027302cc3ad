"""OpenAI Files API: /v1/files."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import InvalidRequest, error_responses
from api.multipart import least_file_bytes, read_upload_form
from api.services import files, quotas
from api.services.files import Upload
from api.services.pagination import Order, list_body

router = APIRouter(prefix="/v1", tags=["files"])
NOT_FOUND = error_responses(404)
BINARY = {"type": "string", "format": "binary"}

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL, one chat example per line; its filename "
                            "(in the part's Content-Disposition) must end in '.jsonl'.",
                        },
                        "purpose": {"type": "string", "enum": list(files.UPLOAD_PURPOSES)},
                    },
                },
                # Where OpenAPI puts what the part's own headers must say: the name.
                "encoding": {
                    "file": {
                        "headers": {
                            "Content-Disposition": {
                                "schema": {"type": "string"},
                                "example": 'form-data; name="file"; filename="train.jsonl"',
                            }
                        }
                    }
                },
            }
        },
    }
}


@router.post("/files", openapi_extra=_UPLOAD_SCHEMA, responses=error_responses(400))
async def create_file(
    request: Request,
    tenant_id: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Upload a file; a fine-tune JSONL is validated while it streams in."""
    room = await run_in_threadpool(quotas.storage_room, session, settings, tenant_id=tenant_id)
    room.check(least_file_bytes(request))  # a declared length already too large: not one byte read

    def new_upload(filename: str) -> Upload:
        return Upload(
            store,
            tenant_id=tenant_id,
            filename=filename,
            max_bytes=settings.max_upload_bytes,
            room=room,
        )

    form = await read_upload_form(request, new_upload=new_upload)
    assert form.upload is not None
    purpose = form.fields.get("purpose")
    if not purpose:
        form.abort()
        raise InvalidRequest("Missing the 'purpose' field.", param="purpose")
    row = await run_in_threadpool(form.upload.finish, session, purpose=purpose)
    return files.file_public(row)


@router.get("/files")
def list_files(
    tenant_id: TenantDep,
    session: SessionDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Order = "desc",
) -> dict[str, Any]:
    rows, has_more = files.list_files(
        session, tenant_id=tenant_id, purpose=purpose, after=after, limit=limit, order=order
    )
    return list_body([files.file_public(r) for r in rows], has_more)


@router.get("/files/{file_id}", responses=NOT_FOUND)
def retrieve_file(file_id: str, tenant_id: TenantDep, session: SessionDep) -> dict[str, Any]:
    return files.file_public(files.get_file(session, tenant_id=tenant_id, file_id=file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes as uploaded.",
            "content": {"application/octet-stream": {"schema": BINARY}},
            "headers": {
                "X-Loraplex-Sha256": {
                    "description": "sha256 of the content, hex.",
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                }
            },
        },
        **NOT_FOUND,
    },
)
def file_content(
    file_id: str, tenant_id: TenantDep, session: SessionDep, store: StoreDep
) -> StreamingResponse:
    row = files.get_file(session, tenant_id=tenant_id, file_id=file_id)
    return StreamingResponse(
        store.iter_bytes(row.storage_key),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(row.bytes),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}",
            "X-Loraplex-Sha256": row.sha256,
        },
    )


@router.delete("/files/{file_id}", responses=NOT_FOUND)
def delete_file(
    file_id: str, tenant_id: TenantDep, session: SessionDep, store: StoreDep
) -> dict[str, Any]:
    files.delete_file(session, store, tenant_id=tenant_id, file_id=file_id)
    return {"id": file_id, "object": "file", "deleted": True}

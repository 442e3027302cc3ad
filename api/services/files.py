"""Files: streaming upload with validation, listing, content, deletion.

An upload is written to the artifact store while it is scanned, chunk by chunk, so memory
stays bounded whatever the file size. A rejected upload (wrong purpose or extension, over
the limit or the tenant's storage quota, cut off) leaves neither a row nor bytes; an
accepted one is `processed` or, with line-by-line reasons in `status_details`, `error`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from sqlmodel import Session, select

from api.db import unix
from api.errors import InvalidRequest, NotFound, PayloadTooLarge
from api.models.files import File
from api.models.tenants import new_id
from api.services import quotas
from api.services.pagination import Order, page
from api.storage import ArtifactStore, AtomicWrite
from trainer.formats import DatasetScanner

FINE_TUNE = "fine-tune"
EVALS = "evals"  # eval items for runs (api/services/eval_runs.py): JSON objects, one per line
RESULTS = "fine-tune-results"
UPLOAD_PURPOSES = (FINE_TUNE, EVALS)
OPENAI_ONLY_PURPOSES = ("assistants", "batch", "vision", "user_data")
MAX_EVAL_PROBLEMS = 20


def check_purpose(purpose: str) -> None:
    if purpose in UPLOAD_PURPOSES:
        return
    if purpose in OPENAI_ONLY_PURPOSES or purpose == RESULTS:
        why = f"Loraplex does not accept uploads with purpose {purpose!r}"
    else:
        why = f"{purpose!r} is not a valid purpose"
    raise InvalidRequest(
        f"{why}; use 'fine-tune' or 'evals'.", param="purpose", code="invalid_purpose"
    )


def check_filename(filename: str, *, purpose: str) -> None:
    if not filename or len(filename) > 256:
        raise InvalidRequest("The file needs a name of 1-256 characters.", param="file")
    if purpose in UPLOAD_PURPOSES and PurePosixPath(filename).suffix.lower() != ".jsonl":
        raise InvalidRequest(
            f"{'Eval' if purpose == EVALS else 'Fine-tuning'} files must be JSONL ('.jsonl'); "
            f"got {filename!r}.",
            param="file",
            code="invalid_file_format",
        )


class Upload:
    """A file arriving chunk by chunk: stored, hashed, counted and (for datasets) scanned."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        tenant_id: str,
        filename: str,
        max_bytes: int,
        room: quotas.StorageRoom | None = None,
    ):
        self.file_id = new_id("file-")
        self.tenant_id = tenant_id
        self.filename = PurePosixPath(filename.replace("\\", "/")).name
        self.max_bytes = max_bytes
        self.room = room  # the tenant's storage quota, as it stood when the upload began
        self.scanner = DatasetScanner()
        self._write = AtomicWrite(store, f"files/{tenant_id}/{self.file_id}")
        self._write.open()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(
                f"File exceeds the upload limit of {self.max_bytes} bytes.", param="file"
            )
        try:
            if self.room is not None:
                self.room.check(self.size)
        except InvalidRequest:
            self.abort()
            raise
        self._write.write(chunk)
        self.scanner.feed(chunk)

    def abort(self) -> None:
        self._write.abort()

    def finish(self, session: Session, *, purpose: str) -> File:
        """Check what could not be checked before the end, store the row, commit."""
        try:
            check_purpose(purpose)
            check_filename(self.filename, purpose=purpose)
            if self.room is not None:
                # The tenant's other uploads may have landed while this one streamed in.
                used = quotas.tenant_storage_used(session, tenant_id=self.tenant_id)
                replace(self.room, used=used).check(self.size)
            stored = self._write.commit()
        except BaseException:
            self.abort()
            raise
        row = File(
            id=self.file_id,
            tenant_id=self.tenant_id,
            filename=self.filename,
            purpose=purpose,
            bytes=stored.size,
            sha256=stored.sha256,
            storage_key=stored.key,
        )
        if purpose == EVALS:
            _apply_eval_validation(row, self._write.store)
        else:
            self._apply_validation(row)
        session.add(row)
        try:
            session.commit()
        except BaseException:
            self._write.store.delete(stored.key)
            raise
        return row

    def _apply_validation(self, row: File) -> None:
        scanner = self.scanner
        scanner.finish()
        row.stats = scanner.stats.as_dict()
        if scanner.ok:
            row.status, row.status_details = "processed", None
            return
        more = scanner.n_problems - len(scanner.problems)
        details = [f"{scanner.n_problems} problem(s) found:", *scanner.problems]
        if more:
            details.append(f"... and {more} more")
        row.status, row.status_details = "error", "\n".join(details)


def _apply_eval_validation(row: File, store: ArtifactStore) -> None:
    """An eval file: one JSON object per line, `{"item": {...}, "sample"?: {...}}` or the
    item itself; read back once stored (the upload streamed before its purpose was known)."""
    problems: list[str] = []
    n_problems = examples = 0
    with store.open(row.storage_key) as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                ok = isinstance(line, dict) and isinstance(line.get("item", {}), dict)
            except ValueError:
                ok = False
            examples += ok
            if not ok:
                n_problems += 1
                if len(problems) < MAX_EVAL_PROBLEMS:
                    problems.append(f"line {line_no}: not a JSON object (with an object 'item')")
    row.stats = {"examples": examples}
    if examples and not n_problems:
        row.status, row.status_details = "processed", None
        return
    if not examples and not n_problems:
        problems = ["file contains no items"]
        n_problems = 1
    more = n_problems - len(problems)
    details = [
        f"{n_problems} problem(s) found:",
        *problems,
        *([f"... and {more} more"] if more else []),
    ]
    row.status, row.status_details = "error", "\n".join(details)


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
    return row


def list_files(
    session: Session,
    *,
    tenant_id: str,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10000,
    order: Order = "desc",
) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return page(session, query, model=File, after=after, limit=limit, order=order)


def delete_file(session: Session, store: ArtifactStore, *, tenant_id: str, file_id: str) -> None:
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    session.delete(row)
    session.commit()
    # Row first: a crash between the two leaves unreachable bytes, never a row without bytes.
    store.delete(row.storage_key)


def store_result_file(
    session: Session, store: ArtifactStore, *, tenant_id: str, filename: str, data: bytes
) -> File:
    """A platform-written file (e.g. a job's metrics CSV), purpose `fine-tune-results`."""
    file_id = new_id("file-")
    stored = store.put_stream(f"files/{tenant_id}/{file_id}", iter([data]))
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=RESULTS,
        bytes=stored.size,
        sha256=stored.sha256,
        storage_key=stored.key,
        status="processed",
    )
    session.add(row)
    return row


def file_public(row: File) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "sha256": row.sha256,
        "stats": row.stats,
    }
    # Optional in the spec and typed non-null there: absent rather than null (files never
    # expire here; details only when a file was refused).
    if row.status_details is not None:
        body["status_details"] = row.status_details
    return body

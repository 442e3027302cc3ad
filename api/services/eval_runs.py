"""Eval runs: a data source graded against an eval's criteria, on the eval workers.

A run's data source is `jsonl` (items with their samples) or `completions` (items a model
answers: `input_messages` rendered per item, sent through the serving gateway). Its source
is inline (`file_content`) or one of the tenant's files (`file_id`; a line is
`{"item": ..., "sample": ...}`, or the item itself; a chat line also gets `input`, the
messages before its last assistant turn, and `ideal`, that turn's text).

The model of a `completions` run is resolved when the run is made: an adapter name is its
production version then, pinned, so a canary's share never mixes two versions in one run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from api.db import utcnow
from api.errors import Conflict, InvalidRequest, NotFound
from api.models.evals import RUN_ACTIVE, Eval, EvalOutputItem, EvalRun
from api.services import evals, files, graders
from api.services.jobs import DOCUMENTED, check_metadata
from api.services.pagination import Order, page
from api.services.resolver import resolve_model
from api.settings import Settings
from api.storage import ArtifactStore

SAMPLING = {"temperature", "top_p", "seed", "max_completion_tokens"}
DEFAULT_MAX_TOKENS = 256


class RunCreate(BaseModel):
    """POST /v1/evals/{eval_id}/runs, as OpenAI defines it."""

    model_config = ConfigDict(extra="forbid")
    data_source: dict[str, Any] = Field(
        description="jsonl or completions (file_content or file_id source)."
    )
    name: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, json_schema_extra=DOCUMENTED["metadata"])


def _fail(message: str, *, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _source(
    raw: Any, *, ev: Eval, session: Session, tenant_id: str, max_items: int
) -> dict[str, Any]:
    param = "data_source.source"
    if not isinstance(raw, dict) or raw.get("type") not in ("file_content", "file_id"):
        raise _fail("source.type must be 'file_content' or 'file_id'", param=f"{param}.type")
    if raw["type"] == "file_id":
        file_id = raw.get("id")
        if not isinstance(file_id, str):
            raise _fail("source.id must be a file id", param=f"{param}.id")
        try:
            row = files.get_file(session, tenant_id=tenant_id, file_id=file_id)
        except NotFound as e:
            raise NotFound(str(e), param=f"{param}.id", code="file_not_found") from e
        if row.status != "processed":
            raise _fail(
                f"File {file_id} is {row.status}; it cannot be read as eval items.",
                param=f"{param}.id",
            )
        return {"type": "file_id", "id": file_id}
    content = raw.get("content")
    if not isinstance(content, list) or not content:
        raise _fail("source.content must be a non-empty list", param=f"{param}.content")
    if len(content) > max_items:
        raise _fail(
            f"A run holds at most {max_items} items; got {len(content)}.",
            param=f"{param}.content",
            code="too_many_items",
        )
    validator = jsonschema.Draft202012Validator(evals.item_schema(ev))
    for i, entry in enumerate(content):
        where = f"{param}.content[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("item"), dict):
            raise _fail("each content entry is {'item': {...}, 'sample'?: {...}}", param=where)
        if set(entry) - {"item", "sample"}:
            raise _fail("content entries hold only 'item' and 'sample'", param=where)
        if "sample" in entry and not isinstance(entry["sample"], dict):
            raise _fail("sample must be an object", param=f"{where}.sample")
        error = jsonschema.exceptions.best_match(validator.iter_errors(entry["item"]))
        if error is not None:
            raise _fail(
                f"item does not match the eval's item_schema: {error.message}",
                param=f"{where}.item",
            )
    return {"type": "file_content", "content": content}


def _input_messages(raw: Any) -> dict[str, Any]:
    param = "data_source.input_messages"
    if not isinstance(raw, dict):
        raise _fail("input_messages is required for a completions run", param=param)
    if raw.get("type") == "item_reference":
        ref = raw.get("item_reference")
        if not isinstance(ref, str) or not ref.startswith("item.") or len(ref) > 256:
            raise _fail(
                "item_reference is a path like 'item.input'", param=f"{param}.item_reference"
            )
        return {"type": "item_reference", "item_reference": ref}
    if raw.get("type") != "template":
        raise _fail("input_messages.type is 'template' or 'item_reference'", param=f"{param}.type")
    messages = graders.check_messages(raw.get("template"), param=f"{param}.template")
    return {"type": "template", "template": messages}


def _sampling(raw: Any) -> dict[str, Any]:
    param = "data_source.sampling_params"
    raw = raw or {}
    if not isinstance(raw, dict) or set(raw) - SAMPLING:
        unknown = sorted(set(raw) - SAMPLING) if isinstance(raw, dict) else []
        raise _fail(
            f"sampling_params takes {sorted(SAMPLING)}",
            param=f"{param}.{unknown[0]}" if unknown else param,
        )
    bounds = {
        "temperature": (0, 2),
        "top_p": (0, 1),
        "max_completion_tokens": (1, 4096),
        "seed": (0, 2**31 - 1),
    }
    for key, value in raw.items():
        low, high = bounds[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value <= high)
        ):
            raise _fail(f"{key} must be a number in [{low}, {high}]", param=f"{param}.{key}")
    return {"temperature": 0.0, "max_completion_tokens": DEFAULT_MAX_TOKENS, **raw}


def data_source(
    raw: dict[str, Any], *, ev: Eval, session: Session, settings: Settings, tenant_id: str
) -> tuple[dict[str, Any], str, str | None]:
    """The normalized data source, its model ("" for jsonl) and that model's version."""
    kind = raw.get("type")
    known = {
        "jsonl": {"type", "source"},
        "completions": {"type", "source", "input_messages", "model", "sampling_params"},
    }
    if kind not in known:
        raise _fail(
            f"data_source.type {kind!r} is not supported; use 'jsonl' or 'completions'",
            param="data_source.type",
        )
    extra = sorted(set(raw) - known[str(kind)])
    if extra:
        raise _fail(f"Unknown field {extra[0]!r}", param=f"data_source.{extra[0]}")
    source = _source(
        raw.get("source"),
        ev=ev,
        session=session,
        tenant_id=tenant_id,
        max_items=settings.eval_max_items,
    )
    if kind == "jsonl":
        return {"type": "jsonl", "source": source}, "", None
    model = raw.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise _fail("a completions run needs a model", param="data_source.model")
    try:
        found = resolve_model(session, settings, tenant_id=tenant_id, model=model, canary=False)
    except NotFound as e:
        raise NotFound(str(e), param="data_source.model", code="model_not_found") from e
    normalized = {
        "type": "completions",
        "source": source,
        "input_messages": _input_messages(raw.get("input_messages")),
        "model": model,
        "sampling_params": _sampling(raw.get("sampling_params")),
    }
    return normalized, model, found.version.id if found.version else None


def create_run(
    session: Session, settings: Settings, *, tenant_id: str, eval_id: str, req: RunCreate
) -> EvalRun:
    """The run row, committed; the caller enqueues it."""
    ev = evals.get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    check_metadata(req.metadata)
    active = session.exec(
        select(EvalRun.id).where(
            EvalRun.tenant_id == tenant_id, col(EvalRun.status).in_(RUN_ACTIVE)
        )
    ).all()
    if len(active) >= settings.max_active_eval_runs_per_tenant:
        raise Conflict(
            f"You have {len(active)} eval runs queued or running, the most one "
            "tenant may have; wait for some to finish.",
            code="too_many_eval_runs",
        )
    source, model, version_id = data_source(
        req.data_source, ev=ev, session=session, settings=settings, tenant_id=tenant_id
    )
    run = EvalRun(
        eval_id=ev.id,
        tenant_id=tenant_id,
        name=req.name or "",
        model=model,
        adapter_version_id=version_id,
        data_source=source,
        run_metadata=req.metadata,
        result_counts=counts([]),
    )
    session.add(run)
    session.commit()
    return run


def get_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> EvalRun:
    run = session.get(EvalRun, run_id)
    if run is None or run.tenant_id != tenant_id or run.eval_id != eval_id:
        raise NotFound(f"No eval run with id {run_id!r}", param="run_id", code="run_not_found")
    return run


def list_runs(
    session: Session,
    *,
    tenant_id: str,
    eval_id: str,
    after: str | None,
    limit: int,
    order: Order,
    status: str | None,
) -> tuple[list[EvalRun], bool]:
    evals.get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    query = select(EvalRun).where(EvalRun.tenant_id == tenant_id, EvalRun.eval_id == eval_id)
    if status is not None:
        query = query.where(EvalRun.status == status)
    return page(session, query, model=EvalRun, after=after, limit=limit, order=order)


def cancel_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> EvalRun:
    """A queued run is canceled at once; a running one at its next item."""
    run = get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    if run.status not in RUN_ACTIVE:
        raise Conflict(
            f"Run {run_id} is {run.status}; only a queued or running run can be canceled.",
            code="run_not_active",
        )
    run.cancel_requested = True
    if run.status == "queued":
        run.status, run.finished_at = "canceled", utcnow()
    session.add(run)
    session.commit()
    return run


def delete_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> None:
    run = get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    session.exec(delete(EvalOutputItem).where(col(EvalOutputItem.run_id) == run.id))  # type: ignore[call-overload]
    session.delete(run)
    session.commit()


def list_output_items(
    session: Session,
    *,
    tenant_id: str,
    eval_id: str,
    run_id: str,
    after: str | None,
    limit: int,
    order: Order,
    status: str | None,
) -> tuple[list[EvalOutputItem], bool]:
    get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    query = select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
    if status is not None:
        query = query.where(EvalOutputItem.status == status)
    return page(session, query, model=EvalOutputItem, after=after, limit=limit, order=order)


def get_output_item(
    session: Session, *, tenant_id: str, eval_id: str, run_id: str, item_id: str
) -> EvalOutputItem:
    get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    row = session.get(EvalOutputItem, item_id)
    if row is None or row.run_id != run_id:
        raise NotFound(
            f"No output item with id {item_id!r}",
            param="output_item_id",
            code="output_item_not_found",
        )
    return row


# -- what the workers use ---------------------------------------------------------------


def _file_entry(line: dict[str, Any]) -> dict[str, Any]:
    if isinstance(line.get("item"), dict):
        return {k: v for k, v in line.items() if k in ("item", "sample")}
    item = dict(line)
    messages = line.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            item.setdefault("input", messages[:-1])
            item.setdefault("ideal", last["content"])
    return {"item": item}


def entries(
    run: EvalRun, *, session: Session, store: ArtifactStore, max_items: int
) -> Iterator[dict[str, Any]]:
    """The run's `{"item", "sample"?}` entries in order; a file's first `max_items` lines."""
    source = run.data_source["source"]
    if source["type"] == "file_content":
        yield from source["content"]
        return
    row = files.get_file(session, tenant_id=run.tenant_id, file_id=source["id"])
    with store.open(row.storage_key) as fh:
        taken = 0
        for raw in fh:
            if not raw.strip():
                continue
            if taken >= max_items:
                return
            taken += 1
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            yield _file_entry(line) if isinstance(line, dict) else {"item": {"_invalid": True}}


def item_problem(ev: Eval, item: dict[str, Any]) -> str | None:
    """Why `item` does not fit the eval's item schema (None when it does)."""
    if item.get("_invalid"):
        return "the line is not a JSON object"
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(evals.item_schema(ev)).iter_errors(item)
    )
    return None if error is None else f"item does not match the item_schema: {error.message}"


def done_items(session: Session, run_id: str) -> set[int]:
    return set(
        session.exec(
            select(EvalOutputItem.datasource_item_id).where(EvalOutputItem.run_id == run_id)
        ).all()
    )


def record_item(session: Session, row: EvalOutputItem) -> None:
    """Store one graded item; a second store of the same item (a redelivered run) is a no-op."""
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()


def counts(items: list[EvalOutputItem]) -> dict[str, int]:
    statuses = [i.status for i in items]
    return {
        "total": len(statuses),
        "passed": statuses.count("pass"),
        "failed": statuses.count("fail"),
        "errored": statuses.count("error"),
    }


def per_criteria(ev: Eval, items: list[EvalOutputItem]) -> list[dict[str, Any]]:
    out = []
    for criterion in ev.testing_criteria:
        name = criterion["name"]
        results = [r for i in items for r in i.results if r.get("name") == name]
        passed = sum(1 for r in results if r.get("passed"))
        out.append({"testing_criteria": name, "passed": passed, "failed": len(results) - passed})
    return out


def summarize(session: Session, run: EvalRun) -> None:
    """Recount the run's figures from its output items (kept current while it runs)."""
    ev = session.get(Eval, run.eval_id)
    items = list(session.exec(select(EvalOutputItem).where(EvalOutputItem.run_id == run.id)))
    run.result_counts = counts(items)
    run.per_criteria = per_criteria(ev, items) if ev is not None else []


def score(run: EvalRun) -> float | None:
    """The share of items that passed every criterion (errored items count as failed)."""
    total = run.result_counts.get("total", 0)
    return None if not total else run.result_counts.get("passed", 0) / total

"""Evals (OpenAI's Evals API): a tenant's eval definitions.

An eval is a `custom` data source config (the JSON schema of its items, and whether runs
carry samples) and testing criteria (api.services.graders). Criteria are fixed once made:
runs of one eval stay comparable, which is what promotion reads (api.services.eval_policy).
Update changes only the name and metadata, as OpenAI's does.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, delete, select

from api.errors import InvalidRequest, NotFound
from api.models.evals import Eval, EvalOutputItem, EvalRun
from api.services import graders
from api.services.jobs import DOCUMENTED, check_metadata
from api.services.pagination import Order, page

# A tenant's evals: ample for every adapter's suite, not a table anyone can fill.
MAX_EVALS_PER_TENANT = 1000
MAX_SCHEMA_BYTES = 64 * 1024
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "output_text": {"type": "string"},
    },
    "required": ["model", "choices", "output_text"],
}


class EvalCreate(BaseModel):
    """POST /v1/evals, as OpenAI defines it (a `custom` data source config)."""

    model_config = ConfigDict(extra="forbid")
    data_source_config: dict[str, Any]
    testing_criteria: list[Any] = Field(
        description="string_check, text_similarity, label_model or score_model graders (1-16)."
    )
    name: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, json_schema_extra=DOCUMENTED["metadata"])


class EvalUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, json_schema_extra=DOCUMENTED["metadata"])


def _fail(message: str, *, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def data_source_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The stored (and returned) config: `{"type": "custom", "schema": ...}` as OpenAI
    returns it, the item schema under `properties.item`."""
    param = "data_source_config"
    kind = raw.get("type")
    if kind != "custom":
        raise _fail(
            f"data_source_config.type {kind!r} is not supported here; use 'custom' "
            "(stored completions and logs live on OpenAI's side).",
            param=f"{param}.type",
        )
    unknown = set(raw) - {"type", "item_schema", "include_sample_schema"}
    if unknown:
        raise _fail(f"Unknown field {sorted(unknown)[0]!r}", param=f"{param}.{sorted(unknown)[0]}")
    item_schema = raw.get("item_schema")
    if not isinstance(item_schema, dict):
        raise _fail("item_schema must be a JSON schema object", param=f"{param}.item_schema")
    if len(json.dumps(item_schema)) > MAX_SCHEMA_BYTES:
        raise _fail("item_schema is too large (64 KiB at most)", param=f"{param}.item_schema")
    try:
        jsonschema.Draft202012Validator.check_schema(item_schema)
    except jsonschema.SchemaError as e:
        raise _fail(
            f"item_schema is not a valid JSON schema: {e.message}", param=f"{param}.item_schema"
        ) from e
    with_sample = raw.get("include_sample_schema", False)
    if not isinstance(with_sample, bool):
        raise _fail(
            "include_sample_schema must be a boolean", param=f"{param}.include_sample_schema"
        )
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"item": item_schema},
        "required": ["item"],
    }
    if with_sample:
        schema["properties"]["sample"] = SAMPLE_SCHEMA
        schema["required"].append("sample")
    return {"type": "custom", "schema": schema}


def item_schema(ev: Eval) -> dict[str, Any]:
    return dict(ev.data_source_config["schema"]["properties"]["item"])


def create_eval(
    session: Session, *, tenant_id: str, req: EvalCreate, adapter_name: str | None = None
) -> Eval:
    config = data_source_config(req.data_source_config)
    criteria = graders.validate_criteria(req.testing_criteria)
    check_metadata(req.metadata)
    count = len(session.exec(select(Eval.id).where(Eval.tenant_id == tenant_id)).all())
    if count >= MAX_EVALS_PER_TENANT:
        raise _fail(
            f"You have {count} evals, the most one tenant may keep; delete some first.",
            param="data_source_config",
            code="too_many_evals",
        )
    ev = Eval(
        tenant_id=tenant_id,
        name=req.name or "",
        data_source_config=config,
        testing_criteria=criteria,
        eval_metadata=req.metadata,
        adapter_name=adapter_name,
    )
    session.add(ev)
    session.commit()
    return ev


def get_eval(session: Session, *, tenant_id: str, eval_id: str) -> Eval:
    ev = session.get(Eval, eval_id)
    if ev is None or ev.tenant_id != tenant_id:
        raise NotFound(f"No eval with id {eval_id!r}", param="eval_id", code="eval_not_found")
    return ev


def list_evals(
    session: Session, *, tenant_id: str, after: str | None, limit: int, order: Order
) -> tuple[list[Eval], bool]:
    query = select(Eval).where(Eval.tenant_id == tenant_id)
    return page(session, query, model=Eval, after=after, limit=limit, order=order)


def update_eval(session: Session, *, tenant_id: str, eval_id: str, req: EvalUpdate) -> Eval:
    ev = get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    if req.metadata is not None:
        check_metadata(req.metadata)
        ev.eval_metadata = req.metadata
    if req.name is not None:
        ev.name = req.name
    session.add(ev)
    session.commit()
    return ev


def delete_eval(session: Session, *, tenant_id: str, eval_id: str) -> None:
    """The eval, its runs and their output items. A running run stops at its next item."""
    ev = get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    run_ids = select(EvalRun.id).where(EvalRun.eval_id == ev.id)
    session.exec(delete(EvalOutputItem).where(col(EvalOutputItem.run_id).in_(run_ids)))  # type: ignore[call-overload]
    session.exec(delete(EvalRun).where(col(EvalRun.eval_id) == ev.id))  # type: ignore[call-overload]
    session.delete(ev)
    session.commit()

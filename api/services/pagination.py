"""Cursor paging shared by every list endpoint: `after` an id, `limit`, `order`."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from sqlalchemy import and_, or_
from sqlmodel import Session
from sqlmodel.sql.expression import SelectOfScalar

from api.errors import InvalidRequest

T = TypeVar("T")
Order = Literal["asc", "desc"]


def page(
    session: Session,
    query: SelectOfScalar[T],
    *,
    model: Any,
    after: str | None,
    limit: int,
    order: Order = "desc",
) -> tuple[list[T], bool]:
    """One page of `query` ordered by (created_at, id); returns (rows, has_more).

    `after` must be an id that `query` itself can return, so another tenant's id is as
    unknown as a made-up one.
    """
    created, ident = model.created_at, model.id
    if after is not None:
        cursor = session.exec(query.where(ident == after)).first()
        if cursor is None:
            raise InvalidRequest(f"No object with id {after!r} to page after", param="after")
        c_at, c_id = cursor.created_at, cursor.id  # type: ignore[attr-defined]
        if order == "desc":
            query = query.where(or_(created < c_at, and_(created == c_at, ident < c_id)))
        else:
            query = query.where(or_(created > c_at, and_(created == c_at, ident > c_id)))
    sort = (created.desc(), ident.desc()) if order == "desc" else (created.asc(), ident.asc())
    rows = list(session.exec(query.order_by(*sort).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_body(data: list[Any], has_more: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if data:
        body["first_id"] = data[0]["id"]
        body["last_id"] = data[-1]["id"]
    return body

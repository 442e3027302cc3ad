"""Database engine and sessions (SQLModel over SQLite or PostgreSQL), and Alembic upgrade."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, create_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(ts: datetime) -> datetime:
    """SQLite hands timestamps back naive; they are UTC."""
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def unix(ts: datetime | None) -> int | None:
    """A timestamp column as OpenAI's unix seconds (SQLite hands back naive UTC)."""
    return None if ts is None else int(aware(ts).timestamp())


def connection_lost(error: BaseException) -> bool:
    """The database connection broke (a server restart, a failover, a killed backend): the
    same work may succeed on a fresh connection. The pool pre-pings each checkout, so a
    retry gets a live one."""
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the worker and the API read while the other writes; busy_timeout makes a
    # writer wait for the lock instead of failing at once.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=15000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session for code outside a request (CLI, workers); commits on success."""
    with Session(get_engine(url), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def ping(url: str) -> None:
    from sqlalchemy import text

    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def upgrade(url: str, revision: str = "head") -> None:
    """Run Alembic migrations up to `revision` on the database at `url`."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, revision)

"""Real-service fixtures: SQLite and the PostgreSQL on 127.0.0.1:5432 (database `test`).

Each PostgreSQL test gets its own database, cloned from a migrated template made once per
run, so runs and tests never collide.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.db import get_engine, upgrade
from api.main import create_app
from api.services import tenants
from api.settings import Settings
from tests.s3server import s3, s3_server  # noqa: F401  (fixtures)

PG_ADMIN_DSN = os.environ.get("LORAPLEX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{dbname}"


def _pg_exec(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"lpx_tpl_{uuid.uuid4().hex[:10]}"
    _pg_exec(f'CREATE DATABASE "{name}"')
    url = _pg_url(name)
    upgrade(url)
    get_engine(url).dispose()
    get_engine.cache_clear()
    yield name
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fresh_pg(template: str) -> Iterator[str]:
    name = f"lpx_{uuid.uuid4().hex[:12]}"
    _pg_exec(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    url = _pg_url(name)
    yield url
    get_engine(url).dispose()
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'loraplex.db'}"
        upgrade(url)
        yield url
        get_engine(url).dispose()
    else:
        yield from _fresh_pg(request.getfixturevalue("pg_template"))


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(home=tmp_path / "home", database_url=db_url)


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    with Session(get_engine(settings.database_url), expire_on_commit=False) as s:
        yield s


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def new_tenant(settings: Settings, name: str | None = None) -> tuple[str, str]:
    """Create a tenant; returns (tenant_id, raw api key)."""
    with Session(get_engine(settings.database_url)) as s:
        tenant = tenants.create_tenant(s, name=name or f"t-{uuid.uuid4().hex[:8]}")
        _, raw = tenants.create_key(s, tenant_id=tenant.id)
        s.commit()
        return tenant.id, raw


def new_admin_key(settings: Settings) -> str:
    with Session(get_engine(settings.database_url)) as s:
        _, raw = tenants.create_key(s, tenant_id=None, is_admin=True)
        s.commit()
        return raw


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def serve_in_thread(settings: Settings, *, with_gateway: bool = False) -> Iterator[str]:
    """The app on a real uvicorn server on a free loopback port, in a thread."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, with_gateway=with_gateway),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    with serve_in_thread(settings) as url:
        yield url


def stored_files(settings: Settings) -> list[Path]:
    """Every object in the local artifact store (temporary ones included)."""
    root = Path(settings.storage_url.removeprefix("file://"))
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with a ChatML tokenizer: a base model trained in seconds."""
    from tests.trainer.trainer_testdata import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-base"))


@pytest.fixture(scope="session")
def learnable_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama fully trained on the facts with every answer moved one along: it ends
    its answers, all wrong, so a LoRA on the right ones goes from 0 to all of them (a
    fine-tune on the random tiny Llama learns nothing measurable, and such a version needs
    `force` for production)."""
    return make_learnable(tiny_llama, tmp_path_factory.mktemp("learnable-llama"))


def make_learnable(base: Path, out: Path) -> Path:
    """`base` trained on the facts with every answer moved one along, saved in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.trainer.trainer_testdata import TINY_FACTS, chat_row

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    answers = [a for _, a in TINY_FACTS]
    wrong = zip([q for q, _ in TINY_FACTS], answers[1:] + answers[:1], strict=True)
    texts = [
        tokenizer.apply_chat_template(chat_row(q, a)["messages"], tokenize=False) for q, a in wrong
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):  # ~1 s; the loss ends near 0.2
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

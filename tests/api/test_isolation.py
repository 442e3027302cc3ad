"""Tenant isolation, generated from the app's own OpenAPI schema.

Every operation that takes an id or a model name (in its path, query or JSON body) is called
by tenant B with tenant A's real ids, and again with ids that do not exist: both answers must
be the same 4xx with the same body (the id itself aside), so B cannot even learn that A's
objects exist. Admin operations answer tenant keys exactly as an unknown URL does. List
operations never show B anything of A's.

New endpoints are covered automatically; one with an id-like input this file does not know
fails `test_every_id_taking_input_is_in_the_matrix` until it is added to IDS / BODIES.
A path's other ids are the caller's own where it has such an object (B's eval and run when
A's run id is tried), so the call gets as far as the id under test.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.models.adapters import AdapterVersion
from api.settings import Settings
from tests.api.conftest import TINY, add_version
from tests.conftest import _fresh_pg, bearer, new_admin_key, new_tenant
from tests.trainer.trainer_testdata import TINY_FACTS, chat_row

ADAPTER = "isolated-bot"
# Path and query parameters that name an object, mapped to the key of A's value in World.ids.
IDS = {
    "file_id": "file",
    "fine_tuning_job_id": "job",
    "model_id": "model",
    "name": "adapter",
    "adapter_id": "adapter_id",
    "tenant_id": "tenant",
    "key_id": "key",
    "target_id": "job",
    "actor_key_id": "key",
    "alias": "alias",
    "eval_id": "eval",
    "run_id": "run",
    "output_item_id": "output_item",
}
# Parameters that are not ids (plain values, filters on enums, numbers under an id).
NOT_IDS = {"number", "limit", "order", "purpose", "action", "order_by", "status"}
# `after` is a paging cursor: an id of the very list being paged.
AFTER = {"/v1/files": "file", "/v1/fine_tuning/jobs": "job", "/v1/evals": "eval"}
# A valid JSON body per operation, and which of its fields hold ids (field -> World.ids key).
CHAT = {"messages": [{"role": "user", "content": "What colour is the sky?"}], "max_tokens": 2}
EVAL = {
    "name": "isolation",
    "data_source_config": {
        "type": "custom",
        "item_schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "include_sample_schema": True,
    },
    "testing_criteria": [
        {
            "type": "string_check",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "eq",
        }
    ],
}
# A run that generates: its model and its source file are both lookups (dotted: nested).
EVAL_RUN = {
    "data_source": {
        "type": "completions",
        "model": TINY,
        "source": {"type": "file_id", "id": "<own file>"},
        "input_messages": {"type": "item_reference", "item_reference": "item.input"},
    }
}
BODIES: dict[tuple[str, str], tuple[dict[str, Any], dict[str, list[str]]]] = {
    ("POST", "/v1/fine_tuning/jobs"): (
        {"model": TINY, "training_file": "<own file>"},
        {"training_file": ["file"], "validation_file": ["file"], "model": ["model"]},
    ),
    ("POST", "/v1/chat/completions"): (
        {"model": TINY, **CHAT},
        {"model": ["adapter", "model"]},
    ),
    ("POST", "/v1/completions"): (
        {"model": TINY, "prompt": "The sky is", "max_tokens": 2},
        {"model": ["adapter", "model"]},
    ),
    # A valid alias every caller is refused (it would shadow a base model): B's own state
    # then stays the same between its calls with A's name and with a missing one.
    ("POST", "/v1/adapters/{name}/aliases"): ({"alias": TINY}, {}),
    # A judge model (label_model) is resolved when the run calls it, as the run's tenant.
    ("POST", "/v1/evals"): (EVAL, {}),
    ("POST", "/v1/evals/{eval_id}"): ({"metadata": {"team": "a"}}, {}),
    ("POST", "/v1/evals/{eval_id}/runs"): (
        EVAL_RUN,
        {"data_source.model": ["adapter", "model"], "data_source.source.id": ["file"]},
    ),
}
# Inputs that take ids but never one of the caller's own objects: jobs start from base models
# only (not from a fine-tuned model), so even A is refused; B must still learn nothing.
NOT_OWNED = {
    ("POST", "/v1/fine_tuning/jobs", "model"),
    ("POST", "/v1/adapters/{name}/aliases", "name"),  # its body: refused to A as well
}
# Paths whose name is in the caller's own namespace, not a lookup: uploading to a name adds a
# version to the caller's adapter of that name, creating it if need be (A's is never touched:
# tests/api/test_adapter_upload.py). B still gets the same answer for A's name as for any.
OWN_NAMESPACE = {
    ("POST", "/v1/adapters/{name}/versions"),
    ("POST", "/v1/adapters/{name}/aliases"),  # an alias may name an adapter to come
    ("GET", "/v1/adapters/{name}/aliases"),
}


def operations(app_settings: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    schema = create_app(app_settings, with_gateway=True).openapi()
    return [
        (method.upper(), path, op)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    ]


OPERATIONS = operations(Settings(home=Path("/nonexistent"), database_url="sqlite://"))


@dataclass
class World:
    client: TestClient
    ids: dict[str, str]  # A's objects
    a: str  # A's key
    b: str  # B's key
    own_file: str  # B's own valid file, so a body is wrong only in the id under test
    own: dict[str, str]  # B's own objects, for a path's other ids (World.ids keys)

    def ghost(self, kind: str) -> str:
        """An id of the same shape as A's that names nothing."""
        real = self.ids[kind]
        if kind == "model":
            return real.rsplit(":", 1)[0] + ":" + secrets.token_hex(4)
        if kind == "adapter":
            return f"ghost-{secrets.token_hex(4)}"
        head = re.match(r"[a-z]+[-_]", real)
        prefix = head.group(0) if head else ""
        return prefix + secrets.token_hex(len(real) // 2)[: len(real) - len(prefix)]


def _upload(client: TestClient, key: str) -> str:
    rows = [chat_row(q, a) for q, a in TINY_FACTS] * 2
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = client.post(
        "/v1/files",
        headers=bearer(key),
        files={"file": ("train.jsonl", data, "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: Path,
    tiny_adapter: Path,
) -> Iterator[World]:
    from api.db import get_engine, upgrade

    tmp = tmp_path_factory.mktemp("isolation")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'loraplex.db'}"
        upgrade(url)
        urls: Iterator[str] = iter([url])
    else:
        urls = _fresh_pg(request.getfixturevalue("pg_template"))
    url = next(urls)
    settings = Settings(
        home=tmp / "home",
        database_url=url,
        base_model=TINY,
        base_models={TINY: str(tiny_llama)},
        serving_engine="transformers",
        serving_dtype="float32",
    )
    tenant_a, key_a = new_tenant(settings, name="tenant-a")
    tenant_b, key_b = new_tenant(settings, name="tenant-b")
    admin = new_admin_key(settings)
    version = add_version(settings, tiny_adapter, tenant_id=tenant_a, suffix=ADAPTER)
    mirrored = _shadow_pair(settings, version)
    with TestClient(create_app(settings, with_gateway=True)) as client:
        promoted = client.post(
            f"/v1/admin/adapters/{version.adapter_id}/versions/1/promote",
            json={"stage": "production", "force": True},
            headers=bearer(admin),
        )
        assert promoted.status_code == 200, promoted.text
        file_a = _upload(client, key_a)
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": TINY, "training_file": file_a},
            headers=bearer(key_a),
        )
        assert job.status_code == 200, job.text
        keys = client.get(f"/v1/admin/keys?tenant_id={tenant_a}", headers=bearer(admin)).json()
        alias = "ft:gpt-4o-mini-2024-07-18:acme:isolated:9xYz"
        aliased = client.post(
            f"/v1/adapters/{ADAPTER}/aliases", json={"alias": alias}, headers=bearer(key_a)
        )
        assert aliased.status_code == 200, aliased.text
        world = World(
            client=client,
            ids={
                **_eval_objects(client, settings, tenant_id=tenant_a, key=key_a),
                "file": file_a,
                "job": job.json()["id"],
                "model": version.fine_tuned_model,
                "adapter": ADAPTER,
                "adapter_id": version.adapter_id,
                "tenant": tenant_a,
                "key": keys["data"][0]["id"],
                "alias": alias,
                "shadow_sample": mirrored,
            },
            a=key_a,
            b=key_b,
            own_file=_upload(client, key_b),
            own=_eval_objects(client, settings, tenant_id=tenant_b, key=key_b),
        )
        _wait_for_engine(world)
        yield world
    get_engine(url).dispose()
    for _ in urls:  # the Postgres database is dropped when its generator finishes
        pass


def _eval_objects(
    client: TestClient, settings: Settings, *, tenant_id: str, key: str
) -> dict[str, str]:
    """An eval of the tenant's, a (queued) run of it and an output item of that run, as a
    worker would store it."""
    from sqlmodel import Session

    from api.db import get_engine
    from api.models.evals import EvalOutputItem

    ev = client.post("/v1/evals", json=EVAL, headers=bearer(key))
    assert ev.status_code == 200, ev.text
    entry = {"item": {"answer": "blue"}, "sample": {"output_text": "blue"}}
    source = {"type": "file_content", "content": [entry]}
    run = client.post(
        f"/v1/evals/{ev.json()['id']}/runs",
        json={"data_source": {"type": "jsonl", "source": source}},
        headers=bearer(key),
    )
    assert run.status_code == 200, run.text
    item = EvalOutputItem(
        run_id=run.json()["id"],
        eval_id=ev.json()["id"],
        tenant_id=tenant_id,
        datasource_item_id=0,
        datasource_item=entry["item"],
        results=[{"name": "exact", "passed": True, "score": 1.0}],
        sample=entry["sample"],
        status="pass",
    )
    with Session(get_engine(settings.database_url), expire_on_commit=False) as s:
        s.add(item)
        s.commit()
    return {"eval": ev.json()["id"], "run": run.json()["id"], "output_item": item.id}


def _shadow_pair(settings: Settings, version: AdapterVersion) -> str:
    """A request mirrored to A's version (shadow traffic before its promotion), kept as the
    gateway keeps it: B must never see it, through any list or A's names."""
    from sqlmodel import Session

    from api.db import get_engine
    from api.services import shadow

    with Session(get_engine(settings.database_url), expire_on_commit=False) as s:
        sample = shadow.record(
            s,
            adapter_id=version.adapter_id,
            version_id=version.id,
            production_version_id=version.id,
            request={"messages": CHAT["messages"]},
            production_output="A's production answer",
            shadow_output="A's candidate answer",
            latency_ms=12.0,
            error=None,
        )
    assert sample is not None
    return sample.id


def _wait_for_engine(world: World) -> None:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = world.client.post(
            "/v1/chat/completions", json={"model": ADAPTER, **CHAT}, headers=bearer(world.a)
        )
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            return
        time.sleep(0.5)
    raise TimeoutError("the gateway's engine did not start")


def id_inputs(method: str, path: str, op: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, name, kind) for every input of `op` that takes an id or model name. Admin
    operations have none here: tenant keys never get past their auth."""
    if path.startswith("/v1/admin"):
        return []
    found = []
    for param in op.get("parameters", []):
        name, where = param["name"], param["in"]
        if name == "after" and where == "query":
            if path in AFTER:
                found.append(("query", name, AFTER[path]))
            elif "{" not in path:
                raise KeyError(f"{method} {path}: which list does `after` page? Add it to AFTER")
        elif name in IDS:
            found.append((where, name, IDS[name]))
        elif name not in NOT_IDS:
            raise KeyError(f"{method} {path}: is parameter {name!r} an id? Add it to IDS/NOT_IDS")
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        if (method, path) in BODIES:
            for field, kinds in BODIES[(method, path)][1].items():
                found += [("body", field, kind) for kind in kinds]
        else:
            raise KeyError(f"{method} {path}: takes a JSON body; add a valid one to BODIES")
    return found


def test_every_id_taking_input_is_in_the_matrix() -> None:
    """The matrix is derived from the schema; this fails for an input it can't place."""
    covered = [(m, p) for m, p, op in OPERATIONS if id_inputs(m, p, op)]
    admin = [(m, p) for m, p, _ in OPERATIONS if p.startswith("/v1/admin")]
    assert len(admin) >= 15
    assert ("GET", "/v1/files/{file_id}") in covered
    assert ("POST", "/v1/chat/completions") in covered
    assert ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}") in covered
    assert ("POST", "/v1/evals/{eval_id}/runs") in covered
    assert ("GET", "/v1/adapters/{name}/versions/{number}/shadow") in covered
    shadow = "/v1/admin/adapters/{adapter_id}/shadow"
    assert {("GET", shadow), ("POST", shadow), ("DELETE", shadow)} <= set(admin)


def _with_file(value: Any, file_id: str) -> Any:
    """The body template with the caller's own file in place of "<own file>"."""
    if isinstance(value, dict):
        return {k: _with_file(v, file_id) for k, v in value.items()}
    return file_id if value == "<own file>" else value


def _request(world: World, key: str, method: str, path: str, where: str, name: str, value: str):
    params: dict[str, str] = {}
    url = re.sub(r"\{number\}", "1", path)
    body: dict[str, Any] | None = None
    if (method, path) in BODIES:
        own_file = world.own_file if key == world.b else world.ids["file"]
        body = _with_file(BODIES[(method, path)][0], own_file)
    if where == "path":
        url = url.replace("{" + name + "}", value)
    elif where == "query":
        params[name] = value
    else:
        assert body is not None
        *parents, field = name.split(".")  # a dotted name: a field of a nested object
        parent = body
        for step in parents:
            parent = parent[step]
        parent[field] = value
    # Any other path ids: the caller's own where it has one, else A's real ones.
    own = world.own if key == world.b else world.ids
    for other in re.findall(r"\{(\w+)(?::path)?\}", url):
        kind = IDS[other]
        url = re.sub(r"\{" + other + r"(?::path)?\}", own.get(kind, world.ids[kind]), url)
    assert "{" not in url, url
    return world.client.request(method, url, params=params, json=body, headers=bearer(key))


def _same(
    response_a: Any, response_b: Any, value_a: str, value_b: str, *, refused: bool = True
) -> None:
    assert response_a.status_code == response_b.status_code, (response_a.text, response_b.text)
    if refused:
        assert 400 <= response_a.status_code < 500, response_a.text
    text_a = response_a.text.replace(value_a, "<id>")
    text_b = response_b.text.replace(value_b, "<id>")
    assert text_a == text_b


TENANT_CASES = [
    pytest.param(m, p, where, name, kind, id=f"{m} {p} {where}:{name}={kind}")
    for m, p, op in OPERATIONS
    if not p.startswith("/v1/admin")
    for where, name, kind in id_inputs(m, p, op)
]


@pytest.mark.parametrize(("method", "path", "where", "name", "kind"), TENANT_CASES)
def test_tenant_b_gets_for_a_real_id_what_it_gets_for_a_missing_one(
    world: World, method: str, path: str, where: str, name: str, kind: str
) -> None:
    real, ghost = world.ids[kind], world.ghost(kind)
    with_real = _request(world, world.b, method, path, where, name, real)
    with_ghost = _request(world, world.b, method, path, where, name, ghost)
    # In B's own namespace, B's own (empty) view is a fine answer, the same for both.
    _same(with_real, with_ghost, real, ghost, refused=(method, path) not in OWN_NAMESPACE)
    if where == "path" and (method, path) not in OWN_NAMESPACE:
        assert with_real.status_code == 404
    if (method == "GET" or (method, path) in BODIES) and (method, path, name) not in NOT_OWNED:
        # The id is real: A itself gets through.
        own = _request(world, world.a, method, path, where, name, real)
        assert own.status_code == 200, own.text


ADMIN_CASES = [
    pytest.param(m, p, id=f"{m} {p}") for m, p, _ in OPERATIONS if p.startswith("/v1/admin")
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CASES)
def test_admin_routes_are_unknown_urls_to_tenant_keys(world: World, method: str, path: str) -> None:
    kinds = {name: IDS.get(name) for name in re.findall(r"\{(\w+)\}", path)}
    url = path.replace("{number}", "1")
    for name, kind in kinds.items():
        if kind is not None:
            url = url.replace("{" + name + "}", world.ids[kind])
    unknown = "/v1/admin/no-such-route"
    for key in (world.a, world.b):
        response = world.client.request(method, url, json={}, headers=bearer(key))
        missing = world.client.request(method, unknown, json={}, headers=bearer(key))
        assert response.status_code == missing.status_code == 404
        assert response.text.replace(url, "<url>") == missing.text.replace(unknown, "<url>")


LISTS = [
    pytest.param(p, id=p)
    for m, p, _ in OPERATIONS
    if m == "GET" and "{" not in p and p.startswith("/v1/") and not p.startswith("/v1/admin")
]


@pytest.mark.parametrize("path", LISTS)
def test_lists_show_tenant_b_nothing_of_tenant_a(world: World, path: str) -> None:
    seen_by_a = world.client.get(path, headers=bearer(world.a))
    seen_by_b = world.client.get(path, headers=bearer(world.b))
    assert seen_by_a.status_code == seen_by_b.status_code == 200
    leaked = [v for v in world.ids.values() if v in seen_by_b.text]
    assert leaked == []
    assert any(v in seen_by_a.text for v in world.ids.values())

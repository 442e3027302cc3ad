"""Schemathesis fuzz of the control plane against its own /openapi.json (issue #9).

Every operation of the control plane's schema (the app without the serving gateway, whose
chat/completions need an engine) is called over ASGI with generated valid and invalid
input: a tenant key on tenant routes, an admin key on /v1/admin, and one case in four the
other key. Every response must be documented (status, content type, headers, body), none a
5xx; schema-valid input must be accepted; keyed routes must refuse no key and a bad one.
Ids in paths, cursors and job bodies are often swapped for real rows (a processed file, a
queued job, a registered adapter version mirrored to by shadow traffic with a kept pair, a
spare key, an eval with a queued run and an output item), so routes reach their found
branches as well as their 404. POST /v1/files
(our own streaming multipart parser) is fuzzed too: its schema gives the parts and the
`.jsonl` filename.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.core.parameters import ParameterLocation
from sqlmodel import Session

from api.db import get_engine
from api.main import create_app
from api.models.adapters import AdapterVersion
from api.services import shadow, tenants
from api.settings import Settings
from serving.zero_adapter import zero_adapter_files
from tests.api.conftest import TINY, add_version
from tests.conftest import bearer, new_admin_key, new_tenant
from tests.trainer.trainer_testdata import chat_row


@dataclass
class Seeded:
    app: FastAPI
    tenant_key: str
    admin_key: str
    real: dict[str, Any]  # parameter or body field -> a real row's id
    cursors: dict[str, str]  # list path -> a real `after`


def _adapter_dir(folder: Path) -> Path:
    """A small valid LoRA adapter (all zeros, rank 1), written without torch."""
    folder.mkdir(parents=True)
    shape = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
    for name, data in zero_adapter_files(shape, base_name=TINY).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def seeded(settings: Settings) -> Seeded:
    tenant_id, tenant_key = new_tenant(settings)
    admin_key = new_admin_key(settings)
    app = create_app(settings)
    rows = "".join(json.dumps(chat_row(f"q{i}?", f"a{i}.")) + "\n" for i in range(12))
    adapter = _adapter_dir(settings.home / "adapter")
    version = add_version(settings, adapter, tenant_id=tenant_id, suffix="fuzzed")
    with TestClient(app) as client:
        upload = client.post(
            "/v1/files",
            headers=bearer(tenant_key),
            files={"file": ("train.jsonl", rows.encode())},
            data={"purpose": "fine-tune"},
        )
        assert upload.json()["status"] == "processed", upload.text
        file_id = upload.json()["id"]
        job = client.post(
            "/v1/fine_tuning/jobs",
            headers=bearer(tenant_key),
            json={"model": settings.base_model, "training_file": file_id},
        )
        assert job.status_code == 200, job.text
        evals = _eval_rows(client, settings, tenant_id=tenant_id, key=tenant_key)
        shadowed = client.post(
            f"/v1/admin/adapters/{version.adapter_id}/shadow",
            headers=bearer(admin_key),
            json={"version": 1, "percent": 10},
        )
        assert shadowed.status_code == 200, shadowed.text
    with Session(get_engine(settings.database_url), expire_on_commit=False) as s:
        spare_key, _ = tenants.create_key(s, tenant_id=tenant_id, name="spare")
        s.commit()
        _mirrored_pair(s, version)
    job_id = job.json()["id"]
    real = {
        "file_id": file_id,
        "training_file": file_id,
        "validation_file": file_id,
        "fine_tuning_job_id": job_id,
        "model_id": settings.base_model,
        "model": settings.base_model,
        "name": "fuzzed",
        "number": 1,
        "version": 1,  # the shadow version (a candidate)
        "adapter_id": version.adapter_id,
        "tenant_id": tenant_id,
        "key_id": spare_key.id,
        **evals,
    }
    cursors = {
        "/v1/files": file_id,
        "/v1/fine_tuning/jobs": job_id,
        "/v1/evals": evals["eval_id"],
        "/v1/evals/{eval_id}/runs": evals["run_id"],
        "/v1/evals/{eval_id}/runs/{run_id}/output_items": evals["output_item_id"],
    }
    return Seeded(app=app, tenant_key=tenant_key, admin_key=admin_key, real=real, cursors=cursors)


def _eval_rows(
    client: TestClient, settings: Settings, *, tenant_id: str, key: str
) -> dict[str, str]:
    """An eval, a queued run of it, and one output item as the eval worker stores it."""
    from api.models.evals import EvalOutputItem

    entry = {"item": {"q": "2+2?"}, "sample": {"output_text": "4"}}
    ev = client.post(
        "/v1/evals",
        headers=bearer(key),
        json={
            "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
            "testing_criteria": [
                {
                    "type": "string_check",
                    "name": "four",
                    "input": "{{sample.output_text}}",
                    "reference": "4",
                    "operation": "eq",
                }
            ],
        },
    )
    assert ev.status_code == 200, ev.text
    eval_id = ev.json()["id"]
    run = client.post(
        f"/v1/evals/{eval_id}/runs",
        headers=bearer(key),
        json={"data_source": {"type": "jsonl", "source": {"type": "file_content",
                                                          "content": [entry]}}},
    )  # fmt: skip
    assert run.status_code == 200, run.text
    item = EvalOutputItem(
        run_id=run.json()["id"], eval_id=eval_id, tenant_id=tenant_id, datasource_item_id=0,
        datasource_item=entry["item"], sample=entry["sample"], status="pass",
        results=[{"name": "four", "type": "string_check", "score": 1.0, "passed": True}],
    )  # fmt: skip
    with Session(get_engine(settings.database_url), expire_on_commit=False) as s:
        s.add(item)
        s.commit()
    return {"eval_id": eval_id, "run_id": run.json()["id"], "output_item_id": item.id}


def _mirrored_pair(session: Session, version: AdapterVersion) -> None:
    """A by-name request mirrored to the version, as the gateway keeps the pair."""
    shadow.record(
        session,
        adapter_id=version.adapter_id,
        version_id=version.id,
        production_version_id=version.id,
        request={"messages": [{"role": "user", "content": "2+2?"}]},
        production_output="4",
        shadow_output="four",
        latency_ms=12.0,
        error=None,
    )


# The schema is read at collection time from an app that never touches its database; the
# calls go to the seeded app of each test. (schemathesis' lazy `from_fixture` loader pokes at
# pytest internals that pytest 9.2 no longer has.)
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Settings(home=Path("/nonexistent/loraplex-fuzz")))
)
# The test sends a real key itself (tenant or admin by route): schemathesis must not count a
# generated Authorization header as the invalid part of a request the key then makes valid.
# `ignored_auth` still probes every keyed route without a key and with a bad one.
schema.config.generation.update(with_security_parameters=False)


# Schema-valid input that the schema cannot describe and the API rightly refuses with 400
# (as OpenAI does), by the error's (param, code); code None: any code. Every other 400 to
# schema-valid input is still a failure.
REFUSED_BEYOND_SCHEMA = {
    # Stored data and row state: the schema cannot say "an id that exists".
    ("after", None),  # a cursor must be the id of an object the list holds
    ("model", "model_not_available"),  # a registered base model
    ("training_file", None),  # an uploaded, processed file of this tenant
    ("validation_file", None),
    ("fine_tuning_job_id", "job_not_cancellable"),  # cancelling a finished job
    ("fine_tuning_job_id", "job_not_pausable"),  # pausing a finished job
    ("fine_tuning_job_id", "job_not_paused"),  # resuming a job that is not paused
    # An uploaded adapter's bytes: a tar of a LoRA adapter this deployment can serve.
    ("file", "adapter_not_servable"),
    ("base_model", "model_not_found"),  # a registered base model
    # Across fields: hyperparameters in `method` or at the top level, not both.
    ("hyperparameters", "invalid_value"),
}
# The trainer's range and cross-field rules (n_epochs 1-100, no warmup with a constant
# schedule, ...), reported against the hyperparameter they concern. Their keys and types are
# in the schema, so only these rules are let through.
TRAINER_RULES = (
    "method.supervised.hyperparameters.",
    "method.dpo.hyperparameters.",
    "hyperparameters.",
)
# Across fields: a method's settings sit under the key its `type` names (OpenAI's rule; the
# schema lets a client send any of the keys with any type).
METHOD_KEY_RULE = "method.type is"
# The Evals API's unions (a data source config, graders, a run's data source) are open
# objects in the schema; the service checks their shape (the item schema, the templates,
# an item against it), each refusal naming the field inside them.
EVAL_SHAPES = {"data_source_config", "testing_criteria", "data_source"}


def positive_data_acceptance_beyond_schema(ctx: Any, response: Any, case: Case) -> None:
    """schemathesis' `positive_data_acceptance`, less the 400s above."""
    if response.status_code == 400:
        error = json.loads(response.content)["error"]
        param = error["param"] or ""
        if {(param, None), (param, error["code"])} & REFUSED_BEYOND_SCHEMA:
            return
        if param.startswith(TRAINER_RULES) and error["code"] == "invalid_value":
            return
        if param.startswith("method.") and error["message"].startswith(METHOD_KEY_RULE):
            return
        if re.split(r"[.\[]", param)[0] in EVAL_SHAPES:
            return
    schemathesis.checks.positive_data_acceptance(ctx, response, case)


def _use_real_ids(case: Case, seeded: Seeded) -> None:
    """Point the case's ids at real rows, except where invalid input is what it tests."""
    real = {**seeded.real, "after": seeded.cursors.get(case.path)}
    for location, values in [
        (ParameterLocation.PATH, case.path_parameters),
        (ParameterLocation.QUERY, case.query),
        (ParameterLocation.BODY, case.body if isinstance(case.body, dict) else None),
    ]:
        if not values or (case.meta is not None and case.meta.is_negative_at(location)):
            continue
        for name in values:
            if real.get(name) is not None:
                values[name] = real[name]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
# One case in four swaps the keys: a tenant key on /v1/admin (404) or an admin key on a
# tenant route (401); both must be documented answers too.
@schema.given(real_ids=st.booleans(), swap_keys=st.sampled_from([False, False, False, True]))
@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    # One seeded database per operation, shared by its examples on purpose: what one example
    # created or deleted is state for the next to meet.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_api_conforms_to_its_schema(
    case: Case, real_ids: bool, swap_keys: bool, seeded: Seeded
) -> None:
    if real_ids:
        _use_real_ids(case, seeded)
    admin = case.path.startswith("/v1/admin") != swap_keys
    key = seeded.admin_key if admin else seeded.tenant_key
    case.call_and_validate(
        headers=bearer(key),
        app=seeded.app,
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
        additional_checks=[positive_data_acceptance_beyond_schema],
    )


def test_schema_documents_errors_in_the_openai_shape() -> None:
    """No FastAPI 422 body left; each error status is the OpenAI error; keyed routes say so."""
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema.raw_schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"401", "413"} <= set(responses), (method, path)
            assert operation["security"] == [{"bearer": []}], (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    assert response["content"] == {"application/json": {"schema": error}}
    assert "HTTPValidationError" not in schema.raw_schema["components"]["schemas"]


def test_nul_characters_are_refused_not_a_server_error(
    client: TestClient, settings: Settings
) -> None:
    """PostgreSQL text cannot hold NUL (SQLite, which the fuzz runs on, can): a 400, not 500."""
    admin, (_, key) = new_admin_key(settings), new_tenant(settings)
    for key_, method, url, body in [
        (admin, "POST", "/v1/admin/tenants", {"name": "a\x00b"}),
        (key, "GET", "/v1/files?purpose=a%00b", None),
        (key, "GET", "/v1/files/file-%00", None),
        (admin, "GET", "/v1/admin/audit?action=%00", None),
    ]:
        response = client.request(method, url, headers=bearer(key_), json=body)
        assert response.status_code in (200, 400, 404), (url, response.text)


def test_schema_documents_the_metadata_bounds() -> None:
    """Every body's `metadata` carries OpenAI's bounds (16 pairs, keys 1-64 characters,
    values up to 512), so metadata the schema allows is metadata the API accepts."""
    bodies = {
        name: body["properties"]["metadata"]
        for name, body in schema.raw_schema["components"]["schemas"].items()
        if "metadata" in body.get("properties", {})
    }
    assert {"JobRequest", "EvalCreate", "EvalUpdate", "RunCreate"} <= set(bodies)
    for name, metadata in bodies.items():
        assert metadata["maxProperties"] == 16, name
        assert metadata["propertyNames"] == {"minLength": 1, "maxLength": 64}, name
        assert metadata["additionalProperties"]["maxLength"] == 512, name

"""Bring your own adapter: POST /v1/adapters/{name}/versions with a peft adapter made
elsewhere (peft itself, not our trainer). A servable one registers as a candidate version
with its report; a bad one gets the report's problems in a 400, and nothing is stored."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.api.conftest import TINY
from tests.conftest import bearer, new_tenant, stored_files
from tests.trainer.trainer_testdata import save_tiny_llama

FOREIGN_BASE = "someone/TinyLlama-chat"  # what the adapter's own config says it was made on


def peft_adapter(base_dir: Path, out: Path, **lora: Any) -> Path:
    """A LoRA adapter saved by peft, as a user of another trainer would bring it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        **{
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "init_lora_weights": False,
            **lora,
        }
    )
    get_peft_model(model, config).save_pretrained(out)
    path = out / "adapter_config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": FOREIGN_BASE})
    )
    return out


def tar_of(
    adapter_dir: Path, *, folder: str = "my-adapter", extra: dict[str, bytes] | None = None
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(adapter_dir.iterdir()):
            tar.add(path, arcname=f"{folder}/{path.name}")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def foreign(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peft_adapter(tiny_llama, tmp_path_factory.mktemp("foreign"))


@pytest.fixture
def api(settings: Settings, tiny_llama: Path) -> Iterator[tuple[TestClient, Settings, str]]:
    settings = settings.model_copy(
        update={"base_model": TINY, "base_models": {TINY: str(tiny_llama)}, "max_lora_rank": 8}
    )
    _, key = new_tenant(settings)
    with TestClient(create_app(settings)) as client:
        yield client, settings, key


def upload(client: TestClient, key: str, name: str, data: bytes, **fields: str) -> Any:
    return client.post(
        f"/v1/adapters/{name}/versions",
        headers=bearer(key),
        files={"file": ("adapter.tar.gz", data)},
        data=fields,
    )


def test_a_peft_adapter_registers_as_a_candidate_with_its_report(
    api: tuple[TestClient, Settings, str], foreign: Path
) -> None:
    client, settings, key = api
    checked = upload(client, key, "brought", tar_of(foreign), check_only="true")
    assert checked.status_code == 200, checked.text
    report = checked.json()
    assert report["servable"] and report["problems"] == []
    assert report["shapes_checked_against_base"] is True
    assert report["trained_on"] == FOREIGN_BASE and report["base_model"] == TINY
    assert report["rank"] == 4 and report["adapted_modules"] == ["q_proj", "v_proj"]
    assert report["dtypes"] == ["F32"]
    assert stored_files(settings) == []  # a check stores nothing
    assert client.get("/v1/adapters", headers=bearer(key)).json()["data"] == []

    response = upload(client, key, "brought", tar_of(foreign, extra={"notes.txt": b"hi"}))
    assert response.status_code == 200, response.text
    version = response.json()
    assert version["stage"] == "candidate" and version["version"] == 1
    assert version["id"].startswith(f"ft:{TINY}:") and ":brought:" in version["id"]
    assert version["lineage"]["source"] == "upload"
    assert version["lineage"]["trained_on"] == FOREIGN_BASE
    assert "my-adapter/notes.txt" in version["report"]["ignored_files"]
    assert version["rank"] == 4 and version["target_modules"] == ["q_proj", "v_proj"]

    # Downloaded back: the same weights; the config names the base it is registered on.
    tar = client.get("/v1/adapters/brought/versions/1/files", headers=bearer(key))
    assert tar.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as f:
        weights = f.extractfile("adapter_model.safetensors")
        config = f.extractfile("adapter_config.json")
        assert weights is not None and config is not None
        assert weights.read() == (foreign / "adapter_model.safetensors").read_bytes()
        assert json.loads(config.read())["base_model_name_or_path"] == TINY

    again = upload(client, key, "brought", tar_of(foreign, folder="."))
    assert again.status_code == 200 and again.json()["version"] == 2


def bad_adapters(tiny_llama: Path, foreign: Path, tmp: Path) -> dict[str, tuple[bytes, str]]:
    """upload bytes -> a phrase the refusal must contain."""
    other = save_tiny_llama(tmp / "wider-base", hidden_size=96, heads=4, kv_heads=2)

    def patched(**config: Any) -> bytes:
        out = tmp / f"patched-{len(list(tmp.iterdir()))}"
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(
            (foreign / "adapter_model.safetensors").read_bytes()
        )
        original = json.loads((foreign / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**original, **config}))
        return tar_of(out)

    only_config = tmp / "only-config"
    only_config.mkdir()
    (only_config / "adapter_config.json").write_bytes(
        (foreign / "adapter_config.json").read_bytes()
    )
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((foreign / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 not loaded")
    return {
        "rank": (tar_of(peft_adapter(tiny_llama, tmp / "r16", r=16)), "max LoRA rank 8"),
        "modules_to_save": (
            tar_of(peft_adapter(tiny_llama, tmp / "mts", modules_to_save=["lm_head"])),
            "modules_to_save",
        ),
        "dora": (tar_of(peft_adapter(tiny_llama, tmp / "dora", use_dora=True)), "DoRA"),
        "other base": (tar_of(peft_adapter(other, tmp / "wide")), "do not fit the base model"),
        "peft type": (patched(peft_type="IA3"), "only LORA"),
        "declared rank": (patched(r=2), "declares rank(s) [2]"),
        "no weights": (tar_of(only_config), "missing adapter_model.safetensors"),
        "pickle": (tar_of(pickled), "pickled weights are not accepted"),
        "not a tar": (b"PK\x03\x04 a zip, say", "not a readable tar"),
    }


def test_bad_adapters_get_the_report_not_a_500_and_nothing_is_stored(
    api: tuple[TestClient, Settings, str], foreign: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    client, settings, key = api
    for why, (data, phrase) in bad_adapters(tiny_llama, foreign, tmp_path).items():
        response = upload(client, key, "bad", data)
        assert response.status_code == 400, (why, response.text)
        error = response.json()["error"]
        assert error["code"] == "adapter_not_servable" and error["param"] == "file", why
        assert phrase in error["message"], (why, error["message"])
        if why not in ("pickle", "not a tar"):  # those never get as far as a report
            report = upload(client, key, "bad", data, check_only="true").json()
            assert report["servable"] is False and report["problems"], why
    assert stored_files(settings) == []
    assert client.get("/v1/adapters", headers=bearer(key)).json()["data"] == []


def test_upload_requests_are_checked_before_anything_is_kept(
    api: tuple[TestClient, Settings, str], foreign: Path
) -> None:
    client, settings, key = api
    data = tar_of(foreign)
    cases = [
        (upload(client, key, "Bad_Name", data), 400, "name"),
        (upload(client, key, "ok", data, base_model="gpt-4o"), 400, "base_model"),
        (client.post("/v1/adapters/ok/versions", headers=bearer(key), json={}), 400, "file"),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small)) as tight:
        too_big = upload(tight, key, "ok", data)
    assert too_big.status_code == 413
    assert stored_files(settings) == []


def test_a_name_is_per_tenant_another_tenants_upload_never_touches_it(
    api: tuple[TestClient, Settings, str], foreign: Path
) -> None:
    client, settings, key_a = api
    _, key_b = new_tenant(settings)
    first = upload(client, key_a, "shared-name", tar_of(foreign))
    second = upload(client, key_b, "shared-name", tar_of(foreign))
    assert first.status_code == second.status_code == 200
    assert first.json()["version"] == second.json()["version"] == 1
    assert first.json()["id"] != second.json()["id"]
    a_view = client.get("/v1/adapters/shared-name", headers=bearer(key_a)).json()
    assert [v["id"] for v in a_view["versions"]] == [first.json()["id"]]


def test_a_tar_that_unpacks_huge_is_refused_and_links_are_ignored(
    api: tuple[TestClient, Settings, str], foreign: Path, tmp_path: Path
) -> None:
    client, settings, key = api
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
        tar.add(foreign / "adapter_config.json", arcname="a/adapter_config.json")
        info = tarfile.TarInfo("a/adapter_model.safetensors")
        info.size = 8 << 20  # zeros: a few KB compressed
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert len(bomb.getvalue()) < 1 << 20
    small = settings.model_copy(update={"max_upload_bytes": 1 << 20})
    with TestClient(create_app(small)) as tight:
        refused = upload(tight, key, "bomb", bomb.getvalue())
    assert refused.status_code == 413 and "Unpacked" in refused.json()["error"]["message"]

    linked = io.BytesIO()
    with tarfile.open(fileobj=linked, mode="w") as tar:
        for path in sorted(foreign.iterdir()):
            tar.add(path, arcname=f"a/{path.name}")
        link = tarfile.TarInfo("elsewhere")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    response = upload(client, key, "linked", linked.getvalue())
    assert response.status_code == 200, response.text
    assert "elsewhere" in response.json()["report"]["ignored_files"]
    assert stored_files(settings) and not any("passwd" in str(p) for p in stored_files(settings))


def test_an_uploaded_version_is_graded_by_the_adapters_evals(
    api: tuple[TestClient, Settings, str], foreign: Path
) -> None:
    """A/B holds for versions trained elsewhere too: an eval attached to the adapter (as a
    fine-tune's validation file attaches one) gets runs on the upload and on the base."""
    from sqlmodel import Session, select

    from api.db import get_engine
    from api.models.adapters import Adapter
    from api.models.evals import Eval, EvalRun
    from api.services.eval_policy import VALIDATION_CRITERIA, VALIDATION_SCHEMA

    client, settings, key = api
    held = ("held.jsonl", b'{"input": [], "ideal": "x"}\n')
    items = client.post("/v1/files", headers=bearer(key), data={"purpose": "evals"},
                        files={"file": held})  # fmt: skip
    assert items.status_code == 200, items.text
    assert upload(client, key, "graded", tar_of(foreign)).status_code == 200
    config = {"type": "custom", "schema": {"type": "object",
              "properties": {"item": VALIDATION_SCHEMA}, "required": ["item"]}}  # fmt: skip
    with Session(get_engine(settings.database_url)) as session:
        assert session.exec(select(EvalRun)).first() is None  # no eval attached yet: no run
        adapter = session.exec(select(Adapter).where(Adapter.name == "graded")).one()
        session.add(Eval(tenant_id=adapter.tenant_id, name="graded: held out",
                         data_source_config=config, testing_criteria=VALIDATION_CRITERIA,
                         eval_metadata={"file_id": items.json()["id"]},
                         adapter_name="graded"))  # fmt: skip
        session.commit()
    second = upload(client, key, "graded", tar_of(foreign))
    assert second.status_code == 200, second.text
    with Session(get_engine(settings.database_url)) as session:
        runs = session.exec(select(EvalRun)).all()
    assert sorted(r.name for r in runs) == [f"{TINY} (base)", "v2 (candidate)"]
    assert all(r.status == "queued" and r.data_source["source"]["type"] == "file_id" for r in runs)

"""The production topology on one machine: every "host" is its own processes with its own
LORAPLEX_HOME, and nothing is shared but PostgreSQL, Redis and an S3 bucket (moto's S3
server, over HTTP). No adapter directory is shared: the replicas fetch adapters from the
bucket themselves (serving/vllm_plugin.py).

    api host          loraplex api
    worker hosts x2   loraplex worker          (train from the bucket, upload to it)
    replica hosts x2  vLLM + the Loraplex plugin (read the bucket)
    gateway hosts x2  loraplex serve           (both replicas; stateless)

Two tenants' adapters, trained by the workers, are served as transformers + peft answer
with the bucket's bytes, through either gateway; a replica and a gateway are killed mid-load
and a client that retries (as a load balancer would, on the other gateway) loses nothing; a
version whose bucket bytes were altered is refused by every replica; a re-trained version
is what every replica serves on the next request.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlmodel import Session, select

from api.db import get_engine
from api.models.adapters import AdapterVersion
from api.settings import Settings
from api.storage import ArtifactStore
from serving.adapter_source import replica_name
from serving.replicas import ReplicaProcess, plan_replicas
from tests.conftest import bearer, new_admin_key, new_tenant
from tests.s3server import S3
from tests.serving.conftest import Reference, free_port, healthy, wait_for
from tests.serving.servingdata import (
    BASE,
    FACTS_A,
    FACTS_B,
    QUESTIONS,
    TenantKey,
    register,
    variant,
)
from tests.trainer.trainer_testdata import chat_row

LORAPLEX = str(Path(sys.executable).parent / "loraplex")
REDIS_URL = "redis://127.0.0.1:6379/0"
SMALL = "tiny-serve-small"
pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm"),
]


@dataclass
class Hosts:
    """The processes of every simulated host; all stopped at the end."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    replicas: list[ReplicaProcess] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [LORAPLEX, *args], env=env | {"LORAPLEX_HOME": str(home)},
            stdout=open(self.log(name), "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def kill(self, name: str) -> None:
        """SIGKILL the host's processes: a machine that loses power."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for replica in self.replicas:
            replica.stop()

    def tail(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")[-3000:]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    running = Hosts(root=tmp_path)
    yield running
    running.stop_all()


def up(url: str, path: str = "/healthz") -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def ask(gateways: list[str], key: str, model: str, question: str, *, first: int = 0) -> Any:
    """One chat call by a client behind a load balancer: a gateway that is down, or an answer
    that says retry, sends the same request to the next gateway."""
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": 12, "temperature": 0}  # fmt: skip
    last: Any = None
    for attempt in range(6):
        url = gateways[(first + attempt) % len(gateways)]
        try:
            last = httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key),
                              timeout=120)  # fmt: skip
        except httpx.TransportError as e:
            last = e
            continue
        if last.status_code < 500 or last.headers.get("x-should-retry") == "false":
            return last
        time.sleep(1)
    return last


def text(response: Any) -> str:
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    return str(response.json()["choices"][0]["message"]["content"]).replace("\ufffd", "")


def dataset(facts: list[tuple[str, str]]) -> bytes:
    return "".join(json.dumps(chat_row(q, a)) + "\n" for q, a in facts * 2).encode()


def only_version(db_url: str, job_id: str) -> AdapterVersion:
    with Session(get_engine(db_url)) as session:
        (version,) = session.exec(select(AdapterVersion).where(AdapterVersion.job_id == job_id))
        return version


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_hosts_share_only_the_database_the_broker_and_the_bucket(
    hosts: Hosts, db_url: str, s3: S3, tiny_base: Path, reference: Reference, tmp_path: Path
) -> None:
    storage = f"s3://{s3.new_bucket()}/loraplex"
    queue = f"test-{uuid.uuid4().hex[:8]}"
    common = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | s3.env | {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "LORAPLEX_DATABASE_URL": db_url,
        "LORAPLEX_STORAGE_URL": storage,
        "LORAPLEX_BROKER_URL": REDIS_URL,
        "LORAPLEX_TRAIN_QUEUE": queue,
        "LORAPLEX_BASE_MODEL": BASE,
        # The same tiny model under a second name, whose jobs go to another accelerator
        # class (queue): only worker-1 consumes it.
        "LORAPLEX_BASE_MODELS": json.dumps({BASE: str(tiny_base), SMALL: str(tiny_base)}),
        "LORAPLEX_TRAIN_QUEUES": json.dumps({SMALL: f"{queue}-cpu"}),
        "LORAPLEX_MAX_LORA_RANK": "16",
        "LORAPLEX_SERVING_DTYPE": "float32",
        "LORAPLEX_SERVING_MAX_LORAS": "2",
        "LORAPLEX_SERVING_MAX_CPU_LORAS": "4",
        "LORAPLEX_SERVING_MAX_MODEL_LEN": "256",
        "LORAPLEX_SERVING_HEALTH_INTERVAL": "0.5",
        "LORAPLEX_SERVING_RETRY_AFTER": "1",
        "LORAPLEX_SERVING_VALIDATE_NEW_VERSIONS": "false",
    }  # fmt: skip
    # Replica hosts: vLLM with the Loraplex plugin and the bucket's address, nothing else.
    for i in range(2):
        replica_settings = Settings(
            home=tmp_path / f"replica-{i}", storage_url=storage, serving_dtype="float32",
            serving_max_loras=2, serving_max_cpu_loras=4, serving_max_model_len=256,
            max_lora_rank=16, serving_replica_port=free_port(),
        )  # fmt: skip
        (replica,) = plan_replicas(replica_settings, model_dir=tiny_base, served_name=BASE,
                                   count=1)  # fmt: skip
        replica.env = {k: v for k, v in replica.env.items() if not k.startswith("LORAPLEX_")
                       or k.startswith("LORAPLEX_REPLICA_")}  # fmt: skip
        replica.start()
        hosts.replicas.append(replica)
    replicas = [r.url for r in hosts.replicas]
    api_port, gateway_ports = free_port(), [free_port(), free_port()]
    hosts.start("api", ["api", "--port", str(api_port)], common)
    for i, queues in enumerate([queue, f"{queue},{queue}-cpu"]):
        hosts.start(f"worker-{i}", ["worker"], common | {"LORAPLEX_WORKER_QUEUES": queues})
    gateway_env = common | {"LORAPLEX_SERVING_ENGINE": "vllm",
                            "LORAPLEX_SERVING_REPLICAS": json.dumps(replicas)}  # fmt: skip
    for i, port in enumerate(gateway_ports):
        hosts.start(f"gateway-{i}", ["serve", "--port", str(port)], gateway_env)
    api = f"http://127.0.0.1:{api_port}"
    gateways = [f"http://127.0.0.1:{p}" for p in gateway_ports]

    admin_db = Settings(home=tmp_path / "admin", database_url=db_url, storage_url=storage)
    tenants = {}
    for label in ("a", "b"):
        tenant_id, key = new_tenant(admin_db, name=f"tenant-{label}")
        tenants[label] = TenantKey(tenant_id=tenant_id, key=key, name=f"tenant-{label}")
    admin = bearer(new_admin_key(admin_db))
    wait_for(lambda: up(api), timeout=60, what=f"the API\n{hosts.tail('api')}")

    # Each tenant trains on its own facts; two workers on two hosts take the jobs.
    jobs = {}
    for label, facts in (("a", FACTS_A), ("b", FACTS_B)):
        sdk = openai.OpenAI(base_url=f"{api}/v1", api_key=tenants[label].key, max_retries=0)
        training = sdk.files.create(file=("facts.jsonl", dataset(facts)), purpose="fine-tune")
        jobs[label] = sdk.fine_tuning.jobs.create(
            model=BASE, training_file=training.id, suffix="helper",
            method={"type": "supervised", "supervised": {"hyperparameters": {
                # As tests/serving/servingdata.py trains: a random tiny model needs a push.
                "n_epochs": 30, "batch_size": 4, "learning_rate_multiplier": 50,
                "method": "lora"}}},
        ).id  # fmt: skip
    sdk = openai.OpenAI(base_url=f"{api}/v1", api_key=tenants["b"].key, max_retries=0)
    small = sdk.fine_tuning.jobs.create(
        model=SMALL, training_file=training.id, suffix="small",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    ).id  # fmt: skip
    trained: dict[str, Path] = {}
    for label, job_id in jobs.items():
        sdk = openai.OpenAI(base_url=f"{api}/v1", api_key=tenants[label].key, max_retries=0)
        deadline = time.monotonic() + 300
        while (job := sdk.fine_tuning.jobs.retrieve(job_id)).status not in {"succeeded", "failed"}:
            assert time.monotonic() < deadline, hosts.tail("worker-0") + hosts.tail("worker-1")
            time.sleep(1)
        assert job.status == "succeeded", job.error
        version = only_version(db_url, job_id)
        promoted = httpx.post(
            f"{api}/v1/admin/adapters/tenant-{label}:helper/versions/1/promote",
            json={"stage": "production", "force": True},  # the gate is not under test here
            headers=admin, timeout=60,
        )  # fmt: skip
        assert promoted.status_code == 200, promoted.text
        # What transformers + peft answer with the bucket's bytes: the expected answers.
        trained[label] = tmp_path / "expected" / label
        ArtifactStore(storage).get_dir(version.storage_prefix, trained[label])

    deadline = time.monotonic() + 300
    while sdk.fine_tuning.jobs.retrieve(small).status not in {"succeeded", "failed"}:
        assert time.monotonic() < deadline, hosts.tail("worker-1")
        time.sleep(1)
    assert (
        small in hosts.log("worker-1").read_text()
        and small not in hosts.log("worker-0").read_text()
    )  # routed to the accelerator class its base model is configured for
    for url in replicas + gateways:
        wait_for(lambda u=url: healthy(u) if u in replicas else up(u, "/readyz"), timeout=300,
                 what=f"{url}\n{hosts.tail('gateway-0')}")  # fmt: skip
    expected = {(label, q): reference.chat(trained[label], q) for label in "ab" for q in QUESTIONS}
    base = {q: reference.chat(None, q) for q in QUESTIONS}
    assert any(expected["a", q] != base[q] for q in QUESTIONS)  # the adapters do something
    # ... and not the same thing: a question each tenant's adapter answers its own way.
    question = next(q for q in QUESTIONS if expected["a", q] != expected["b", q])
    for i in range(2):  # either gateway, each tenant's own adapter under the same name
        for label in "ab":
            got = [text(ask([gateways[i]], tenants[label].key, "helper", q)) for q in QUESTIONS]
            assert got == [expected[label, q] for q in QUESTIONS], (i, label)

    # Load through both gateways; mid-way one replica host and one gateway host die.
    calls = [(label, q, n) for n in range(4) for label in "ab" for q in QUESTIONS]
    done: list[int] = []

    def call(c: tuple[str, str, int]) -> tuple[tuple[str, str, int], Any]:
        label, question, n = c
        result = ask(gateways, tenants[label].key, "helper", question, first=n % 2)
        done.append(1)
        return c, result

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, c) for c in calls]
        wait_for(lambda: len(done) >= 8, timeout=300, what="the first answers under load")
        hosts.replicas[0].kill()
        hosts.kill("gateway-0")
        results = [f.result() for f in futures]
    lost = [(c, r) for c, r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert not lost, lost[:3]
    assert all(text(r) == expected[c[0], c[1]] for c, r in results)
    survivors = [gateways[1]]
    # Replicas read the bucket themselves; no gateway host holds an adapter's bytes. The
    # surviving replica served everything after the kill; the killed one holds adapters only
    # if routing gave it one before (on a loaded box the gateways may have sent both
    # tenants' adapters to the replica that was up first, as a clean-run failure showed).
    assert list((tmp_path / "replica-1" / "replica-cache").glob("*/*/adapter_model.*"))
    for i in range(2):
        assert not list((tmp_path / f"gateway-{i}").glob("**/adapter_model.safetensors"))

    # Bytes altered in the bucket after registration: refused by every replica, never served.
    hosts.replicas[0].start()
    wait_for(lambda: healthy(replicas[0]), timeout=300, what="the restarted replica")
    tampered = register(admin_db, tenant=tenants["b"], suffix="tampered", stage="candidate",
                        adapter_dir=variant(trained["b"], tmp_path / "t", scale=2.0))  # fmt: skip
    store = ArtifactStore(storage)
    key = f"{tampered.storage_prefix}/adapter_model.safetensors"
    data = bytearray(b"".join(store.iter_bytes(key)))
    data[-8:] = b"\x00\x00\x80\x7f" * 2  # two weights become +inf: same size, other bytes
    store.put_stream(key, iter([bytes(data)]))
    for _ in range(2):
        refused = ask(survivors, tenants["b"].key, tampered.fine_tuned_model, QUESTIONS[0])
        assert refused.status_code == 500, refused.text
        assert refused.json()["error"]["code"] == "adapter_integrity_error"
    name = replica_name(storage_prefix=tampered.storage_prefix, files=tampered.files)
    for url in replicas:  # asked directly by that name, a replica refuses too
        direct = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=60,
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert direct.status_code == 404, direct.text
        held = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert name not in held

    # A re-trained version (new bytes, same name) promoted: the next request, on any
    # replica, gets the new weights.
    retrained_dir = variant(trained["b"], tmp_path / "retrained", scale=1.0)
    retrained = register(admin_db, tenant=tenants["a"], suffix="helper", stage="candidate",
                         adapter_dir=retrained_dir)  # fmt: skip
    promoted = httpx.post(
        f"{api}/v1/admin/adapters/tenant-a:helper/versions/{retrained.version}/promote",
        json={"stage": "production", "force": True}, headers=admin, timeout=60,
    )  # fmt: skip
    assert promoted.status_code == 200, promoted.text
    new_answer = reference.chat(retrained_dir, question)
    assert new_answer != expected["a", question]
    assert text(ask(survivors, tenants["a"].key, "helper", question)) == new_answer
    name = replica_name(storage_prefix=retrained.storage_prefix, files=retrained.files)
    for url in replicas:
        direct = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": name, "messages": [{"role": "user", "content": question}],
            "max_tokens": 12, "temperature": 0})  # fmt: skip
        assert text(direct) == new_answer

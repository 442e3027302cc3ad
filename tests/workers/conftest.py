"""Real worker processes (`loraplex worker`) on a real broker, a tiny Llama as the base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import openai
import pytest
from sqlmodel import Session, select

from api.db import get_engine
from api.models.adapters import AdapterVersion
from api.settings import Settings
from tests.conformance.recorder import Conformance
from tests.conftest import new_tenant
from tests.s3server import S3
from tests.trainer.trainer_testdata import TINY_FACTS, chat_row

LORAPLEX = str(Path(sys.executable).parent / "loraplex")
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
TINY = "tiny-llama"
BROKEN = "broken-base"  # registered, but its files are not there


def tiny_dataset() -> bytes:
    return "".join(json.dumps(chat_row(q, a)) + "\n" for q, a in TINY_FACTS).encode()


@pytest.fixture(params=["redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return {"redis": REDIS_URL, "rabbitmq": RABBIT_URL, "embedded": "filesystem://"}[request.param]


@pytest.fixture(params=["file"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The artifact store every process uses: `file` under the home, or (`s3`, indirect
    parametrization) a bucket on the suite's S3 server, for workers on separate hosts."""
    if request.param == "file":
        return f"file://{tmp_path / 'home' / 'artifacts'}"
    s3: S3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/loraplex"


@pytest.fixture
def settings(
    tmp_path: Path, db_url: str, broker_url: str, tiny_llama: Path, storage_url: str
) -> Settings:
    # A queue of its own: runs and tests never steal each other's messages.
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        broker_url=broker_url,
        storage_url=storage_url,
        train_queue=f"test-{uuid.uuid4().hex[:8]}",
        eval_queue=f"test-evals-{uuid.uuid4().hex[:8]}",
        base_models={TINY: str(tiny_llama), BROKEN: str(tiny_llama.parent / "missing")},
        heartbeat_interval=0.5,
        heartbeat_timeout=4,
        max_running_jobs_per_tenant=1,
    )


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # The tiny model's matmuls gain nothing from threads, which on a busy box only contend
        # (tests/trainer/conftest.py): one keeps a worker's job fast whatever else runs.
        "OMP_NUM_THREADS": "1",
        "LORAPLEX_HOME": str(settings.home),
        "LORAPLEX_STORAGE_URL": settings.storage_url,
        "LORAPLEX_DATABASE_URL": settings.database_url,
        "LORAPLEX_BROKER_URL": settings.broker_url,
        "LORAPLEX_TRAIN_QUEUE": settings.train_queue,
        "LORAPLEX_BASE_MODELS": json.dumps(settings.base_models),
        "LORAPLEX_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
        "LORAPLEX_HEARTBEAT_TIMEOUT": str(settings.heartbeat_timeout),
        "LORAPLEX_MAX_RUNNING_JOBS_PER_TENANT": str(settings.max_running_jobs_per_tenant),
        "LORAPLEX_REDISPATCH_AFTER": str(settings.redispatch_after),
        "LORAPLEX_TRAINING_HANG_TIMEOUT": str(settings.training_hang_timeout),
        "LORAPLEX_EVAL_QUEUE": settings.eval_queue,
        "LORAPLEX_GATEWAY_URL": settings.gateway_url,
    }


class Worker:
    def __init__(
        self,
        settings: Settings,
        log: Path,
        *,
        wrapper: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        """`wrapper`: a command that runs the worker command given as its last arguments;
        `args`: the worker's own (`--queues ...`)."""
        self.log = log
        self.proc = subprocess.Popen(
            [*wrapper, LORAPLEX, "worker", *args],
            env=worker_env(settings),
            stdout=open(log, "ab"),  # noqa: SIM115 (the child keeps it open)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no ack, as when a GPU host loses power."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    started: list[Worker] = []

    def start(
        *,
        wrapper: Sequence[str] = (),
        home: Path | None = None,
        args: Sequence[str] = (),
        gateway_url: str | None = None,
    ) -> Worker:
        """`home`: a LORAPLEX_HOME of its own, as a worker on another host has;
        `gateway_url`: where an eval worker (`args=("--queues", settings.eval_queue)`)
        generates."""
        own = settings.model_copy(update={"home": home}) if home else settings
        if gateway_url is not None:
            own = own.model_copy(update={"gateway_url": gateway_url})
        log = tmp_path / f"worker-{len(started)}.log"
        worker = Worker(own, log, wrapper=wrapper, args=args)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
    if settings.broker_url.startswith("redis"):
        import redis

        redis.Redis.from_url(settings.broker_url).delete(settings.train_queue, settings.eval_queue)


@pytest.fixture
def sdk(live_url: str, settings: Settings) -> Iterator[openai.OpenAI]:
    """The tenant's SDK; every answer it gets is checked against the official OpenAI
    schemas (tests/conformance): these jobs really train, so this is the tour of running,
    succeeded, failed and cancelled jobs, their events, checkpoints and result files."""
    _, key = new_tenant(settings, name="support")
    checked = Conformance()
    with checked.client(timeout=60) as http:
        yield openai.OpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0,
                            http_client=http)  # fmt: skip
    checked.assert_clean()


def hp(**values: object) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": values}}


def versions(settings: Settings, job_id: str) -> list[AdapterVersion]:
    with Session(get_engine(settings.database_url)) as s:
        return list(s.exec(select(AdapterVersion).where(AdapterVersion.job_id == job_id)))


def upload(sdk: openai.OpenAI, *, repeat: int = 1) -> str:
    """The tiny facts; `repeat` makes a long job within OpenAI's 50 epochs."""
    data = tiny_dataset() * repeat
    return sdk.files.create(file=("facts.jsonl", data), purpose="fine-tune").id


def wait_for_status(sdk: openai.OpenAI, job_id: str, statuses: set[str], timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"{job_id} still {job.status}")


def wait_until_probed(settings: Settings, *job_ids: str, timeout: float = 120) -> None:
    """Until a gateway on `settings`' registry has probed these jobs' versions as served
    (serving/validation.py): its probe batches with other requests, so an answer compared
    token for token with a reference must not meet it."""
    deadline = time.monotonic() + timeout
    while any(
        "exact_match_served" not in (v.metrics or {})
        for j in job_ids
        for v in versions(settings, j)
    ):
        assert time.monotonic() < deadline, "the gateway never probed the new versions"
        time.sleep(0.5)

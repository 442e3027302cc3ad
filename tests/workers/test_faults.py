"""Faults injected for real under running workers: a broker that forgets its messages,
dropped database connections, a full disk. Every job ends once, cleanly, and nothing is
left half-written. (A `loraplex up` restart is in test_up.py.)"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psycopg
import pytest
import redis
from sqlmodel import Session, col, select

from api.db import get_engine
from api.models.jobs import Job, JobEvent
from api.settings import Settings
from tests.workers.conftest import TINY, hp, upload, versions, wait_for_status

pytestmark = pytest.mark.timeout(300)
FINISHED = {"succeeded", "failed", "cancelled"}
SHORT = hp(n_epochs=3, batch_size=4, method="lora")  # a few seconds
LONG = hp(n_epochs=20, batch_size=1, method="lora", checkpoint_interval=1000)  # 240 steps
ENDLESS = hp(n_epochs=50, batch_size=1, method="lora", checkpoint_interval=100_000)


class RedisServer:
    """A private redis-server that keeps nothing on disk: a restart forgets every message."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        self.proc = subprocess.Popen(
            ["redis-server", *args, "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def broker_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Re-send a job still queued 2 s after its last message (the default is minutes).
    return settings.model_copy(update={"redispatch_after": 2.0})


def started_events(settings: Settings, job_id: str) -> int:
    with Session(get_engine(settings.database_url)) as s:
        events = s.exec(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    return sum(m.startswith("Fine-tuning job started") for m in events)


def wait_until_training(sdk: openai.OpenAI, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.type == "metrics" for e in sdk.fine_tuning.jobs.list_events(job_id)):
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_jobs_queued_through_a_redis_restart_each_run_once(
    sdk: openai.OpenAI, start_worker, settings: Settings, redis_server: RedisServer
) -> None:
    worker = start_worker()
    file_id = upload(sdk, repeat=2)
    busy = sdk.fine_tuning.jobs.create(model=TINY, training_file=file_id, method=ENDLESS)
    wait_until_training(sdk, busy.id)
    waiting = [
        sdk.fine_tuning.jobs.create(model=TINY, training_file=file_id, method=SHORT)
        for _ in range(2)
    ]
    broker = redis.Redis.from_url(redis_server.url)
    assert broker.llen(settings.train_queue) == 2  # their messages wait in Redis

    redis_server.kill()  # the messages are gone with it
    # Sent while the broker is down: the API keeps the job queued.
    waiting.append(sdk.fine_tuning.jobs.create(model=TINY, training_file=file_id, method=SHORT))
    redis_server.start()
    assert broker.llen(settings.train_queue) == 0
    sdk.fine_tuning.jobs.cancel(busy.id)  # the worker is free: it reconnects, then trains

    for job in waiting:
        done = wait_for_status(sdk, job.id, FINISHED, timeout=240)
        assert done.status == "succeeded", done.error
        assert len(versions(settings, job.id)) == 1
        assert started_events(settings, job.id) == 1
    assert sdk.fine_tuning.jobs.retrieve(busy.id).status == "cancelled"
    assert started_events(settings, busy.id) == 1 and versions(settings, busy.id) == []
    log = worker.log.read_text()
    assert "sent them again" in log
    # A healthy backlog is not re-sent: at most the lost messages were sent twice.
    assert log.count(": skipped") <= len(waiting)


def _terminate_mid_transaction(settings: Settings, job_id: str) -> None:
    """Block the worker's next write on a row lock, then cut every connection to the job's
    database: the worker's blocked statement dies in flight, its idle pooled ones too."""
    dsn = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    dbname = dsn.rsplit("/", 1)[1]
    with psycopg.connect(dsn, autocommit=True) as admin, psycopg.connect(dsn) as locker:
        locker.execute("SELECT 1 FROM fine_tuning_jobs WHERE id = %s FOR UPDATE", (job_id,))
        deadline = time.monotonic() + 30
        blocked = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
        )
        while not admin.execute(blocked, (dbname,)).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the worker never wrote to the job row"
            time.sleep(0.02)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid NOT IN (pg_backend_pid(), %s)",
            (dbname, locker.info.backend_pid),
        )
        locker.rollback()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_connections_dropped_mid_job_the_job_still_succeeds_once(
    sdk: openai.OpenAI, start_worker, settings: Settings
) -> None:
    # The point is the dropped connections, not the reaper: with the suite's 4 s heartbeat
    # timeout, a busy CI box riding out the retries (up to 4.2 s) could look like a dead
    # worker, and the job would be re-queued (still once, but as attempt 2).
    settings.heartbeat_timeout = 30
    worker = start_worker()
    job = sdk.fine_tuning.jobs.create(model=TINY, training_file=upload(sdk), method=LONG)
    wait_until_training(sdk, job.id)
    drops = 3
    for _ in range(drops):
        _terminate_mid_transaction(settings, job.id)
        time.sleep(0.2)

    done = wait_for_status(sdk, job.id, FINISHED, timeout=240)  # the API reconnects too
    assert done.status == "succeeded", done.error
    assert done.model_extra["attempts"] == 1  # the worker kept its lease throughout
    assert len(versions(settings, job.id)) == 1
    assert worker.log.read_text().count("database connection lost; retrying") >= drops


def _in_tiny_filesystem(path: Path, size: str) -> list[str]:
    """A wrapper command: the worker runs with a `size`-byte tmpfs at `path`, in a mount
    namespace of its own (so only it sees that filesystem, and it goes when the worker does)."""
    script = 'mount -t tmpfs -o size="$0" tmpfs "$1" && shift && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, size, str(path)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_disk_full_while_saving_the_adapter_fails_the_job_and_leaves_nothing(
    sdk: openai.OpenAI, start_worker, settings: Settings
) -> None:
    adapters = Path(settings.storage_url.removeprefix("file://")) / "adapters"
    adapters.mkdir(parents=True)
    wrapper = _in_tiny_filesystem(adapters, "64k")
    if subprocess.run([*wrapper, "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespaces here (unshare --user --mount)")
    # 64 KiB: the adapter's first files fit, its ~130 KiB weights do not.
    worker = start_worker(wrapper=wrapper)
    job = sdk.fine_tuning.jobs.create(model=TINY, training_file=upload(sdk), method=SHORT)

    done = wait_for_status(sdk, job.id, FINISHED)
    assert done.status == "failed" and done.error.code == "storage_error"
    assert "No space left on device" in done.error.message
    # The weights failed after smaller files had been written: those are gone as well.
    assert "adapter_model.safetensors" in done.error.message
    assert done.fine_tuned_model is None and versions(settings, job.id) == []
    assert not any(m.id.startswith("ft:") for m in sdk.models.list())
    full_disk = Path(f"/proc/{worker.proc.pid}/root") / adapters.relative_to("/")
    assert [p for p in full_disk.rglob("*") if p.is_file()] == []
    with Session(get_engine(settings.database_url)) as s:
        row = s.exec(select(Job).where(col(Job.id) == job.id)).one()
        assert row.lease is None and row.result_files == []

"""`loraplex up`: the whole embedded platform from one command, stopped by one signal and
started again with its queue intact."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.workers.conftest import LORAPLEX, TINY, tiny_dataset, wait_for_status

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Up:
    """`loraplex up` on the embedded default (SQLite, filesystem broker) in `workdir`."""

    def __init__(self, workdir: Path, tiny_llama: Path, **env: str) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
        self.env.update(
            HF_HUB_OFFLINE="1", LORAPLEX_BASE_MODELS=json.dumps({TINY: str(tiny_llama)})
        )
        self.env.update(env)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(
        self, log_name: str, *, ready: str = "/readyz", timeout: float = 60
    ) -> subprocess.Popen[bytes]:
        """Start `up`; return once `ready` answers 200 (/readyz: the database and the
        serving engine; /healthz: the process listens)."""
        log = self.workdir / log_name
        proc = subprocess.Popen(
            [LORAPLEX, "up", "--port", str(self.port)],
            cwd=self.workdir,
            env=self.env,
            stdout=open(log, "wb"),  # noqa: SIM115 (the child keeps it open)
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}{ready}").status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)

    def sdk(self) -> openai.OpenAI:
        created = subprocess.run(
            [LORAPLEX, "admin", "create-tenant", "embedded"],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(created.stdout)["api_key"]
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def statuses(self) -> dict[str, str]:
        """Job id -> status, read from the database while `up` is down."""
        with sqlite3.connect(self.workdir / ".loraplex" / "loraplex.db") as db:
            return dict(db.execute("SELECT id, status FROM fine_tuning_jobs").fetchall())


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_up_trains_a_job_on_the_embedded_default_and_stops_cleanly(
    tmp_path: Path, tiny_llama: Path
) -> None:
    up = Up(tmp_path, tiny_llama)
    proc = up.start("up.log", ready="/healthz")
    try:
        # The default engine is a vLLM replica of the built-in base: converted, then booted,
        # which takes far longer than the API needs to listen. Not ready until it can answer.
        starting = httpx.get(f"{up.url}/readyz")
        assert starting.status_code == 503, starting.text
        assert starting.json()["error"]["code"] == "engine_not_ready"
        assert int(starting.headers["retry-after"]) > 0
        sdk = up.sdk()
        file_id = sdk.files.create(file=("t.jsonl", tiny_dataset()), purpose="fine-tune").id
        job = sdk.fine_tuning.jobs.create(
            model=TINY,
            training_file=file_id,
            suffix="emb",
            hyperparameters={"n_epochs": 2, "batch_size": 4},
            extra_body={},
        )
        done = wait_for_status(sdk, job.id, {"succeeded", "failed"}, timeout=180)
        assert done.status == "succeeded", done.error
        assert (tmp_path / ".loraplex" / "broker").is_dir()  # no broker server was needed
        children = _children(proc.pid)
        assert children, "up runs its worker as a child process"
        # Ready means chat answers: no 503 for the first request a load balancer sends.
        deadline = time.monotonic() + 300
        while (ready := httpx.get(f"{up.url}/readyz")).status_code != 200:
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        assert ready.json()["checks"] == {"database": "ok", "serving": "ok"}
        first = sdk.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=4,
            messages=[{"role": "user", "content": "Say hi"}],
        )  # fmt: skip
        assert first.choices[0].message.content is not None
    finally:
        assert _stop(proc) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_jobs_queued_when_up_stops_finish_once_after_it_starts_again(
    tmp_path: Path, tiny_llama: Path
) -> None:
    # Serving the tiny base in-process keeps the two start-ups light; this is about training.
    up = Up(
        tmp_path,
        tiny_llama,
        OMP_NUM_THREADS="1",  # tiny matmuls: threads only contend (tests/workers/conftest.py)
        LORAPLEX_BASE_MODEL=TINY,
        LORAPLEX_SERVING_ENGINE="transformers",
        LORAPLEX_HEARTBEAT_INTERVAL="0.5",
        LORAPLEX_HEARTBEAT_TIMEOUT="4",
    )
    proc = up.start("up-1.log")
    try:
        sdk = up.sdk()
        file_id = sdk.files.create(file=("t.jsonl", tiny_dataset()), purpose="fine-tune").id
        jobs = [
            sdk.fine_tuning.jobs.create(
                model=TINY, training_file=file_id, hyperparameters={"n_epochs": 2, "batch_size": 4}
            ).id
            for _ in range(2)
        ]
    finally:
        assert _stop(proc) == 0  # one worker: a running job is handed back, the other waits
    queued = [job_id for job_id, status in up.statuses().items() if status == "queued"]
    assert queued

    proc = up.start("up-2.log")
    try:
        for job_id in jobs:
            done = wait_for_status(sdk, job_id, {"succeeded", "failed"}, timeout=180)
            assert done.status == "succeeded", done.error
        with sqlite3.connect(tmp_path / ".loraplex" / "loraplex.db") as db:
            started = db.execute(
                "SELECT job_id, count(*) FROM fine_tuning_job_events "
                "WHERE message LIKE 'Fine-tuning job started%' GROUP BY job_id"
            ).fetchall()
            handed_back = db.execute(
                "SELECT job_id, count(*) FROM fine_tuning_job_events "
                "WHERE message LIKE 'Worker stopping: job handed back%' GROUP BY job_id"
            ).fetchall()
            versions = db.execute("SELECT job_id, count(*) FROM adapter_versions GROUP BY job_id")
            assert dict(versions.fetchall()) == dict.fromkeys(jobs, 1)
        # Each started once after the restart: once in all, or twice if it was handed back.
        for job_id in queued:
            assert dict(started)[job_id] == 1 + dict(handed_back).get(job_id, 0)
    finally:
        assert _stop(proc) == 0


def _worker_pids(up_pid: int) -> set[int]:
    pids = set()
    for pid in _children(up_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except FileNotFoundError:  # gone between pgrep and now
            continue
        if "worker" in command:
            pids.add(pid)
    return pids


def _tiny_up(tmp_path: Path, tiny_llama: Path) -> Up:
    """`up` serving the tiny base in-process: light start-ups, for tests of its worker."""
    return Up(
        tmp_path,
        tiny_llama,
        OMP_NUM_THREADS="1",
        LORAPLEX_BASE_MODEL=TINY,
        LORAPLEX_SERVING_ENGINE="transformers",
    )


def _wait_for_workers(up_pid: int, *, count: int = 2) -> set[int]:
    """`up`'s worker children once there are `count` (a training and an eval worker)."""
    deadline = time.monotonic() + 30
    while len(workers := _worker_pids(up_pid)) < count:
        assert time.monotonic() < deadline, f"worker children: {workers}"
        time.sleep(0.2)
    return workers


def test_a_worker_that_dies_is_started_again(tmp_path: Path, tiny_llama: Path) -> None:
    up = _tiny_up(tmp_path, tiny_llama)
    proc = up.start("up.log")
    try:
        workers = _wait_for_workers(proc.pid)
        killed = workers.pop()
        os.kill(killed, signal.SIGKILL)  # as the kernel's OOM killer would
        deadline = time.monotonic() + 30
        while len(_worker_pids(proc.pid) - {killed}) < 2:
            assert time.monotonic() < deadline, "the worker was not started again"
            time.sleep(0.2)
        said = (tmp_path / "up.log").read_text()  # `up` has a training and an eval worker
        assert re.search(r"the (training|eval) worker exited \(code -9\); starting it again", said)
        sdk = up.sdk()
        file_id = sdk.files.create(file=("t.jsonl", tiny_dataset()), purpose="fine-tune").id
        job = sdk.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, hyperparameters={"n_epochs": 2, "batch_size": 4}
        )
        done = wait_for_status(sdk, job.id, {"succeeded", "failed"}, timeout=180)
        assert done.status == "succeeded", done.error
    finally:
        assert _stop(proc) == 0


def test_a_killed_up_takes_its_worker_with_it(tmp_path: Path, tiny_llama: Path) -> None:
    """SIGKILL skips `up`'s shutdown path; its worker (in a session of its own, so the
    group kill of `up` misses it) must still go, not run on orphaned (issue 13)."""
    proc = _tiny_up(tmp_path, tiny_llama).start("up.log")
    try:
        workers = _wait_for_workers(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer or a supervisor timeout would
        proc.wait(10)
    deadline = time.monotonic() + 10
    alive = set(workers)
    try:
        while alive := {p for p in alive if _running(p)}:
            assert time.monotonic() < deadline, f"worker(s) {alive} outlived `up`"
            time.sleep(0.1)
    finally:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"

"""`loraplex up`: the whole embedded platform from one command, stopped by one signal."""

from __future__ import annotations

import json
import os
import signal
import socket
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


def test_up_trains_a_job_on_the_embedded_default_and_stops_cleanly(
    tmp_path: Path, tiny_llama: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(HF_HUB_OFFLINE="1", LORAPLEX_BASE_MODELS=json.dumps({TINY: str(tiny_llama)}))
    port = _free_port()
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 (the child keeps it open)
    proc = subprocess.Popen(
        [LORAPLEX, "up", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)
        created = subprocess.run(
            [LORAPLEX, "admin", "create-tenant", "embedded"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(created.stdout)["api_key"]
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
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
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()

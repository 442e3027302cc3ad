"""Concurrent uploads, job submissions and reads against a real `loraplex api` process.

Shared by tests/api/test_load.py (no errors, bounded memory) and bench/bench_api_load.py
(throughput). Loopback only; every request's outcome is checked, not just its status.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

LORAPLEX = str(Path(sys.executable).parent / "loraplex")


def dataset(n: int, *, tag: str) -> bytes:
    rows = (
        {
            "messages": [
                {"role": "user", "content": f"{tag}: what is part {i}?"},
                {"role": "assistant", "content": f"Part {i} is a {tag} gear, size {i % 7}."},
            ]
        }
        for i in range(n)
    )
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class ApiProcess:
    """`loraplex api` on a free loopback port, with its own home and database."""

    def __init__(self, home: Path, database_url: str, *, extra_env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = home.parent / f"api-{port}.log"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "LORAPLEX_HOME": str(home),
            "LORAPLEX_DATABASE_URL": database_url,
            "LORAPLEX_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [LORAPLEX, "api", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"api did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@dataclass
class Round:
    seconds: float = 0.0
    requests: int = 0
    upload_bytes: int = 0
    errors: list[str] = field(default_factory=list)


def _tenant_flow(url: str, key: str, data: bytes, n_examples: int) -> tuple[int, list[str]]:
    """Upload, check the stats, submit a job on it, read it back; (requests, errors)."""
    errors: list[str] = []
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
        up = http.post(
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", data, "application/jsonl")},
        )
        if up.status_code != 200 or up.json()["status"] != "processed":
            return 1, [f"upload: {up.status_code} {up.text[:200]}"]
        if up.json()["stats"]["examples"] != n_examples:
            errors.append(f"upload counted {up.json()['stats']['examples']} examples")
        job = http.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": up.json()["id"]}
        )
        if job.status_code != 200:
            return 2, [*errors, f"job: {job.status_code} {job.text[:200]}"]
        got = http.get(f"/v1/fine_tuning/jobs/{job.json()['id']}")
        listed = http.get("/v1/files", params={"limit": 100})
        if got.status_code != 200 or got.json()["training_file"] != up.json()["id"]:
            errors.append(f"job read: {got.status_code} {got.text[:200]}")
        if listed.status_code != 200 or up.json()["id"] not in listed.text:
            errors.append(f"file list: {listed.status_code}")
        return 4, errors


def run_round(
    url: str, keys: list[str], *, concurrency: int, per_tenant: int, n_examples: int
) -> Round:
    data = dataset(n_examples, tag="load")
    flows = [k for k in keys for _ in range(per_tenant)]
    result = Round()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for requests, errors in pool.map(lambda k: _tenant_flow(url, k, data, n_examples), flows):
            result.requests += requests
            result.errors += errors
    result.seconds = time.perf_counter() - start
    result.upload_bytes = len(data) * len(flows)
    return result

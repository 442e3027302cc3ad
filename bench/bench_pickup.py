"""Job pickup latency: POST /v1/fine_tuning/jobs -> status `running`, Redis vs embedded.

Starts a real `loraplex worker` per broker, submits N jobs one after another (each waits for
the previous to finish: one worker, one job at a time) and measures, from the job's own
timestamps, created -> started. Training itself is a tiny Llama for a few steps.

    .venv/bin/python bench/bench_pickup.py [--jobs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_P50 = {"redis": 0.5, "embedded": 2.0}


def tiny_base(out: Path) -> None:
    from tests.trainer.trainer_testdata import save_tiny_llama

    save_tiny_llama(out)


def measure(broker: str, base: Path, n_jobs: int) -> list[float]:
    import openai
    import uvicorn
    from sqlmodel import Session

    from api.db import get_engine, upgrade
    from api.main import create_app
    from api.models.jobs import Job
    from api.services.tenants import create_key, create_tenant
    from api.settings import Settings
    from tests.trainer.trainer_testdata import TINY_FACTS, chat_row

    home = Path(tempfile.mkdtemp())
    url = {"redis": "redis://127.0.0.1:6379/0", "embedded": "filesystem://"}[broker]
    settings = Settings(
        home=home,
        broker_url=url,
        train_queue=f"bench-{uuid.uuid4().hex[:6]}",
        base_models={"tiny": str(base)},
    )
    upgrade(settings.database_url)
    with Session(get_engine(settings.database_url)) as s:
        tenant = create_tenant(s, name="bench")
        _, key = create_key(s, tenant_id=tenant.id)
        s.commit()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_BROKER_URL": url,
        "LORAPLEX_TRAIN_QUEUE": settings.train_queue,
        "LORAPLEX_BASE_MODELS": json.dumps(settings.base_models),
    }
    log = home / "worker.log"
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "loraplex"), "worker"],
        env=env,
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    port = {"redis": 18766, "embedded": 18767}[broker]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while "ready." not in log.read_text() or not server.started:
        time.sleep(0.1)
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
    data = "".join(json.dumps(chat_row(q, a)) + "\n" for q, a in TINY_FACTS).encode()
    file_id = sdk.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    latencies = []
    try:
        for _ in range(n_jobs):
            job = sdk.fine_tuning.jobs.create(
                model="tiny",
                training_file=file_id,
                hyperparameters={"n_epochs": 1, "batch_size": 12},
            )
            while sdk.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
                time.sleep(0.1)
            with Session(get_engine(settings.database_url)) as s:
                row = s.get(Job, job.id)
                assert row is not None and row.started_at is not None
                latencies.append((row.started_at - row.created_at).total_seconds())
    finally:
        worker.terminate()
        worker.wait(30)
        server.should_exit = True
        thread.join(10)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp()) / "tiny"
    tiny_base(base)
    for broker in ("redis", "embedded"):
        lat = sorted(measure(broker, base, args.jobs))
        p50 = statistics.median(lat)
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        print(
            f"{broker:9s} pickup p50 {p50:.3f} s  p95 {p95:.3f} s  (n={len(lat)}); "
            f"ratio p50 / target {TARGET_P50[broker]} s: {p50 / TARGET_P50[broker]:.2f}"
        )


if __name__ == "__main__":
    main()

"""Dataset validation throughput and memory: the streaming scanner and a whole upload.

Generates JSONL files (chat examples, ~600 bytes a line) of 50 MB and 200 MB, then, each in
a fresh subprocess so peak RSS is its own:
  1. `DatasetScanner` fed 1 MiB chunks from disk            -> MB/s, peak RSS
  2. POST /v1/files of the 200 MB file to a live server      -> MB/s end to end, peak RSS
Prints the ratios that matter: throughput / 30 MB/s target, and peak RSS at 200 MB / 50 MB
(1.0 means memory does not grow with file size).

    .venv/bin/python bench/bench_files_validation.py [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MB_S = 30.0
MB = 1024 * 1024


def generate(path: Path, size_mb: int) -> None:
    rng = random.Random(0)
    words = [f"word{i}" for i in range(500)]
    with open(path, "w") as f:
        while f.tell() < size_mb * MB:
            q = " ".join(rng.choices(words, k=rng.randint(10, 40)))
            a = " ".join(rng.choices(words, k=rng.randint(30, 90)))
            msgs = [
                {"role": "system", "content": "You are Acme support."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")


def scan_child(path: str) -> None:
    from trainer.formats import DatasetScanner

    start = time.perf_counter()
    scanner = DatasetScanner()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            scanner.feed(chunk)
    scanner.finish()
    elapsed = time.perf_counter() - start
    assert scanner.ok, scanner.problems
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "examples": scanner.stats.examples,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def upload_child(path: str) -> None:
    import threading

    import httpx
    import uvicorn
    from sqlmodel import Session

    from api.db import get_engine, upgrade
    from api.main import create_app
    from api.services.tenants import create_key, create_tenant
    from api.settings import Settings

    home = Path(tempfile.mkdtemp())
    settings = Settings(home=home)
    upgrade(settings.database_url)
    with Session(get_engine(settings.database_url)) as s:
        tenant = create_tenant(s, name="bench")
        _, key = create_key(s, tenant_id=tenant.id)
        s.commit()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=18765, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    start = time.perf_counter()
    with open(path, "rb") as f:
        r = httpx.post(
            "http://127.0.0.1:18765/v1/files",
            headers={"Authorization": f"Bearer {key}"},
            data={"purpose": "fine-tune"},
            files={"file": ("big.jsonl", f)},
            timeout=600,
        )
    elapsed = time.perf_counter() - start
    server.should_exit = True
    body = r.json()
    assert body.get("status") == "processed", body
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "examples": body["stats"]["examples"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_child(mode: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--sizes", default="50,200")
    args = parser.parse_args()
    if args.child:
        {"scan": scan_child, "upload": upload_child}[args.child[0]](args.child[1])
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for size in sizes:
            path = Path(tmp) / f"data-{size}.jsonl"
            generate(path, size)
            real_mb = path.stat().st_size / MB
            scan = run_child("scan", path)
            results[size] = (real_mb, scan)
            print(
                f"scan   {real_mb:7.1f} MB: {real_mb / scan['seconds']:6.1f} MB/s, "
                f"{scan['examples']} examples, peak RSS {scan['peak_rss_mb']:.0f} MB"
            )
        big = max(sizes)
        up = run_child("upload", Path(tmp) / f"data-{big}.jsonl")
        big_mb = results[big][0]
        print(
            f"upload {big_mb:7.1f} MB: {big_mb / up['seconds']:6.1f} MB/s end to end "
            f"(client+server in one process), peak RSS {up['peak_rss_mb']:.0f} MB"
        )
    small = min(sizes)
    scan_rate = results[big][0] / results[big][1]["seconds"]
    print(f"ratio scan throughput / {TARGET_MB_S:.0f} MB/s target: {scan_rate / TARGET_MB_S:.2f}")
    print(f"ratio upload throughput / target: {big_mb / up['seconds'] / TARGET_MB_S:.2f}")
    rss_ratio = results[big][1]["peak_rss_mb"] / results[small][1]["peak_rss_mb"]
    print(f"ratio peak RSS {big} MB / {small} MB file: {rss_ratio:.2f}")


if __name__ == "__main__":
    main()

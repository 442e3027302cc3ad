"""Control-plane throughput under concurrent load: uploads + job submissions + reads.

Runs a real `loraplex api` on SQLite (the embedded default) and on Postgres side by side in
one run, drives the same load through each (tests/api/load_driver.py), and prints flows/s,
requests/s, upload MB/s, the Postgres/SQLite ratio and memory before/after.

    .venv/bin/python bench/bench_api_load.py [--rounds 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.db import upgrade
from api.settings import Settings
from tests.api.load_driver import ApiProcess, run_round
from tests.conftest import new_tenant

PG = "postgresql://postgres@127.0.0.1:5432/test"


def measure(url: str, home: Path, args: argparse.Namespace) -> dict[str, float]:
    upgrade(url)
    base = home / "base"
    base.mkdir(parents=True)
    env = {"LORAPLEX_BASE_MODELS": f'{{"tiny": "{base}"}}'}
    api = ApiProcess(home / "home", url, extra_env=env)
    try:
        keys = [new_tenant(Settings(home=home / "home", database_url=url))[1] for _ in range(4)]
        load = {"concurrency": args.concurrency, "per_tenant": 4, "n_examples": args.examples}
        run_round(api.url, keys, **load)  # warm-up
        rss_warm = api.rss_mb()
        rounds = [run_round(api.url, keys, **load) for _ in range(args.rounds)]
        errors = [e for r in rounds for e in r.errors]
        seconds = sum(r.seconds for r in rounds)
        return {
            "flows_per_s": 16 * args.rounds / seconds,
            "requests_per_s": sum(r.requests for r in rounds) / seconds,
            "upload_mb_per_s": sum(r.upload_bytes for r in rounds) / seconds / 2**20,
            "errors": len(errors),
            "rss_warm_mb": rss_warm,
            "rss_end_mb": api.rss_mb(),
        }
    finally:
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure(f"sqlite:///{tmp}/lpx.db", Path(tmp) / "s", args)
        name = f"lpx_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        try:
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
            results["postgres"] = measure(url, Path(tmp) / "p", args)
        finally:
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
    print(f"concurrency {args.concurrency}, 4 tenants x 4 flows per round, {args.rounds} rounds")
    print(f"flow = upload (~{args.examples * 0.13:.0f} KB) + job + job read + file list")
    for db, r in results.items():
        print(
            f"{db:9s} flows/s {r['flows_per_s']:6.1f}  requests/s {r['requests_per_s']:6.1f}  "
            f"upload MB/s {r['upload_mb_per_s']:5.1f}  errors {r['errors']}  "
            f"RSS {r['rss_warm_mb']:.0f} -> {r['rss_end_mb']:.0f} MB"
        )
    ratio = results["postgres"]["requests_per_s"] / results["sqlite"]["requests_per_s"]
    print(f"postgres / sqlite requests/s: {ratio:.2f}")


if __name__ == "__main__":
    main()

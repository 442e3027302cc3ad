"""Load: concurrent uploads, job submissions and reads on a real `loraplex api` process, on
SQLite (the embedded default) and Postgres: no request fails, every answer is right, and the
process's memory stays flat once warm. Throughput is bench/bench_api_load.py's business.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from api.settings import Settings
from tests.api.load_driver import ApiProcess, run_round
from tests.conftest import bearer, new_tenant

TENANTS, PER_TENANT, CONCURRENCY, EXAMPLES = 4, 4, 16, 2000
# Allocator and caches settle after the first round; a leak of even a few KB per request
# (64 uploads of ~300 KB per round) would show well past this.
MAX_GROWTH_MB = 40


def test_concurrent_uploads_and_jobs_no_errors_flat_memory(
    tmp_path: Path, db_url: str, tiny_llama: Path
) -> None:
    api = ApiProcess(
        tmp_path / "home",
        db_url,
        extra_env={"LORAPLEX_BASE_MODELS": json.dumps({"tiny": str(tiny_llama)})},
    )
    try:
        settings = Settings(home=tmp_path / "home", database_url=db_url)
        keys = [new_tenant(settings)[1] for _ in range(TENANTS)]
        load = {"concurrency": CONCURRENCY, "per_tenant": PER_TENANT, "n_examples": EXAMPLES}
        warm = run_round(api.url, keys, **load)
        assert warm.errors == []
        rss_warm = api.rss_mb()
        rounds = [run_round(api.url, keys, **load) for _ in range(3)]
        rss_end = api.rss_mb()
        assert [e for r in rounds for e in r.errors] == []
        assert rss_end - rss_warm < MAX_GROWTH_MB, (rss_warm, rss_end)
        for key in keys:  # nothing lost, nothing crossed tenants
            jobs = httpx.get(
                f"{api.url}/v1/fine_tuning/jobs", params={"limit": 100}, headers=bearer(key)
            ).json()["data"]
            assert len(jobs) == 4 * PER_TENANT
            assert {j["status"] for j in jobs} == {"queued"}
    finally:
        api.stop()

"""A hostile tenant's jobs against another tenant's, through real worker processes (issue
13): the queue takes tenants in turn, checkpoints stay bounded, and a run that hangs
holding the GIL is stopped and failed while the other tenant's job runs."""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest
from sqlmodel import Session, col, select

from api.db import get_engine
from api.models.jobs import Job
from api.settings import Settings
from tests.conftest import new_tenant
from tests.workers.conftest import TINY, hp, upload, wait_for_status

pytestmark = pytest.mark.timeout(600)
HANG_IN_C = str(Path(__file__).parent / "faults" / "hang_in_c.py")
TERMINAL = {"succeeded", "failed", "cancelled"}


def _sdk(live_url: str, settings: Settings, name: str) -> openai.OpenAI:
    _, key = new_tenant(settings, name=name)
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_backlog_does_not_starve_another_tenant_and_checkpoints_are_pruned(
    live_url: str, settings: Settings, start_worker
) -> None:
    backlog, quiet = _sdk(live_url, settings, "backlog"), _sdk(live_url, settings, "quiet")
    start_worker()
    file_a, file_b = upload(backlog), upload(quiet)
    # Each checkpoint carries optimizer state: every step asked for, three kept.
    first = backlog.fine_tuning.jobs.create(
        model=TINY,
        training_file=file_a,
        method=hp(n_epochs=2, batch_size=4, method="lora", checkpoint_interval=1),
    ).id
    rest = [
        backlog.fine_tuning.jobs.create(
            model=TINY, training_file=file_a, method=hp(n_epochs=2, batch_size=4, method="lora")
        ).id
        for _ in range(3)
    ]
    late = quiet.fine_tuning.jobs.create(
        model=TINY, training_file=file_b, method=hp(n_epochs=2, batch_size=4, method="lora")
    ).id

    for sdk, job_id in [(backlog, first), *[(backlog, j) for j in rest], (quiet, late)]:
        done = wait_for_status(sdk, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done.status == "succeeded", done.error
    with Session(get_engine(settings.database_url)) as s:
        started = list(s.exec(select(Job.id).order_by(col(Job.started_at))))
    # First come first served would start the quiet tenant's job fifth, after the backlog.
    assert started.index(late) <= 1, started

    steps = [c.step_number for c in backlog.fine_tuning.jobs.checkpoints.list(first, limit=100)]
    assert sorted(steps) == [4, 5, 6]
    kept = settings.home / "artifacts" / "jobs" / first / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-4", "step-5", "step-6"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_run_hung_holding_the_gil_is_stopped_failed_and_the_queue_goes_on(
    live_url: str, settings: Settings, start_worker
) -> None:
    hostile, quiet = _sdk(live_url, settings, "hostile"), _sdk(live_url, settings, "quiet")
    settings.training_hang_timeout = 3  # 60 s by default
    first = start_worker(wrapper=[sys.executable, HANG_IN_C])
    hung = hostile.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(hostile),
        method=hp(n_epochs=2, batch_size=4, method="lora", lora_r=7),  # rank 7: hangs
    ).id
    wait_for_status(hostile, hung, {"running"})
    waiting = quiet.fine_tuning.jobs.create(
        model=TINY, training_file=upload(quiet), method=hp(n_epochs=2, batch_size=4, method="lora")
    ).id
    # Before the watchdog nothing could stop it: no heartbeat, no signal handler ran.
    assert first.proc.wait(timeout=60) != 0
    start_worker(wrapper=[sys.executable, HANG_IN_C])  # as `up` or systemd would
    done = wait_for_status(hostile, hung, TERMINAL)
    assert done.status == "failed" and done.error and done.error.code == "training_hung"
    assert "stopped responding" in done.error.message and "Traceback" not in done.error.message
    assert wait_for_status(quiet, waiting, TERMINAL).status == "succeeded"
    assert hostile.fine_tuning.jobs.retrieve(hung).fine_tuned_model is None

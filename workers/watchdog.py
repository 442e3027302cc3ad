"""A watchdog that no hang can hold off, and what the next start of the worker makes of it.

A training run can hang inside C code that holds the GIL (peft ran a tenant's regex through
`re.fullmatch` for minutes): no Python thread runs then, so heartbeats stop, signal handlers
never run, cancel cannot get through, and under `loraplex up` every tenant's training waits
behind it. `faulthandler`'s timer is a C thread that needs no GIL: the job's heartbeat thread
re-arms it on every beat, and when the beats stop for `training_hang_timeout` seconds it
writes every thread's traceback to the job's marker file and ends the process. `up` (or systemd,
Kubernetes) starts the worker again; before taking work it fails each job whose marker holds
a traceback with `training_hung`, so the job does not hang the next worker too.

A marker left empty means the process died some other way (SIGKILL, power): the reaper
re-queues that job to resume, as before.
"""

from __future__ import annotations

import faulthandler
import logging
import os
from pathlib import Path
from typing import IO

from sqlmodel import Session

from api.db import get_engine
from api.services import job_runs
from api.services.job_runs import Claim, LeaseLost
from api.settings import Settings

log = logging.getLogger(__name__)


def _folder(settings: Settings) -> Path:
    return settings.home / "watchdog"


class Watchdog:
    """Armed for one claimed job in this process (one job at a time: the timer is global)."""

    def __init__(self, settings: Settings, claim: Claim) -> None:
        self.timeout = settings.training_hang_timeout
        # The pid: workers sharing a home leave each other's live markers alone.
        self.path = _folder(settings) / f"{claim.job_id}.{claim.lease}.{os.getpid()}"
        self._file: IO[str] | None = None

    def arm(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")  # noqa: SIM115 (open while armed)
        self.pet()

    def pet(self) -> None:
        if self._file is not None:
            faulthandler.dump_traceback_later(self.timeout, exit=True, file=self._file)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def fail_hung_jobs(settings: Settings) -> list[str]:
    """At start-up: fail the jobs a watchdog of this host stopped; drop every marker.
    Returns the ids failed (a job cancelled or re-queued meanwhile is left as it is)."""
    folder = _folder(settings)
    failed: list[str] = []
    for marker in sorted(folder.glob("*.*.*")) if folder.is_dir() else []:
        job_id, lease, pid = marker.name.split(".", 2)
        if _alive(pid):
            continue
        traceback = marker.read_text(errors="replace")
        if traceback.strip():
            log.error("job %s hung and was stopped by the watchdog:\n%s", job_id, traceback)
            with Session(get_engine(settings.database_url)) as session:
                try:
                    job_runs.fail_hung(
                        session,
                        Claim(job_id=job_id, lease=lease, attempt=0),
                        seconds=settings.training_hang_timeout,
                    )
                    failed.append(job_id)
                except LeaseLost:
                    pass
        marker.unlink(missing_ok=True)
    return failed


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()

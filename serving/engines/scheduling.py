"""What the in-process engine runs next: jobs, the slices of them one generate() takes, and
the order they take turns in (no torch here).

A job is one request: len(prompts) x n rows. One generate() runs at most `max_rows` rows, so
a bigger job runs as several slices, and after each slice it goes to the back of the queue
(`requeue`), behind every request that arrived meanwhile: one request can never hold the
engine while others wait longer than one slice. Other jobs
join the head's batch when they sample alike and fit whole (a seeded head runs alone, so its
seed means what it says). Cancelled (client gone) and failed jobs leave the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serving.engines.base import EngineRequest, Progress


@dataclass
class Job:
    request: EngineRequest
    prompts: list[list[int]]
    limit: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    response_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))  # the response's `created`
    next_row: int = 0  # rows handed to generate() so far (engine thread only)
    rows_finished: int = 0
    failed: bool = False

    @property
    def n(self) -> int:
        return int(self.request.body.get("n") or 1)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def rows_left(self) -> int:
        return self.rows - self.next_row

    @property
    def progress(self) -> Progress:
        return self.request.progress

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled.is_set()

    @property
    def sampling_key(self) -> tuple[Any, ...]:
        body = self.request.body
        temperature = body.get("temperature", 1.0)
        if temperature == 0:
            return ("greedy",)
        return ("sample", temperature, body.get("top_p", 1.0), body.get("seed"))

    @property
    def seeded(self) -> bool:
        return self.request.body.get("seed") is not None

    def prompt(self, row: int) -> list[int]:
        """Row `row`'s prompt: rows are prompt-major (choice index = prompt x n + k)."""
        return self.prompts[row // self.n]

    def take(self, most: int) -> Slice:
        part = Slice(job=self, start=self.next_row, stop=min(self.rows, self.next_row + most))
        self.next_row = part.stop
        return part

    def emit(self, *event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one job, run in one generate()."""

    job: Job
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)

    @property
    def seed(self) -> int | None:
        """The request's seed for its first slice; later slices get their own, derived from
        it (the same seed again would repeat the first slice's samples)."""
        seed = self.job.request.body.get("seed")
        if seed is None or self.start == 0:
            return None if seed is None else int(seed)
        return hash((int(seed), self.start))  # ints hash the same in every process


def next_batch(pending: deque[Job], *, max_rows: int) -> list[Slice]:
    """Take the next batch off `pending` (the caller holds its lock); [] if none is live.
    A job with rows left after it is off the queue until `requeue`."""
    live = [job for job in pending if not (job.cancelled or job.failed)]
    pending.clear()
    if not live:
        return []
    head, *others = live
    batch = [head.take(max_rows)]
    room = max_rows - batch[0].size
    for job in others:
        if not head.seeded and job.sampling_key == head.sampling_key and job.rows_left <= room:
            batch.append(job.take(room))
            room -= batch[-1].size
        else:
            pending.append(job)
    return batch


def requeue(pending: deque[Job], batch: list[Slice]) -> None:
    """After `batch` ran: its jobs with rows left go to the back of the queue."""
    for part in batch:
        job = part.job
        if job.rows_left and not (job.cancelled or job.failed):
            pending.append(job)
